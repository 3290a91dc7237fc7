"""Synthetic volumes and tiny models with known answers, for the segmentation engine's tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from DeepSegModuleLib.segmentation.volume import VolumeArray

torch.set_num_threads(2)


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def oblique_grid(
    shape_kji: tuple[int, int, int] = (14, 40, 34),
    spacing_ijk: tuple[float, float, float] = (1.1, 0.8, 3.0),
    origin_ras: tuple[float, float, float] = (12.0, -30.0, 7.0),
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An oblique, anisotropic grid whose voxel axes are permuted and flipped relative to RAS.

    i runs roughly posterior, j roughly left, k roughly superior, each tilted by a few degrees.
    """
    axes = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T  # columns: i->P, j->L, k->S
    direction = rotation("z", 17.0) @ rotation("x", 11.0) @ axes
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction * np.asarray(spacing_ijk)
    ijk_to_ras[:3, 3] = origin_ras
    return shape_kji, ijk_to_ras


def ras_of_voxels(shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS coordinates of every voxel centre, array of shape (*shape_kji, 3)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape_kji), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk @ ijk_to_ras.T)[..., :3]


def sphere_volume(
    center_ras: np.ndarray, radius: float, grid: tuple | None = None, inside: float = 300.0, outside: float = 0.0
) -> tuple[VolumeArray, np.ndarray]:
    """A volume with a bright sphere at a physical position; returns it and the true mask (k, j, i)."""
    shape, ijk_to_ras = grid or oblique_grid()
    ras = ras_of_voxels(shape, ijk_to_ras)
    mask = np.linalg.norm(ras - np.asarray(center_ras), axis=-1) <= radius
    array = np.where(mask, inside, outside).astype(np.float32)
    return VolumeArray(array, ijk_to_ras), mask


def grid_center(grid: tuple) -> np.ndarray:
    shape, ijk_to_ras = grid
    center_ijk = (np.array(shape[::-1], dtype=float) - 1) / 2
    return (ijk_to_ras @ np.append(center_ijk, 1.0))[:3]


class Thresholder(torch.nn.Module):
    """Two classes: logits favour class 1 where the intensity is above ``threshold``."""

    def __init__(self, threshold: float = 150.0, classes: int = 2) -> None:
        super().__init__()
        self.threshold = threshold
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, :1] - self.threshold) / 50.0
        outputs = [-score, score]
        for _ in range(self.classes - 2):
            outputs.append(torch.full_like(score, -100.0))
        return torch.cat(outputs, dim=1)


class EdgeAlongFirstAxis(torch.nn.Module):
    """Class 1 where the intensity drops by more than 100 towards +axis 0 of the network input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = x[:, :1]
        following = torch.cat([channel[:, :, 1:], channel[:, :, -1:]], dim=2)
        score = (channel - following - 100.0) / 20.0
        return torch.cat([-score, score], dim=1)


def write_torchscript_model(
    folder: Path, module: torch.nn.Module, card_overrides: dict | None = None, name: str = "model.ts"
) -> Path:
    """Saves ``module`` as TorchScript with a DeepSeg card; returns the card path."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(folder / name))
    card = {
        "deepseg_model_card": 1,
        "name": "Bright sphere",
        "weights": name,
        "inputs": [{"name": "CT", "modality": "CT", "normalization": {"mode": "none"}}],
        "orientation": "RAS",
        "spacing": [1.5, 1.5, 1.5],
        "patch_size": [16, 16, 16],
        "overlap": 0.25,
        "activation": "softmax",
        "labels": [
            {
                "value": 1,
                "name": "Sphere",
                "color": [0.9, 0.2, 0.1],
                "terminology": {
                    "category": "SCT^49755003^Morphologically Altered Structure",
                    "type": "SCT^4147007^Mass",
                },
            }
        ],
    }
    card.update(card_overrides or {})
    card_path = folder / "deepseg.json"
    card_path.write_text(json.dumps(card), encoding="utf-8")
    return card_path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)
