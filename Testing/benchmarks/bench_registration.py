"""Registration benchmark: DeepSeg against ANTs SyN (antspyx) and elastix (itk-elastix), side by side.

Run by hand, not by CI::

    pip install -e .[bench]
    python Testing/benchmarks/bench_registration.py                 # every case and method
    python Testing/benchmarks/bench_registration.py --methods deepseg-fast ants-syn --threads 2

Every (case, method) runs in a fresh subprocess so that peak memory (process peak RSS; CUDA peak
allocation for DeepSeg on a GPU) and runtime belong to that method alone; all methods get the same
thread count. Each method's packages (torch and the engine, antspyx, itk-elastix) are imported
before the clock starts: importing takes seconds and is paid once per session, not per
registration. ``runtime_s`` is wall time (registration, then warping the coordinate images and
labels with the tool's own resampler); ``cpu_s`` is the process' CPU time over the same span,
which is the fairer figure on a machine shared with other jobs. Accuracy is measured the same way for every tool: each warps three *coordinate
images* (the moving grid's RAS x, y, z) onto the fixed grid with its own resampler, which gives,
for every fixed voxel, the moving RAS point it samples -- the mapping ``phi`` -- with no convention
of the tool's transform files involved (linear interpolation of a linear function is exact).

Cases:
    mni-known     MNI152 T1 (nilearn, 2 mm) moved by a known affine + smooth displacement (max 8 mm);
                  error of ``phi`` against the truth inside the brain, Dice of the brain mask.
    seg3d-to-mni  A real T1 head (../shared/data/mr_brain_seg3d, brain mask on its grid) registered to
                  the MNI template; Dice of the propagated MNI brain mask against the real one.
                  No tool gets a mask; DeepSeg masks the brain-extracted template by itself
                  (``automatic_masks``, on by default; its quality report says so).
                  Skipped when ../shared/data is absent. Brain.nrrd stores its voxels in the other order
                  along i and j (identity LPS directions where MR.nii.gz has -1, -1), so it is resampled
                  onto the head's grid in physical space (nearest), which puts it on the brain; taken
                  voxel for voxel it is mirrored left-right and front-back. The two masks are different
                  definitions of "brain" (MNI's brain mask includes the CSF up to the skull, Brain.nrrd
                  ends at the brain's surface), so this Dice ranks the tools against each other.
    seg3d-to-mni-brain-mask  The same pair, as one registers a brain-extracted template to a head
                  with skull: every tool gets the same fixed mask, the head's brain as DeepSeg's bundled
                  deepseg-brain model finds it (not Brain.nrrd), dilated by 3 voxels. The mask is made
                  before the timed run (about 1 s on a CPU). ANTs gets it for every stage
                  (``mask_all_stages``, as antsRegistration's ``-x`` does), not only for SyN.
    seg3d-to-mni-template-mask  The same pair with the template's own brain mask as every tool's
                  moving mask (what a user of ANTs would give for a brain-extracted template; DeepSeg's
                  automatic mask is the template's non-empty region, nearly the same).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[2]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"
METHODS = ("deepseg-fast", "deepseg-accurate", "ants-affine", "ants-syn", "elastix-affine-bspline")
CASES = ("mni-known", "seg3d-to-mni", "seg3d-to-mni-brain-mask", "seg3d-to-mni-template-mask")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Cases: (k, j, i) arrays + 4x4 IJK-to-RAS, like the engine's boundary


def _voxel_centres_ras(shape, ijk_to_ras):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ ijk_to_ras.T)[..., :3]


def _sample(volume, ijk_to_ras, points, order=1):
    from scipy import ndimage

    ijk = (points - ijk_to_ras[:3, 3]) @ np.linalg.inv(ijk_to_ras[:3, :3]).T
    return ndimage.map_coordinates(
        volume, np.stack([ijk[..., 2], ijk[..., 1], ijk[..., 0]]), order=order, mode="grid-constant"
    )


def _mni():
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2)
    return (
        np.asarray(template.get_fdata(), np.float32).transpose(2, 1, 0).copy(),
        (np.asarray(brain.get_fdata()) > 0.5).transpose(2, 1, 0).astype(np.uint8),
        np.asarray(template.affine, np.float64),
    )


def load_case(name: str) -> dict:
    """Fixed/moving arrays and geometry, labels, and (for known answers) the true mapping."""
    from scipy import ndimage

    image, brain, ijk_to_ras = _mni()
    if name == "mni-known":
        points = _voxel_centres_ras(image.shape, ijk_to_ras)
        centre = points[brain > 0].mean(axis=0)
        ax, ay, az = np.deg2rad([5.0, -4.0, 6.0])
        rotation = (
            np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
            @ np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
            @ np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        )
        matrix = rotation @ np.diag([1.04, 0.97, 1.02])
        translation = centre - matrix @ centre + np.array([4.0, -3.0, 5.0])
        coarse = np.random.default_rng(0).normal(size=(5, 5, 5, 3))
        displacement = np.stack(
            [
                ndimage.zoom(coarse[..., c], np.array(image.shape) / 5.0, order=3)[
                    : image.shape[0], : image.shape[1], : image.shape[2]
                ]
                for c in range(3)
            ],
            axis=-1,
        )
        displacement *= 8.0 / np.linalg.norm(displacement, axis=-1).max()
        truth = (points + displacement) @ matrix.T + translation
        return {
            "fixed": _sample(image, ijk_to_ras, truth, order=3).astype(np.float32),
            "fixed_ijk_to_ras": ijk_to_ras,
            "fixed_labels": (_sample(brain.astype(np.float32), ijk_to_ras, truth, order=0) > 0.5).astype(np.uint8),
            "moving": image,
            "moving_ijk_to_ras": ijk_to_ras,
            "moving_labels": brain,
            "truth": truth,
            "evaluation_mask": _sample(brain.astype(np.float32), ijk_to_ras, truth, order=0) > 0.5,
        }
    if name == "seg3d-to-mni-brain-mask":
        case = load_case("seg3d-to-mni")
        case["fixed_mask"] = _model_brain_mask(case["fixed"], case["fixed_ijk_to_ras"])
        return case
    if name == "seg3d-to-mni-template-mask":
        case = load_case("seg3d-to-mni")
        case["moving_mask"] = case["moving_labels"] > 0
        return case
    if name == "seg3d-to-mni":
        import nibabel as nib
        import SimpleITK as sitk

        folder = SHARED_DATA / "mr_brain_seg3d"
        if not folder.exists():
            raise FileNotFoundError(f"{folder} is absent (it is shared sample data, not part of the repository)")
        head = nib.load(str(folder / "MR.nii.gz"))
        head_image = sitk.ReadImage(str(folder / "MR.nii.gz"))
        mask_image = sitk.ReadImage(str(folder / "Brain.nrrd"))
        # In physical space: the two files order their voxels differently (see the module docstring).
        mask_image = sitk.Resample(mask_image, head_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        mask = sitk.GetArrayFromImage(mask_image) > 0  # SimpleITK arrays are (k, j, i)
        head_array = np.asarray(head.get_fdata(), np.float32).transpose(2, 1, 0).copy()
        if mask.shape != head_array.shape:
            raise ValueError(f"brain mask {mask.shape} and head {head_array.shape} grids differ")
        return {
            "fixed": head_array,
            "fixed_ijk_to_ras": np.asarray(head.affine, np.float64),
            "fixed_labels": mask.astype(np.uint8),
            "moving": image,
            "moving_ijk_to_ras": ijk_to_ras,
            "moving_labels": brain,
            "truth": None,
            "evaluation_mask": mask,
        }
    raise ValueError(f"unknown case {name!r}; choose from {CASES}")


def _model_brain_mask(head: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """The brain of a head scan as DeepSeg's bundled model labels it (CSF, grey or white matter), dilated."""
    from scipy import ndimage

    from DeepSegModuleLib.models.store import DEFAULT_MODEL_ID, ModelStore
    from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment

    model = ModelStore().get(DEFAULT_MODEL_ID).model_path
    labels = segment(VolumeArray(head, ijk_to_ras), str(model), SegmentationOptions(device="cpu")).labels
    return ndimage.binary_dilation(labels > 0, iterations=3)


# ----------------------------------------------------------------------------------------------
# Methods: each returns phi on the fixed grid ((k, j, i, 3) moving RAS points) and propagated labels


def run_deepseg(case: dict, preset: str, device: str) -> tuple[np.ndarray, np.ndarray, dict]:
    from DeepSegModuleLib.registration import register

    result = register(
        case["fixed"],
        case["fixed_ijk_to_ras"],
        case["moving"],
        case["moving_ijk_to_ras"],
        preset,
        device=device,
        moving_labels=case["moving_labels"],
        fixed_mask=case.get("fixed_mask"),
        moving_mask=case.get("moving_mask"),
    )
    points = _voxel_centres_ras(case["fixed"].shape, case["fixed_ijk_to_ras"])
    extra = {"folding_percent_engine": result.quality.folding_percent, "stage_s": result.quality.runtime_s}
    if result.quality.peak_memory_kind == "cuda_max_memory_allocated":
        extra["cuda_peak_mb"] = result.quality.peak_memory_mb
    return points + result.total_displacement_ras(), result.propagated_labels, extra


def _coordinate_images(case: dict) -> list[np.ndarray]:
    points = _voxel_centres_ras(case["moving"].shape, case["moving_ijk_to_ras"])
    return [points[..., axis].astype(np.float32) for axis in range(3)]


def _to_ants(array_kji: np.ndarray, ijk_to_ras: np.ndarray):
    import ants

    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    direction = (RAS_TO_LPS @ ijk_to_ras[:3, :3]) / spacing
    return ants.from_numpy(
        np.ascontiguousarray(array_kji.transpose(2, 1, 0)).astype(np.float32),
        origin=tuple(RAS_TO_LPS @ ijk_to_ras[:3, 3]),
        spacing=tuple(spacing),
        direction=direction,
    )


def run_ants(case: dict, transform_type: str) -> tuple[np.ndarray, np.ndarray, dict]:
    import ants

    fixed = _to_ants(case["fixed"], case["fixed_ijk_to_ras"])
    moving = _to_ants(case["moving"], case["moving_ijk_to_ras"])
    masks = {}
    if case.get("fixed_mask") is not None:
        masks["mask"] = _to_ants(case["fixed_mask"].astype(np.float32), case["fixed_ijk_to_ras"])
    if case.get("moving_mask") is not None:
        masks["moving_mask"] = _to_ants(case["moving_mask"].astype(np.float32), case["moving_ijk_to_ras"])
    # antspyx masks only the last stage unless told otherwise; antsRegistration's own -x, as
    # antsRegistrationSyN.sh passes it, masks every stage, and the affine stage is where it matters.
    registration = ants.registration(
        fixed, moving, type_of_transform=transform_type, mask_all_stages=bool(masks), **masks
    )
    transforms = registration["fwdtransforms"]
    phi = np.stack(
        [
            ants.apply_transforms(fixed, _to_ants(coordinate, case["moving_ijk_to_ras"]), transforms, "linear")
            .numpy()
            .transpose(2, 1, 0)
            for coordinate in _coordinate_images(case)
        ],
        axis=-1,
    )
    labels = ants.apply_transforms(
        fixed,
        _to_ants(case["moving_labels"].astype(np.float32), case["moving_ijk_to_ras"]),
        transforms,
        "nearestNeighbor",
    )
    return phi, labels.numpy().transpose(2, 1, 0).round().astype(np.uint8), {}


def _to_itk(array_kji: np.ndarray, ijk_to_ras: np.ndarray):
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array_kji, dtype=np.float32))
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((RAS_TO_LPS @ ijk_to_ras[:3, 3]).tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray((RAS_TO_LPS @ ijk_to_ras[:3, :3]) / spacing)))
    return image


def elastix_parameters():
    """elastix's default affine and B-spline maps, the affine one started from the centres of gravity, as ANTs and
    DeepSeg start: without it the seg3d head and the template do not overlap and elastix stops with "Too many
    samples map outside moving image buffer"."""
    import itk

    parameters = itk.ParameterObject.New()
    affine = parameters.GetDefaultParameterMap("affine")
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    parameters.AddParameterMap(affine)
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    return parameters


def run_elastix(case: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    import itk

    fixed = _to_itk(case["fixed"], case["fixed_ijk_to_ras"])
    moving = _to_itk(case["moving"], case["moving_ijk_to_ras"])
    parameters = elastix_parameters()
    masks = {}
    for key, grid_key in (("fixed_mask", "fixed_ijk_to_ras"), ("moving_mask", "moving_ijk_to_ras")):
        if case.get(key) is not None:
            mask = _to_itk(case[key].astype(np.float32), case[grid_key])
            masks[key] = itk.cast_image_filter(mask, ttype=(type(mask), itk.Image[itk.UC, 3]))
    _, transform_parameters = itk.elastix_registration_method(
        fixed, moving, parameter_object=parameters, log_to_console=False, **masks
    )

    def warp(array: np.ndarray, order: int) -> np.ndarray:
        for index in range(transform_parameters.GetNumberOfParameterMaps()):
            transform_parameters.SetParameter(index, "FinalBSplineInterpolationOrder", str(order))
            transform_parameters.SetParameter(index, "DefaultPixelValue", "0")
        return np.asarray(
            itk.transformix_filter(_to_itk(array, case["moving_ijk_to_ras"]), transform_parameters), np.float32
        )

    phi = np.stack([warp(coordinate, 1) for coordinate in _coordinate_images(case)], axis=-1)
    labels = warp(case["moving_labels"].astype(np.float32), 0).round().astype(np.uint8)
    return phi, labels, {}


# ----------------------------------------------------------------------------------------------
# Metrics, one process per (case, method)


def folding_percent(phi: np.ndarray, ijk_to_ras: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Folding and SDlogJ of the whole mapping phi (linear part included; det A > 0 for all tools here)."""
    from DeepSegModuleLib.registration import deformation_quality

    points = _voxel_centres_ras(phi.shape[:3], ijk_to_ras)
    quality = deformation_quality((phi - points).astype(np.float32), ijk_to_ras, mask)
    return quality["folding_percent"], quality["log_jacobian_std"]


def _import_packages(method: str) -> None:
    """Import what a method needs, so that import time stays out of its runtime."""
    if method.startswith("deepseg"):
        import DeepSegModuleLib.registration  # noqa: F401
    elif method.startswith("ants"):
        import ants  # noqa: F401
    elif method.startswith("elastix"):
        import itk

        itk.ParameterObject.New()  # itk loads its modules lazily, on first use


def measure(case_name: str, method: str, device: str) -> dict:
    case = load_case(case_name)
    _import_packages(method)
    started = time.perf_counter()
    cpu_started = time.process_time()
    if method == "deepseg-fast":
        phi, labels, extra = run_deepseg(case, "deformable fast", device)
    elif method == "deepseg-accurate":
        phi, labels, extra = run_deepseg(case, "deformable accurate", device)
    elif method == "ants-affine":
        phi, labels, extra = run_ants(case, "Affine")
    elif method == "ants-syn":
        phi, labels, extra = run_ants(case, "SyN")
    elif method == "elastix-affine-bspline":
        phi, labels, extra = run_elastix(case)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    runtime = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    mask = case["evaluation_mask"]
    row = {"case": case_name, "method": method, "runtime_s": runtime, "cpu_s": cpu}
    if case["truth"] is not None:
        error = np.linalg.norm(phi - case["truth"], axis=-1)[mask]
        row.update(median_error_mm=float(np.median(error)), p95_error_mm=float(np.percentile(error, 95)))
    fixed_labels = case["fixed_labels"] > 0
    propagated = labels > 0
    row["dice_brain"] = float(2 * np.sum(fixed_labels & propagated) / (fixed_labels.sum() + propagated.sum()))
    row["folding_percent"], row["sd_log_jacobian"] = folding_percent(phi, case["fixed_ijk_to_ras"], mask)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row.update(extra)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every tool")
    parser.add_argument("--device", default="auto", help="DeepSeg device: auto, cpu or cuda")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)

    if arguments.one:
        import torch

        torch.set_num_threads(arguments.threads)
        row = measure(*arguments.one, arguments.device)
        row["threads"] = arguments.threads
        print(json.dumps(row))
        return

    environment = dict(os.environ)
    threads = str(arguments.threads)
    environment.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=threads,
        # idle OpenMP threads sleep instead of spinning: on a shared machine spinning made torch 10x slower
        OMP_WAIT_POLICY="PASSIVE",
    )
    rows = []
    for case_name in arguments.cases:
        for method in arguments.methods:
            command = [sys.executable, __file__, "--one", case_name, method, "--threads", threads]
            command += ["--device", arguments.device]
            completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
            if completed.returncode != 0:
                reason = (completed.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"{case_name} / {method}: skipped ({reason})", file=sys.stderr)
                continue
            rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            print(f"{case_name} / {method}: done in {rows[-1]['runtime_s']:.1f} s", file=sys.stderr)

    columns = [
        ("case", "{}"),
        ("method", "{}"),
        ("threads", "{}"),
        ("runtime_s", "{:.1f}"),
        ("cpu_s", "{:.1f}"),
        ("median_error_mm", "{:.2f}"),
        ("p95_error_mm", "{:.2f}"),
        ("dice_brain", "{:.3f}"),
        ("folding_percent", "{:.3f}"),
        ("sd_log_jacobian", "{:.3f}"),
        ("peak_rss_mb", "{:.0f}"),
    ]
    print(" | ".join(name for name, _ in columns))
    for row in rows:
        print(" | ".join(form.format(row[name]) if row.get(name) is not None else "-" for name, form in columns))
    for case_name in arguments.cases:
        by_method = {row["method"]: row for row in rows if row["case"] == case_name}
        if "ants-syn" in by_method:
            reference = by_method["ants-syn"]
            for method, row in by_method.items():
                print(
                    f"{case_name}: {method} takes {row['runtime_s'] / reference['runtime_s']:.2f} x ANTs SyN's "
                    f"time ({row['cpu_s'] / reference['cpu_s']:.2f} x its CPU time)"
                )
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
