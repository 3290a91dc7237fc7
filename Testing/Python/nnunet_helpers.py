"""A tiny nnU-Net v2 trained-model folder, built and briefly trained by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [8, 16, 32],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2],
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


def plans(spacing_zyx=(3.0, 1.0, 1.0), patch_size=(16, 32, 32), normalization="CTNormalization") -> dict:
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset999_Spheres",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing_zyx),
        "original_median_shape_after_transp": [32, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": [32, 64, 64],
                "spacing": list(spacing_zyx),
                "normalization_schemes": [normalization],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": ARCHITECTURE,
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 400.0,
                "mean": 180.0,
                "median": 180.0,
                "min": -50.0,
                "percentile_00_5": -40.0,
                "percentile_99_5": 360.0,
                "std": 110.0,
            }
        },
    }


DATASET = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "bright": 1, "dim": 2},
    "numTraining": 8,
    "file_ending": ".nii.gz",
}


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
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    kwargs = dict(ARCHITECTURE["arch_kwargs"])
    kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    network = PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=False, **kwargs)
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


def write_nnunet_folder(
    root: Path, network: torch.nn.Module, folds=("0",), plans_overrides: dict | None = None
) -> Path:
    """Writes <root>/Dataset999_Spheres/nnUNetTrainer__nnUNetPlans__3d_fullres as nnU-Net would."""
    folder = root / "Dataset999_Spheres" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    plan = plans(**(plans_overrides or {}))
    (folder / "plans.json").write_text(json.dumps(plan, indent=1))
    (folder / "dataset.json").write_text(json.dumps(DATASET, indent=1))
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
                "configuration": "3d_fullres",
                "fold": int(fold) if fold.isdigit() else fold,
                "dataset_json": DATASET,
                "device": "cpu",
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
