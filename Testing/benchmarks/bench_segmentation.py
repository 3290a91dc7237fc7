"""Segmentation benchmark: DeepSeg vs nnU-Net's own predictor vs MONAI's default pipeline.

Run by hand (not by CI)::

    .venv/bin/python Testing/benchmarks/bench_segmentation.py                 # CT-sized synthetic volume
    .venv/bin/python Testing/benchmarks/bench_segmentation.py --volume /work/shared/data/ct_head_avm/CT_AVM.nii.gz
    .venv/bin/python Testing/benchmarks/bench_segmentation.py --shape 256 256 150 --features 16 32 64 128 256 256

Every tool gets the same untrained nnU-Net 3d_fullres network (PlainConvUNet from plans; about 31M
parameters with the default features), the same input, the same device and equal settings (step 0.5 /
overlap 0.5, gaussian blending, no mirroring), and runs in its own process so peak memory is its own.
Printed: end-to-end seconds (array or file in -> labels out), peak RSS, ratios against DeepSeg, and
Dice of each tool's labels against DeepSeg's. MONAI's pipeline uses a bundle's usual defaults
(Spacingd, NormalizeIntensityd, SlidingWindowInferer overlap 0.25 constant blending, Invertd).
Absolute times mean something only on a machine with nothing else running (quote GPU ones).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def fullres_plans(features: list[int], patch: list[int], spacing: list[float], labels: int) -> dict:
    stages = len(features)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1)
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": features,
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * stages,
            "strides": strides,
            "n_conv_per_stage": [2] * stages,
            "n_conv_per_stage_decoder": [2] * (stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset998_Bench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [300, 512, 512],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": patch,
                "median_image_size_in_voxels": [200, 300, 300],
                "spacing": spacing,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": architecture,
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3000.0, "mean": 60.0, "median": 50.0, "min": -1024.0,
                "percentile_00_5": -990.0, "percentile_99_5": 1500.0, "std": 250.0,
            }
        },
    }  # fmt: skip


def build_model(root: Path, features: list[int], patch: list[int], spacing: list[float], labels: int) -> Path:
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    folder = root / "Dataset998_Bench" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    plans = fullres_plans(features, patch, spacing, labels)
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"structure {v}": v for v in range(1, labels)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    torch.manual_seed(0)
    kwargs = dict(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
    kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    network = PlainConvUNet(input_channels=1, num_classes=labels, deep_supervision=False, **kwargs)
    parameters = sum(p.numel() for p in network.parameters())
    checkpoint = {
        "network_weights": network.state_dict(),
        "init_args": {"configuration": "3d_fullres"},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    print(f"network: PlainConvUNet {features}, {parameters / 1e6:.1f}M parameters, patch {patch}, {labels} classes")
    return folder


def synthetic_ct(shape_ijk: list[int], spacing: float, path: Path) -> None:
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
    import nibabel as nib

    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0), image.affine


def run_tool(tool: str, config: dict) -> dict:
    import torch

    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    folder, volume_path, out = Path(config["model"]), Path(config["volume"]), Path(config["out"])
    array_kji, ijk_to_ras = _read(volume_path)
    spacing_kji = list(np.linalg.norm(ijk_to_ras[:3, :3], axis=0)[::-1])
    figures: dict = {"tool": tool}
    started = time.perf_counter()
    if tool.startswith("deepseg"):
        sys.path.insert(0, str(HERE.parents[2] / "DeepSegModule"))
        from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment

        options = SegmentationOptions(device=str(device), mirroring=False)
        first = segment(VolumeArray(array_kji, ijk_to_ras), folder, options)
        figures["seconds_first_run"] = time.perf_counter() - started
        again = time.perf_counter()
        result = segment(VolumeArray(array_kji, ijk_to_ras), folder, options)
        figures["seconds"] = time.perf_counter() - again
        figures["stages"] = {k: round(v, 2) for k, v in result.timings.items()}
        figures["second_run_loaded_from_cache"] = result.model_from_cache and not first.model_from_cache
        labels = result.labels
    elif tool.startswith("nnunet"):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=True,
            device=device, verbose=False, allow_tqdm=False,
        )  # fmt: skip
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=("0",))
        figures["seconds_load"] = time.perf_counter() - started
        if tool == "nnunet_npy":
            labels = predictor.predict_single_npy_array(array_kji[None], {"spacing": spacing_kji})
            figures["seconds_first_run"] = time.perf_counter() - started
            again = time.perf_counter()  # the same predictor again: the network is already loaded
            labels = predictor.predict_single_npy_array(array_kji[None], {"spacing": spacing_kji})
            figures["seconds"] = time.perf_counter() - again
        else:
            import nibabel as nib

            predictor.predict_from_files(
                [[str(volume_path)]], str(out / "nnunet_files"), save_probabilities=False, overwrite=True,
                num_processes_preprocessing=1, num_processes_segmentation_export=1,
            )  # fmt: skip
            written = next((out / "nnunet_files").glob("*.nii.gz"))
            labels = np.asarray(nib.load(written).dataobj).transpose(2, 1, 0)
            figures["seconds"] = figures["seconds_first_run"] = time.perf_counter() - started
    elif tool == "monai":
        from DeepSegModuleLib.models import load_model
        from monai.data import MetaTensor
        from monai.inferers import SlidingWindowInferer
        from monai.transforms import Compose, EnsureChannelFirstd, Invertd, NormalizeIntensityd, Spacingd

        model = load_model(folder, device)  # same network and weights
        network = model.networks[0]
        plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
        spacing_ijk = plans["spacing"][::-1]
        preprocessing = Compose([
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            Spacingd("image", pixdim=spacing_ijk, mode="bilinear"),
            NormalizeIntensityd("image"),
        ])  # fmt: skip
        image = MetaTensor(torch.from_numpy(array_kji.transpose(2, 1, 0).copy()), affine=torch.tensor(ijk_to_ras))
        data = preprocessing({"image": image})
        inferer = SlidingWindowInferer(roi_size=plans["patch_size"][::-1], sw_batch_size=1, overlap=0.25)

        def predict(windows):  # the network was built for (z, y, x) patches
            return network(windows.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

        with torch.inference_mode():
            logits = inferer(data["image"][None].to(device), predict)[0]
        data["pred"] = torch.softmax(logits.cpu(), 0)
        data = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)
        labels = np.asarray(data["pred"].argmax(0)).transpose(2, 1, 0)
        figures["seconds"] = figures["seconds_first_run"] = time.perf_counter() - started
    else:
        raise SystemExit(f"unknown tool {tool}")
    np.save(out / f"{tool}.npy", np.asarray(labels, dtype=np.uint8))
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    scores = {}
    for value in sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}):
        x, y = a == value, b == value
        scores[int(value)] = round(2.0 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0), 4)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", help="a CT NIfTI; default: a synthetic CT of --shape at --spacing mm")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], help="synthetic volume size (i j k)")
    parser.add_argument("--spacing", type=float, default=0.8)
    parser.add_argument("--target-spacing", type=float, default=1.5)
    parser.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 320, 320])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--labels", type=int, default=5, help="output classes including background")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tools", nargs="+", default=["deepseg", "nnunet_npy", "nnunet_files", "monai"])
    parser.add_argument("--run-tool", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_tool:
        print(json.dumps(run_tool(args.run_tool, json.loads(Path(args.config).read_text()))))
        return

    with tempfile.TemporaryDirectory(prefix="deepseg-bench-") as temporary:
        root = Path(temporary)
        model = build_model(root, args.features, args.patch, [args.target_spacing] * 3, args.labels)
        volume = Path(args.volume) if args.volume else root / "ct.nii.gz"
        if not args.volume:
            synthetic_ct(args.shape, args.spacing, volume)
        array, _ = _read(volume)
        print(f"volume: {volume.name} {array.shape[::-1]} (i, j, k), device {args.device}, {args.threads} threads")
        config = {"model": str(model), "volume": str(volume), "out": str(root), "device": args.device,
                  "threads": args.threads}  # fmt: skip
        (root / "config.json").write_text(json.dumps(config))
        results = {}
        for tool in args.tools:
            command = [sys.executable, str(HERE), "--run-tool", tool, "--config", str(root / "config.json")]
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                print(f"{tool}: failed\n{completed.stderr[-2000:]}")
                continue
            results[tool] = json.loads(completed.stdout.strip().splitlines()[-1])
            print(json.dumps(results[tool]))
        if "deepseg" not in results:
            return
        reference = np.load(root / "deepseg.npy")
        base, base_cold = results["deepseg"]["seconds"], results["deepseg"]["seconds_first_run"]
        print("\nwarm: model already loaded (DeepSeg's cache, or the same nnUNetPredictor object); cold: load + run")
        header = f"{'tool':14s} {'warm s':>8s} {'x':>6s} {'cold s':>8s} {'x':>6s} {'peak RSS MB':>12s}"
        print(f"{header}  Dice vs DeepSeg per label")
        for tool, figures in results.items():
            scores = dice_per_label(np.load(root / f"{tool}.npy"), reference)
            warm, cold = figures["seconds"], figures["seconds_first_run"]
            print(
                f"{tool:14s} {warm:8.1f} {warm / base:6.2f} {cold:8.1f} {cold / base_cold:6.2f} "
                f"{figures['peak_rss_mb']:12.0f}  {scores}"
            )


if __name__ == "__main__":
    main()
