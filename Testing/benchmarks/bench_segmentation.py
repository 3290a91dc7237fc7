"""Segmentation benchmark: DeepSeg vs nnU-Net's own predictor vs MONAI's default pipeline, on a CPU or GPU.

Run by hand, not by CI (``flock`` keeps two benchmarks on one machine from overlapping)::

    flock /tmp/deepseg-bench.lock .venv/bin/python Testing/benchmarks/bench_segmentation.py
    ... bench_segmentation.py --volume ../shared/data/ct_abdomen_small/example_ct_sm.nii.gz \\
                              ../shared/data/ct_head_avm/CT_AVM.nii.gz            # real CTs
    ... bench_segmentation.py --ct-shape 256 256 150                              # a quarter of the CT
    ... bench_segmentation.py --labels 100 --tools deepseg_bf16                   # peak memory, 100 labels

The model is an nnU-Net v2 3d_fullres folder with nnU-Net's default network for a CT at 1.5 mm
(PlainConvUNet, 6 stages, features 32-64-128-256-320-320, 128^3 patch: 31M parameters) and untrained,
seeded weights: timings do not depend on training, and Dice between tools still shows whether they
compute the same thing (untrained logits are close to each other, so small numerical differences flip
more voxels than they would with a trained model). Plans are built by ``Testing/Python/nnunet_helpers.py``,
the same builder the tests use.

The default case is a synthetic CT of 512 x 512 x 300 voxels at 0.8 mm (``--ct-shape``, ``--spacing``),
which nnU-Net's preprocessing resamples to 273 x 273 x 160 at 1.5 mm: 32 windows at step 0.5.

Tools, each in a fresh process with the same thread count (``--threads``; also OMP/MKL and nnU-Net's
``nnUNet_def_n_proc``), the same weights and input, step 0.5 / overlap 0.5, gaussian blending where the
tool has it, no mirroring:

    deepseg_bf16   DeepSeg, precision "bf16" (its default on CPUs with native bfloat16), array in -> labels
    deepseg_fp32   DeepSeg, precision "fp32"
    nnunet_npy     nnUNetPredictor.predict_single_npy_array (array in -> labels)
    nnunet_files   nnUNetPredictor.predict_from_files (NIfTI in -> NIfTI out, 1 preprocessing/export worker)
    monai          plain MONAI as a bundle runs it: Spacingd (bilinear), ScaleIntensityRanged (the plans' CT
                   normalisation), SlidingWindowInferer (roi = patch, overlap 0.5, MONAI's default constant
                   blending, sw_batch_size 1), softmax, Invertd, argmax; float32

Printed per tool: warm seconds (model already loaded: the best of ``--repeats`` runs) and the CPU seconds of
that run (all threads and worker processes; robust when something else shares the cores), load seconds, peak
RSS (the process's, or its largest child's for nnU-Net's worker processes), and Dice per label against
nnunet_npy (and bf16 against fp32). DeepSeg's file figures add its NIfTI read and write to the warm time.

What a run costs on 2 cores of an AVX512-BF16 CPU (minutes, per tool and case, one repeat):
the default 512x512x300 CT: deepseg_bf16 ~3, deepseg_fp32 ~5, nnunet_npy ~5, nnunet_files ~5, monai ~5;
``--ct-shape 256 256 150`` (4 windows): under 1 each; the real CTs: abdomen 9 windows, head 1 window.
``--labels 100`` adds the resampling of 100 channels back to the input grid (DeepSeg: 1.5-2 minutes on the
default CT; minutes for nnU-Net, whose float copies of 100 channels at 512x512x300 need about 30 GB: run it
on a smaller case such as ``--ct-shape 256 256 150`` or let ``--memory-limit-gb`` stop it).
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

HERE = Path(__file__).resolve()
REPOSITORY = HERE.parents[2]
TOOLS = ("deepseg_bf16", "deepseg_fp32", "nnunet_npy", "nnunet_files", "monai")


def build_model(root: Path, features: list[int], patch: list[int], spacing: float, labels: int) -> Path:
    """An nnU-Net 3d_fullres folder with nnU-Net's default CT network (untrained, seeded weights)."""
    sys.path.insert(0, str(REPOSITORY / "Testing" / "Python"))
    import nnunet_helpers

    plans_arguments = {
        "spacing_zyx": [spacing] * 3,
        "patch_size": patch,
        "architecture": nnunet_helpers.plain_unet_architecture(features),
        "intensities": nnunet_helpers.CT_INTENSITIES,
        "dataset_name": "Dataset998_Bench",
        "median_shape_zyx": [200, 300, 300],
    }
    plan = nnunet_helpers.plans(**plans_arguments)
    network = nnunet_helpers.network_from_plans(plan, classes=labels)
    parameters = sum(p.numel() for p in network.parameters())
    folder = nnunet_helpers.write_nnunet_folder(
        root, network, folds=("0",), plans_overrides=plans_arguments, dataset=nnunet_helpers.dataset_json(labels)
    )
    print(f"network: PlainConvUNet {features}, {parameters / 1e6:.1f}M parameters, patch {patch}, {labels} classes")
    return folder


def synthetic_ct(shape_ijk: list[int], spacing: float, path: Path) -> None:
    """A body-like cylinder of soft tissue with an organ and a bone in noise, int16 HU, air outside."""
    import nibabel as nib

    generator = np.random.default_rng(0)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape_ijk], indexing="ij", sparse=True)
    body = np.broadcast_to((i**2 + j**2) < 0.8, tuple(shape_ijk))
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    image[((i - 0.3) ** 2 + j**2 + k**2) < 0.05] = 120.0
    image[((i + 0.3) ** 2 + (j - 0.2) ** 2 + k**2) < 0.02] = 700.0
    image += generator.normal(0, 20, image.shape).astype(np.float32)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), path)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(k, j, i) float32 array and IJK-to-RAS matrix, as Slicer hands them to DeepSeg."""
    import nibabel as nib

    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0), image.affine


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest finished child
    return max(own, children) / 1024


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed_runs(run, repeats: int, figures: dict) -> object:
    """Runs ``run`` ``repeats`` times; keeps the best wall time and its CPU time (all threads and child
    processes: unlike wall time, it barely moves when another program shares the cores)."""
    figures["seconds"], result = float("inf"), None
    for _ in range(max(repeats, 1)):
        started, cpu = time.perf_counter(), _cpu_seconds()
        result = run()
        seconds = time.perf_counter() - started
        if seconds < figures["seconds"]:
            figures["seconds"], figures["cpu_seconds"] = seconds, _cpu_seconds() - cpu
    return result


def run_tool(tool: str, config: dict) -> dict:
    import torch

    if config.get("memory_limit_gb"):
        limit = int(config["memory_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    folder, volume_path, out = Path(config["model"]), Path(config["volume"]), Path(config["out"])
    repeats = int(config["repeats"])
    array_kji, ijk_to_ras = _read(volume_path)
    spacing_kji = list(np.linalg.norm(ijk_to_ras[:3, :3], axis=0)[::-1])
    figures: dict = {"tool": tool}
    started = time.perf_counter()
    if tool.startswith("deepseg"):
        sys.path.insert(0, str(REPOSITORY / "DeepSegModule"))
        from DeepSegModuleLib.models import load_model
        from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment

        model = load_model(folder, device)
        figures["seconds_load"] = time.perf_counter() - started
        options = SegmentationOptions(device=str(device), mirroring=False, precision=tool.split("_")[1])
        result = _timed_runs(lambda: segment(VolumeArray(array_kji, ijk_to_ras), model, options), repeats, figures)
        figures["stages"] = {k: round(v, 2) for k, v in result.timings.items()}
        labels = result.labels
        import nibabel as nib

        step = time.perf_counter()
        _read(volume_path)
        figures["seconds_read_file"] = time.perf_counter() - step
        step = time.perf_counter()
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), ijk_to_ras), out / f"{tool}.nii.gz")
        figures["seconds_write_file"] = time.perf_counter() - step
    elif tool.startswith("nnunet"):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
            device=device, verbose=False, allow_tqdm=False,
        )  # fmt: skip
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=("0",))
        figures["seconds_load"] = time.perf_counter() - started
        if tool == "nnunet_npy":
            labels = _timed_runs(
                lambda: predictor.predict_single_npy_array(array_kji[None], {"spacing": spacing_kji}), repeats, figures
            )
        else:
            import nibabel as nib

            def from_files():
                predictor.predict_from_files(
                    [[str(volume_path)]], str(out / "nnunet_files"), save_probabilities=False, overwrite=True,
                    num_processes_preprocessing=1, num_processes_segmentation_export=1,
                )  # fmt: skip

            _timed_runs(from_files, repeats, figures)
            written = next((out / "nnunet_files").glob("*.nii.gz"))
            labels = np.asarray(nib.load(written).dataobj).transpose(2, 1, 0)
    elif tool == "monai":
        sys.path.insert(0, str(REPOSITORY / "DeepSegModule"))
        from DeepSegModuleLib.models import load_model
        from monai.data import MetaTensor
        from monai.inferers import SlidingWindowInferer
        from monai.transforms import Compose, EnsureChannelFirstd, Invertd, ScaleIntensityRanged, Spacingd

        network = load_model(folder, device).networks[0]  # the same network and weights, nothing else of DeepSeg
        figures["seconds_load"] = time.perf_counter() - started
        plans = json.loads((folder / "plans.json").read_text())
        configuration = plans["configurations"]["3d_fullres"]
        ct = plans["foreground_intensity_properties_per_channel"]["0"]
        low, high, mean, std = ct["percentile_00_5"], ct["percentile_99_5"], ct["mean"], ct["std"]
        preprocessing = Compose([
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            Spacingd("image", pixdim=configuration["spacing"][::-1], mode="bilinear"),
            ScaleIntensityRanged("image", low, high, (low - mean) / std, (high - mean) / std, clip=True),
        ])  # fmt: skip
        inferer = SlidingWindowInferer(roi_size=configuration["patch_size"][::-1], sw_batch_size=1, overlap=0.5)

        def predict(windows):  # the network was built for (z, y, x) patches
            return network(windows.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

        def pipeline():
            image = MetaTensor(torch.from_numpy(array_kji.transpose(2, 1, 0).copy()), affine=torch.tensor(ijk_to_ras))
            data = preprocessing({"image": image})
            with torch.inference_mode():
                logits = inferer(data["image"][None].to(device), predict)[0]
            data["pred"] = torch.softmax(logits.cpu(), 0)
            data = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)
            return np.asarray(data["pred"].argmax(0)).transpose(2, 1, 0)

        labels = _timed_runs(pipeline, repeats, figures)
    else:
        raise SystemExit(f"unknown tool {tool}; known: {', '.join(TOOLS)}")
    np.save(out / f"{tool}.npy", np.asarray(labels, dtype=np.uint8 if labels.max() < 256 else np.uint16))
    figures["peak_rss_mb"] = _peak_rss_mb()
    return figures


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    scores = {}
    for value in sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}):
        x, y = a == value, b == value
        scores[int(value)] = round(2.0 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0), 4)
    return scores


def _summary(scores: dict[int, float], a: np.ndarray | None = None, b: np.ndarray | None = None) -> str:
    """Dice per label; past 6 labels their mean and minimum, and with the label maps ``a`` and ``b`` also the
    minimum over labels of at least 1000 voxels in ``b`` and the fraction of equal voxels (with many labels,
    untrained logits are close and labels of a few voxels flip whole)."""
    if not scores:
        return "-"
    values = list(scores.values())
    if len(values) <= 6:
        return " ".join(f"{v:.3f}" for v in values)
    text = f"mean {np.mean(values):.3f} min {min(values):.3f} ({len(values)} labels)"
    if a is not None and b is not None:
        counts = np.bincount(b.ravel().astype(np.int64))
        large = [v for k, v in scores.items() if k < len(counts) and counts[k] >= 1000]
        if large:
            text += f"; min {min(large):.3f} over the {len(large)} labels of >= 1000 voxels"
        text += f"; voxels equal {float((a == b).mean()):.4f}"
    return text


def run_case(volume: Path, model: Path, root: Path, args: argparse.Namespace) -> None:
    array, _ = _read(volume)
    print(f"\ncase: {volume.name} {array.shape[::-1]} (i, j, k), device {args.device}, {args.threads} threads")
    out = root / volume.name.split(".")[0]
    out.mkdir(exist_ok=True)
    config = {
        "model": str(model), "volume": str(volume), "out": str(out), "device": args.device, "threads": args.threads,
        "repeats": args.repeats, "memory_limit_gb": args.memory_limit_gb,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    threads = str(args.threads)
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "nnUNet_def_n_proc": threads}
    environment.pop("DEEPSEG_PRECISION", None)
    results = {}
    for tool in args.tools:
        command = [sys.executable, str(HERE), "--run-tool", tool, "--config", str(out / "config.json")]
        completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
        if completed.returncode != 0:
            reason = "out of memory" if "MemoryError" in completed.stderr or "alloc" in completed.stderr else "failed"
            print(f"{tool}: {reason}\n{completed.stderr[-1500:]}")
            continue
        results[tool] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(json.dumps(results[tool]), flush=True)
    if not results:
        return
    reference_tool = "nnunet_npy" if "nnunet_npy" in results else next(iter(results))
    reference = np.load(out / f"{reference_tool}.npy")
    header = f"{'tool':14s} {'warm s':>8s} {'CPU s':>8s} {'load s':>7s} {'peak RSS MB':>12s}"
    print(f"\n{header}  Dice per label vs {reference_tool}")
    for tool, figures in results.items():
        labels = np.load(out / f"{tool}.npy")
        scores = dice_per_label(labels, reference)
        seconds, cpu, load = figures["seconds"], figures["cpu_seconds"], figures.get("seconds_load", 0.0)
        summary = _summary(scores, labels, reference)
        print(f"{tool:14s} {seconds:8.1f} {cpu:8.1f} {load:7.1f} {figures['peak_rss_mb']:12.0f}  {summary}")
    for tool in ("deepseg_bf16", "deepseg_fp32"):
        if tool in results:
            figures = results[tool]
            from_file = figures["seconds"] + figures["seconds_read_file"] + figures["seconds_write_file"]
            print(f"{tool} file in -> file out: {from_file:.1f} s; stages {figures['stages']}")
    if {"deepseg_bf16", "deepseg_fp32"} <= set(results):
        bf16, fp32 = np.load(out / "deepseg_bf16.npy"), np.load(out / "deepseg_fp32.npy")
        print(f"Dice deepseg_bf16 vs deepseg_fp32: {_summary(dice_per_label(bf16, fp32), bf16, fp32)}")
    print("\nratios, tool / DeepSeg (warm seconds; CPU seconds):")
    for base in ("deepseg_bf16", "deepseg_fp32"):
        if base in results:
            for key in ("seconds", "cpu_seconds"):
                ratios = {t: round(f[key] / results[base][key], 2) for t, f in results.items() if t != base}
                print(f"  vs {base} ({key}): {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", nargs="+", type=Path, help="CT NIfTI file(s); default: a synthetic CT")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=[512, 512, 300], help="synthetic CT size (i j k)")
    parser.add_argument("--spacing", type=float, default=0.8, help="synthetic CT voxel size (mm)")
    parser.add_argument("--target-spacing", type=float, default=1.5, help="the model's voxel size (mm)")
    parser.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 320, 320])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--labels", type=int, default=5, help="output classes including background")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per tool after loading (best is kept)")
    parser.add_argument("--memory-limit-gb", type=float, default=None, help="address-space limit per tool process")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--run-tool", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_tool:
        print(json.dumps(run_tool(args.run_tool, json.loads(Path(args.config).read_text()))))
        return

    with tempfile.TemporaryDirectory(prefix="deepseg-bench-") as temporary:
        root = Path(temporary)
        model = build_model(root, args.features, args.patch, args.target_spacing, args.labels)
        volumes = args.volume
        if not volumes:
            volumes = [root / "synthetic_ct.nii.gz"]
            synthetic_ct(args.ct_shape, args.spacing, volumes[0])
        for volume in volumes:
            run_case(volume, model, root, args)


if __name__ == "__main__":
    main()
