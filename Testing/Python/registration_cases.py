"""What the registration tests build their known answers from: the MNI152 T1 (shipped inside nilearn, no download)
moved through a known mapping ``psi`` (fixed RAS point -> moving RAS point), and helpers that check the engine's
``phi`` with scipy's interpolation, independently of the engine's own warping code."""

from __future__ import annotations


import numpy as np
import torch
from scipy import ndimage

# One thread: the CI machine's two cores are shared, and OpenMP threads that spin-wait on a busy
# machine made these tests ten times slower with two threads than with one.
torch.set_num_threads(1)

FIXED_SPACING_MM = 3.0


# ----------------------------------------------------------------------------------------------
# Helpers (independent of the engine)


def rotation_xyz(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def voxel_centres_ras(shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """``(k, j, i, 3)`` RAS positions of a grid's voxel centres."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ ijk_to_ras.T)[..., :3]


def sample_at_ras(volume_kji: np.ndarray, ijk_to_ras: np.ndarray, points_ras: np.ndarray, order: int = 1) -> np.ndarray:
    """scipy interpolation of a (k, j, i) volume at RAS points (zero outside, like grid_sample's zeros)."""
    ijk = (points_ras - ijk_to_ras[:3, 3]) @ np.linalg.inv(ijk_to_ras[:3, :3]).T
    coordinates = np.stack([ijk[..., 2], ijk[..., 1], ijk[..., 0]])
    return ndimage.map_coordinates(volume_kji, coordinates, order=order, mode="grid-constant", cval=0.0)


def apply_4x4(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def rotation_angle_degrees(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))


def fixed_grid_over(mni: dict[str, np.ndarray], spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned grid of ``spacing`` mm over the template's field of view."""
    extent = (np.array(mni["image"].shape[::-1]) - 1) * np.linalg.norm(mni["ijk_to_ras"][:3, :3], axis=0)
    sizes = (np.floor(extent / spacing) + 1).astype(int)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([spacing] * 3)
    ijk_to_ras[:3, 3] = mni["ijk_to_ras"][:3, 3]
    return tuple(int(n) for n in sizes[::-1]), ijk_to_ras  # type: ignore[return-value]


def make_known_case(mni: dict[str, np.ndarray], linear: np.ndarray, displacement_mm: float, seed: int) -> dict:
    """Fixed image = template sampled at ``psi(p) = linear @ (p + d_true(p))`` on a 3 mm grid."""
    shape, fixed_ijk_to_ras = fixed_grid_over(mni, FIXED_SPACING_MM)
    points = voxel_centres_ras(shape, fixed_ijk_to_ras)
    displacement = np.zeros(shape + (3,))
    if displacement_mm > 0:
        rng = np.random.default_rng(seed)
        coarse = rng.normal(size=(5, 5, 5, 3))
        zoom = np.array(shape) / 5.0
        displacement = np.stack(
            [ndimage.zoom(coarse[..., c], zoom, order=3)[: shape[0], : shape[1], : shape[2]] for c in range(3)],
            axis=-1,
        )
        displacement *= displacement_mm / np.linalg.norm(displacement, axis=-1).max()
    truth = apply_4x4(linear, points + displacement)
    fixed = sample_at_ras(mni["image"], mni["ijk_to_ras"], truth, order=3).astype(np.float32)
    fixed_brain = sample_at_ras(mni["brain"].astype(np.float32), mni["ijk_to_ras"], truth, order=0) > 0.5
    return {
        "fixed": fixed,
        "fixed_ijk_to_ras": fixed_ijk_to_ras,
        "points": points,
        "truth": truth,
        "brain": fixed_brain,
        "true_displacement": displacement,
    }


def brain_centre(mni: dict[str, np.ndarray]) -> np.ndarray:
    points = voxel_centres_ras(mni["brain"].shape, mni["ijk_to_ras"])
    return points[mni["brain"]].mean(axis=0)


def linear_about(centre: np.ndarray, matrix: np.ndarray, translation: np.ndarray) -> np.ndarray:
    transform = np.eye(4)
    transform[:3, :3] = matrix
    transform[:3, 3] = centre - matrix @ centre + translation
    return transform


def phantom(points_ras: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric object defined in RAS mm (so any grid can sample it exactly)."""
    blobs = [
        ((0.0, 0.0, 0.0), (14.0, 10.0, 8.0), 1.0),
        ((9.0, 6.0, -4.0), (4.0, 5.0, 3.0), 0.8),
        ((-8.0, 4.0, 6.0), (3.0, 3.0, 6.0), -0.6),
        ((2.0, -9.0, 3.0), (5.0, 2.5, 3.0), 0.7),
    ]
    value = np.zeros(points_ras.shape[:-1])
    for centre, widths, weight in blobs:
        offsets = (points_ras - np.array(centre)) / np.array(widths)
        value += weight * np.exp(-0.5 * np.sum(offsets**2, axis=-1))
    return value.astype(np.float32)


def oblique_grid(spacing, degrees, shape_kji, centre_ras) -> np.ndarray:
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation_xyz(degrees) @ np.diag(spacing)
    middle = (np.array(shape_kji[::-1]) - 1) / 2
    ijk_to_ras[:3, 3] = np.array(centre_ras) - ijk_to_ras[:3, :3] @ middle
    return ijk_to_ras
