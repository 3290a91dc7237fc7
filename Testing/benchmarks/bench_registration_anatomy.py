"""Registration on anatomy between different people: DeepSeg against ANTs SyN, scored by how well the brain's
structures line up (by hand, not in CI).

    pip install -e .[bench]
    python Testing/benchmarks/bench_registration_anatomy.py                        # the default pairs and methods
    python Testing/benchmarks/bench_registration_anatomy.py --pairs 17:18 --methods deepseg-fast ants-syn

The pairs are two different subjects of ``../shared/data/brain_label_maps`` (SynthSeg's 20 real 1 mm whole-head
label maps, Apache-2.0). Subjects 17 to 20 are this benchmark's held-out set: no preset, default or model of the
project is to be tuned on them (issue 19's brain model trains on 1 to 16). Each subject's image is synthesised
from its own label map, the same way for every tool: one intensity per structure (a T1-like or a T2-like table;
the extra-cerebral labels get seeded intensities of their own), a 0.6 mm blur for partial voluming, a smooth
multiplicative bias and a little noise. ``--contrast t1`` registers T1-like to T1-like; ``t2`` a T2-like moving
image to a T1-like fixed one (DeepSeg's ``multimodal`` preset and ANTs SyN with mutual information).

Every (pair, method) runs in a fresh process with the same thread count, and is scored the same way: the moving
subject's label map is carried onto the fixed subject with the tool's own transform (nearest neighbour), and Dice
is taken per brain structure of labels_table.txt (CSF excluded) against the fixed subject's label map: the mean,
and the worst structure. Also printed: folding (DeepSeg: the quality report; ANTs: det J <= 0 of its warp inside the
fixed brain), wall and CPU seconds of the registration and warping, and the process's peak memory.

Methods: ``deepseg-fast`` (the default preset), ``deepseg-accurate``, ``deepseg-multimodal``, ``deepseg-affine``
(the linear stages alone), ``elastix`` (itk-elastix's default affine and B-spline maps, Mattes MI, started from the
centres of gravity as in bench_registration.py), ``ants-syn``
(antspyx's ``SyN`` with its defaults), ``ants-synra`` (``SyNRA``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "brain_label_maps"
METHODS = ("deepseg-fast", "deepseg-accurate", "deepseg-multimodal", "deepseg-affine", "ants-syn", "ants-synra",
           "elastix")
DEFAULT_PAIRS = ("17:18", "19:20")
DEEPSEG_PRESETS = {"deepseg-fast": "deformable fast", "deepseg-accurate": "deformable accurate",
                   "deepseg-multimodal": "multimodal", "deepseg-affine": "affine"}  # fmt: skip


def brain_structures() -> dict[int, str]:
    """Label value -> name of the brain structures in labels_table.txt, CSF (24) and background left out."""
    structures = {}
    for line in (DATA / "labels_table.txt").read_text().splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) not in (0, 24):
            structures[int(parts[0])] = parts[1].strip()
    return structures


# T1-like and T2-like intensities of the brain's tissue classes (arbitrary units); anything else gets a seeded one.
_WHITE = (2, 7, 41, 46, 16, 28, 60)
_GREY = (3, 8, 42, 47, 11, 12, 17, 18, 26, 50, 51, 53, 54, 58)
_DEEP = (10, 49, 13, 52)
_FLUID = (4, 5, 14, 15, 24, 43, 44)


def _intensity_table(labels: np.ndarray, contrast: str) -> dict[int, float]:
    tissue = {"t1": {"white": 110.0, "grey": 70.0, "deep": 90.0, "fluid": 25.0},
              "t2": {"white": 60.0, "grey": 85.0, "deep": 70.0, "fluid": 160.0}}[contrast]  # fmt: skip
    table = {0: 0.0}
    generator = np.random.default_rng(7 if contrast == "t1" else 8)  # the same table for every subject
    for value in sorted(int(v) for v in np.unique(labels)):
        if value in _WHITE:
            table[value] = tissue["white"]
        elif value in _GREY:
            table[value] = tissue["grey"]
        elif value in _DEEP:
            table[value] = tissue["deep"]
        elif value in _FLUID:
            table[value] = tissue["fluid"]
        elif value != 0:
            table[value] = float(generator.uniform(15.0, 130.0))
    return table


def synthesise(labels: np.ndarray, contrast: str, seed: int) -> np.ndarray:
    """An image of ``labels`` (k, j, i): one intensity per structure, blurred, with a smooth bias and noise."""
    from scipy import ndimage

    table = _intensity_table(labels, contrast)
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.float32)
    for value, intensity in table.items():
        lookup[value] = intensity
    image = ndimage.gaussian_filter(lookup[labels.astype(np.int64)], 0.6)
    generator = np.random.default_rng(seed)
    coarse = generator.normal(0.0, 0.08, (4, 4, 4))
    bias = np.exp(ndimage.zoom(coarse, np.array(labels.shape) / 4.0, order=3))[: labels.shape[0], : labels.shape[1],
                                                                                : labels.shape[2]]  # fmt: skip
    noisy = image * bias + generator.normal(0.0, 3.0, labels.shape)
    return np.clip(noisy, 0.0, None).astype(np.float32)


def subject(number: int, contrast: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label map, ijk_to_ras) of subject ``number``, cropped to its head plus 8 voxels, (k, j, i) order."""
    import nibabel

    nifti = nibabel.load(str(DATA / f"training_seg_{number:02d}.nii.gz"))
    labels = np.asarray(nifti.dataobj).astype(np.int32).transpose(2, 1, 0)
    head = np.nonzero(labels)
    low = [max(int(axis.min()) - 8, 0) for axis in head]
    high = [min(int(axis.max()) + 9, size) for axis, size in zip(head, labels.shape)]
    labels = labels[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    ijk_to_ras = nifti.affine.copy()
    ijk_to_ras[:3, 3] = nifti.affine[:3, :3] @ np.array([low[2], low[1], low[0]], dtype=float) + nifti.affine[:3, 3]
    return synthesise(labels, contrast, seed=number), labels, ijk_to_ras


def dice_scores(reference: np.ndarray, carried: np.ndarray, structures: dict[int, str]) -> dict[str, float]:
    scores = {}
    for value, name in structures.items():
        a, b = reference == value, carried == value
        total = int(a.sum()) + int(b.sum())
        if total:
            scores[name] = 2.0 * int((a & b).sum()) / total
    return scores


def _nifti(path: Path, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(array_kji.transpose(2, 1, 0)), ijk_to_ras), str(path))
    return path


def run_deepseg(preset: str, fixed, moving, threads: int) -> tuple[np.ndarray, float | None]:
    import torch

    from DeepSegModuleLib.registration import register

    torch.set_num_threads(threads)
    result = register(fixed[0], fixed[2], moving[0], moving[2], preset, device="cpu")
    carried = result.resample(moving[1], interpolation="nearest")
    return carried, result.quality.folding_percent


def run_ants(kind: str, fixed, moving, threads: int, work: Path) -> tuple[np.ndarray, float | None]:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    fixed_image = ants.image_read(str(_nifti(work / "fixed.nii.gz", fixed[0], fixed[2])))
    moving_image = ants.image_read(str(_nifti(work / "moving.nii.gz", moving[0], moving[2])))
    moving_labels = ants.image_read(str(_nifti(work / "moving_labels.nii.gz", moving[1].astype(np.float32), moving[2])))
    registration = ants.registration(fixed_image, moving_image, type_of_transform=kind)
    carried = ants.apply_transforms(fixed_image, moving_labels, registration["fwdtransforms"],
                                    interpolator="nearestNeighbor")  # fmt: skip
    warp = next((t for t in registration["fwdtransforms"] if t.endswith("Warp.nii.gz")), None)
    folding = None
    if warp is not None:
        determinant = ants.create_jacobian_determinant_image(fixed_image, warp).numpy()
        inside = (fixed[1] > 0).transpose(2, 1, 0)
        folding = float(100.0 * np.count_nonzero(determinant[inside] <= 0) / max(int(inside.sum()), 1))
    return np.rint(carried.numpy()).astype(np.int32).transpose(2, 1, 0), folding


def run_elastix(fixed, moving, threads: int) -> tuple[np.ndarray, float | None]:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import itk

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_registration import _to_itk, elastix_parameters

    # itk.image_from_array views the array: keep float32 copies alive as long as the images
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (fixed[0], moving[0], moving[1])]
    fixed_image, moving_image = _to_itk(arrays[0], fixed[2]), _to_itk(arrays[1], moving[2])
    parameters = elastix_parameters()
    _, transform = itk.elastix_registration_method(fixed_image, moving_image, parameter_object=parameters,
                                                   log_to_console=False)  # fmt: skip
    for index in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(index, "FinalBSplineInterpolationOrder", "0")
        transform.SetParameter(index, "DefaultPixelValue", "0")
    moving_labels = _to_itk(arrays[2], moving[2])
    carried = np.asarray(itk.transformix_filter(moving_labels, transform))
    folding = None
    try:
        determinant = np.asarray(itk.transformix_jacobian(moving_image, transform)[1])
        inside = fixed[1] > 0
        folding = float(100.0 * np.count_nonzero(determinant[inside] <= 0) / max(int(inside.sum()), 1))
    except Exception:  # noqa: BLE001 - folding is a figure of the table, not a reason to lose the row
        pass
    return np.rint(carried).astype(np.int32), folding


def one(pair: str, method: str, contrast: str, threads: int) -> dict:
    """One (pair, method), in this process: what the parent prints."""
    fixed_number, moving_number = (int(n) for n in pair.split(":"))
    fixed = subject(fixed_number, "t1")
    moving = subject(moving_number, "t2" if contrast == "t2" else "t1")
    structures = brain_structures()
    if method.startswith("deepseg"):
        import torch  # noqa: F401 - imported before the clock, as every tool's packages are

        import DeepSegModuleLib.registration.engine  # noqa: F401
    elif method == "elastix":
        import itk  # noqa: F401
    else:
        import ants  # noqa: F401
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as work:
        if method.startswith("deepseg"):
            carried, folding = run_deepseg(DEEPSEG_PRESETS[method], fixed, moving, threads)
        elif method == "elastix":
            carried, folding = run_elastix(fixed, moving, threads)
        else:
            carried, folding = run_ants({"ants-syn": "SyN", "ants-synra": "SyNRA"}[method], fixed, moving, threads,
                                        Path(work))  # fmt: skip
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    scores = dice_scores(fixed[1], carried, structures)
    worst = min(scores, key=scores.get)
    return {
        "pair": pair, "contrast": contrast, "method": method, "threads": threads,
        "mean_dice": round(float(np.mean(list(scores.values()))), 4), "structures": len(scores),
        "worst": worst, "worst_dice": round(scores[worst], 4),
        "folding_percent": None if folding is None else round(folding, 4),
        "runtime_s": round(seconds, 1), "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        "dice": {name: round(value, 4) for name, value in scores.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="FIXED:MOVING subject numbers")
    parser.add_argument("--methods", nargs="+", default=["deepseg-fast", "deepseg-accurate", "ants-syn"],
                        choices=METHODS)  # fmt: skip
    parser.add_argument("--contrast", choices=("t1", "t2"), default="t1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--one", nargs=2, metavar=("PAIR", "METHOD"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        print(json.dumps(one(*arguments.one, arguments.contrast, arguments.threads)))
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent: the benchmark needs the shared label maps beside the repository")
    rows = []
    environment = {**os.environ, "OMP_NUM_THREADS": str(arguments.threads), "MKL_NUM_THREADS": str(arguments.threads),
                   "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(arguments.threads)}  # fmt: skip
    print("pair  | contrast | method | mean Dice | worst structure | folding % | wall s | CPU s | peak MB")
    for pair in arguments.pairs:
        for method in arguments.methods:
            command = [sys.executable, __file__, "--one", pair, method, "--contrast", arguments.contrast,
                       "--threads", str(arguments.threads)]  # fmt: skip
            finished = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
            if finished.returncode != 0:
                print(f"{pair} | {arguments.contrast} | {method} | failed: {finished.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(finished.stdout.strip().splitlines()[-1])
            rows.append(row)
            folding = "-" if row["folding_percent"] is None else f"{row['folding_percent']:.3f}"
            print(f"{pair} | {row['contrast']} | {method} | {row['mean_dice']:.3f} | {row['worst']} "
                  f"{row['worst_dice']:.3f} | {folding} | {row['runtime_s']} | {row['cpu_s']} | {row['peak_rss_mb']}",
                  flush=True)  # fmt: skip
    for method in arguments.methods:
        mine = [row for row in rows if row["method"] == method]
        if mine:
            print(f"{method:20s} mean Dice {np.mean([r['mean_dice'] for r in mine]):.3f} over {len(mine)} pair(s), "
                  f"mean wall {np.mean([r['runtime_s'] for r in mine]):.1f} s")  # fmt: skip
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
