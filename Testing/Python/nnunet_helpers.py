"""nnU-Net v2 trained-model folders built from parameterised plans: the tests' tiny network (trained briefly
by the tests themselves) and, for the benchmark, nnU-Net's default 3d_fullres network with untrained weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def plain_unet_architecture(
    features: Sequence[int] = (8, 16, 32),
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    strides: Sequence[Sequence[int]] | None = None,
    dimensions: int = 3,
) -> dict:
    """A plans ``architecture`` entry for dynamic_network_architectures' PlainConvUNet, as nnU-Net writes it.

    Defaults per stage: 3x3x3 kernels, stride 1 in the first stage and 2 after it, two convolutions per
    stage. ``features=(32, 64, 128, 256, 320, 320)`` with a 128^3 patch is nnU-Net's own 3d_fullres
    network for a CT at 1.5 mm (about 31M parameters).
    """
    stages = len(features)
    cube, one = [3] * dimensions, [1] * dimensions
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": [int(f) for f in features],
            "conv_op": f"torch.nn.modules.conv.Conv{dimensions}d",
            "kernel_sizes": [list(k) for k in kernel_sizes] if kernel_sizes else [cube] * stages,
            "strides": [list(s) for s in strides] if strides else [one] + [[2] * dimensions] * (stages - 1),
            "n_conv_per_stage": [2] * stages,
            "n_conv_per_stage_decoder": [2] * (stages - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dimensions}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


# The tests' tiny network: three stages, in-plane-only first stage for 3 x 1 x 1 mm voxels.
ARCHITECTURE = plain_unet_architecture(
    (8, 16, 32), kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]]
)

PHANTOM_INTENSITIES = {
    "max": 400.0, "mean": 180.0, "median": 180.0, "min": -50.0,
    "percentile_00_5": -40.0, "percentile_99_5": 360.0, "std": 110.0,
}  # fmt: skip

# Foreground statistics of a typical abdominal CT (HU), for CTNormalization.
CT_INTENSITIES = {
    "max": 3000.0, "mean": 60.0, "median": 50.0, "min": -1024.0,
    "percentile_00_5": -990.0, "percentile_99_5": 1500.0, "std": 250.0,
}  # fmt: skip


def plans(
    spacing_zyx=(3.0, 1.0, 1.0),
    patch_size=(16, 32, 32),
    normalization="CTNormalization",
    *,
    architecture: dict | None = None,
    intensities: dict | None = None,
    dataset_name: str = "Dataset999_Spheres",
    median_shape_zyx=(32, 64, 64),
) -> dict:
    """An nnU-Net v2 ``plans.json`` with one 3d_fullres configuration (the tests' tiny network by default)."""
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing_zyx),
        "original_median_shape_after_transp": list(median_shape_zyx),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": list(median_shape_zyx),
                "spacing": list(spacing_zyx),
                "normalization_schemes": [normalization],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": architecture or ARCHITECTURE,
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(intensities or PHANTOM_INTENSITIES)},
    }


def plans_2d(in_plane_spacing=(1.0, 1.0), patch_size=(32, 32), **overrides) -> dict:
    """:func:`plans` with a ``2d`` configuration (2D PlainConvUNet, the slice axis first) beside 3d_fullres."""
    plan = plans(**overrides)
    fullres = plan["configurations"]["3d_fullres"]
    plan["configurations"]["2d"] = {
        **fullres,
        "data_identifier": "nnUNetPlans_2d",
        "batch_size": 12,
        "patch_size": list(patch_size),
        "median_image_size_in_voxels": list(fullres["median_image_size_in_voxels"][1:]),
        "spacing": list(in_plane_spacing),
        "architecture": plain_unet_architecture((8, 16, 32), dimensions=2),
    }
    return plan


def dataset_json(labels: dict[str, int] | int, channel: str = "CT", training_cases: int = 8) -> dict:
    """An nnU-Net v2 ``dataset.json``; ``labels`` as nnU-Net writes them, or a class count (background + N-1)."""
    if isinstance(labels, int):
        labels = {"background": 0, **{f"structure {value}": value for value in range(1, labels)}}
    return {
        "channel_names": {"0": channel},
        "labels": dict(labels),
        "numTraining": training_cases,
        "file_ending": ".nii.gz",
    }


DATASET = dataset_json({"background": 0, "bright": 1, "dim": 2})


def network_from_plans(
    plan: dict, classes: int, seed: int = 0, configuration: str = "3d_fullres", input_channels: int = 1
) -> torch.nn.Module:
    """A configuration's network of ``plan`` with (untrained, seeded) weights, as nnU-Net builds it for inference."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    kwargs = dict(plan["configurations"][configuration]["architecture"]["arch_kwargs"])
    if kwargs["conv_op"].endswith("2d"):
        kwargs.update(conv_op=torch.nn.Conv2d, norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU)
    else:
        kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    return PlainConvUNet(input_channels=input_channels, num_classes=classes, deep_supervision=False, **kwargs).eval()


def phantom_patch(generator: np.random.Generator, shape=(16, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A bright (label 1) and a dim (label 2) blob in noise, in (z, y, x) voxels of 3 x 1 x 1 mm."""
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1) * np.array([3.0, 1, 1])
    extent = np.array(shape) * np.array([3.0, 1, 1])
    image = np.full(shape, 20.0)
    labels = np.zeros(shape, np.int64)
    for value, intensity in ((1, 320.0), (2, 160.0)):
        center = generator.uniform(0.15, 0.85, 3) * extent
        mask = np.linalg.norm(coords - center, axis=-1) <= generator.uniform(5, 11)
        image[mask] = intensity
        labels[mask] = value
    image += generator.normal(0, 15, shape)
    return image.astype(np.float32), labels


def train_tiny_network(steps: int = 50) -> torch.nn.Module:
    network = network_from_plans(plans(), classes=3).train()
    generator = np.random.default_rng(0)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    properties = plans()["foreground_intensity_properties_per_channel"]["0"]
    for _ in range(steps):
        images, targets = zip(*(phantom_patch(generator) for _ in range(2)))
        x = np.clip(np.stack(images), properties["percentile_00_5"], properties["percentile_99_5"])
        x = torch.tensor((x - properties["mean"]) / properties["std"], dtype=torch.float32)[:, None]
        loss = torch.nn.functional.cross_entropy(network(x), torch.tensor(np.stack(targets)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


def train_tiny_2d_network(steps: int = 25) -> torch.nn.Module:
    """The 2d configuration's network of :func:`plans_2d`, trained on slices of the phantom (about 3 s)."""
    network = network_from_plans(plans_2d(), classes=3, configuration="2d").train()
    generator = np.random.default_rng(1)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-2)
    properties = plans()["foreground_intensity_properties_per_channel"]["0"]
    for _ in range(steps):
        image, target = phantom_patch(generator, shape=(4, 32, 32))
        x = np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"])
        x = torch.tensor((x - properties["mean"]) / properties["std"], dtype=torch.float32)[:, None]
        loss = torch.nn.functional.cross_entropy(network(x), torch.tensor(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


def write_nnunet_folder(
    root: Path,
    network: torch.nn.Module,
    folds=("0",),
    plans_overrides: dict | None = None,
    dataset: dict | None = None,
    *,
    plan: dict | None = None,
    configuration: str = "3d_fullres",
    mirror_axes: Sequence[int] | None = None,
) -> Path:
    """Writes <root>/<dataset name>/nnUNetTrainer__nnUNetPlans__<configuration> as nnU-Net would.

    ``plans_overrides`` are :func:`plans` arguments (or ``plan`` is the whole plans); ``dataset`` replaces the
    tests' :data:`DATASET`; ``mirror_axes`` are the checkpoint's (default: every spatial axis).
    """
    plan = plan or plans(**(plans_overrides or {}))
    dataset = dataset or DATASET
    if mirror_axes is None:
        mirror_axes = tuple(range(len(plan["configurations"][configuration]["patch_size"])))
    folder = root / plan["dataset_name"] / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plan, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    for index, fold in enumerate(folds):
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        state = {k: v.clone() for k, v in network.state_dict().items()}
        if index:  # a second fold: slightly different weights, as another training would give
            with torch.no_grad():
                for value in state.values():
                    if value.is_floating_point():
                        value.mul_(1.0 + 0.05 * index)
        checkpoint = {
            "network_weights": state,
            "optimizer_state": {},
            "grad_scaler_state": None,
            "logging": {"ema_fg_dice": [np.float64(0.5), np.float64(0.7)], "epoch_end_timestamps": [1.0, 2.0]},
            "_best_ema": np.float64(0.7),
            "current_epoch": 2,
            "init_args": {
                "plans": plan,
                "configuration": configuration,
                "fold": int(fold) if fold.isdigit() else fold,
                "dataset_json": dataset,
                "device": "cpu",
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": tuple(mirror_axes),
        }
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
