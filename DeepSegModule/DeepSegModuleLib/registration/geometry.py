"""Image grids in physical space, and the coordinate frames the optimiser works in.

Arrays are in Slicer's (k, j, i) order; a grid's ``ijk_to_ras`` maps homogeneous (i, j, k, 1) to
RAS mm. ``torch.nn.functional.grid_sample`` wants normalised (x, y, z) = (i, j, k) coordinates in
[-1, 1] (``align_corners=True``: -1 and 1 are the centres of the first and last voxels) for an
input of shape (N, C, D, H, W) = (N, C, k, j, i). Everything that converts between these lives here.

The optimiser works in a *normalised physical* frame ``u = (p - centre) / scale`` (RAS mm shifted
to the fixed image's centre and divided by its half extent), shared by fixed and moving images:
rotations stay rotations, translations are O(1) numbers, and rotations turn about the fixed image
centre, so rotation and translation parameters are decoupled and equally scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Grid:
    """A voxel grid placed in RAS space.

    Attributes:
        shape: Array shape in (k, j, i) order.
        ijk_to_ras: 4x4 float64 matrix from homogeneous (i, j, k, 1) to RAS mm.
    """

    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    @property
    def size_ijk(self) -> np.ndarray:
        """Voxel counts along i, j, k."""
        return np.array(self.shape[::-1], dtype=np.float64)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm (column norms of the direction-scaled matrix)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def center_ras(self) -> np.ndarray:
        """RAS position of the grid's geometric centre."""
        return (self.ijk_to_ras @ np.append((self.size_ijk - 1) / 2, 1.0))[:3]

    @property
    def half_extent_mm(self) -> float:
        """Half of the largest physical extent (corner-voxel centre to corner-voxel centre)."""
        return float(max(((self.size_ijk - 1) * self.spacing).max() / 2, 1.0))

    def ijk_to_normalized(self) -> np.ndarray:
        """4x4 matrix from (i, j, k, 1) to grid_sample's normalised (x, y, z, 1)."""
        denominators = np.maximum(self.size_ijk - 1, 1)
        matrix = np.eye(4)
        matrix[:3, :3] = np.diag(2.0 / denominators)
        matrix[:3, 3] = -1.0
        return matrix

    def ras_to_normalized(self) -> np.ndarray:
        """4x4 matrix from RAS mm to grid_sample's normalised (x, y, z)."""
        return self.ijk_to_normalized() @ np.linalg.inv(self.ijk_to_ras)

    def coarsened(self, target_spacing_mm: float, min_size: int = 8) -> tuple[Grid, np.ndarray]:
        """A grid over the same physical extent with voxels of about ``target_spacing_mm``.

        The first and last voxel centres stay where they are (the ``align_corners=True``
        convention), so ``F.interpolate(..., align_corners=True)`` moves an image between the
        two grids, and the orientation is kept. An axis never gets finer than it was.

        Args:
            target_spacing_mm: Wanted voxel size.
            min_size: Fewest voxels along an axis (unless the axis had fewer).

        Returns:
            The new grid and the per-axis (i, j, k) factor ``new spacing / old spacing``.
        """
        sizes = self.size_ijk
        spacing = self.spacing
        target = np.maximum(target_spacing_mm, spacing)
        new_sizes = np.maximum(np.round((sizes - 1) * spacing / target) + 1, np.minimum(sizes, min_size))
        factors = np.where(new_sizes > 1, (sizes - 1) / np.maximum(new_sizes - 1, 1), 1.0)
        matrix = self.ijk_to_ras.copy()
        matrix[:3, :3] = matrix[:3, :3] * factors[None, :]
        new_shape = tuple(int(n) for n in new_sizes[::-1])
        return Grid(new_shape, matrix), factors  # type: ignore[arg-type]


@dataclass(frozen=True)
class NormalizedFrame:
    """The optimiser's frame ``u = (p_ras - centre) / scale`` (see the module docstring)."""

    centre: np.ndarray
    scale: float

    def u_to_ras(self) -> np.ndarray:
        """4x4 matrix from u to RAS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] *= self.scale
        matrix[:3, 3] = self.centre
        return matrix

    def ras_to_u(self) -> np.ndarray:
        """4x4 matrix from RAS mm to u."""
        return np.linalg.inv(self.u_to_ras())

    def linear_to_ras(self, matrix_u: np.ndarray, translation_u: np.ndarray) -> np.ndarray:
        """The RAS 4x4 of ``u -> matrix_u @ u + translation_u``."""
        transform_u = np.eye(4)
        transform_u[:3, :3] = matrix_u
        transform_u[:3, 3] = translation_u
        return self.u_to_ras() @ transform_u @ self.ras_to_u()

    def linear_from_ras(self, matrix_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`linear_to_ras`: (matrix_u, translation_u)."""
        transform_u = self.ras_to_u() @ matrix_ras @ self.u_to_ras()
        return transform_u[:3, :3].copy(), transform_u[:3, 3].copy()


def grid_points(
    grid: Grid, to_frame: np.ndarray, device: torch.device, k_range: tuple[int, int] | None = None
) -> torch.Tensor:
    """Voxel centres of ``grid`` mapped by ``to_frame @ ijk_to_ras``.

    Args:
        grid: The voxel grid.
        to_frame: 4x4 matrix from RAS to the wanted frame (identity for RAS itself).
        device: Torch device.
        k_range: Optional slab ``(k_start, k_stop)``, to bound memory on large grids.

    Returns:
        ``(k, j, i, 3)`` float32 tensor of frame coordinates.
    """
    k_start, k_stop = k_range if k_range is not None else (0, grid.shape[0])
    matrix = torch.as_tensor(to_frame @ grid.ijk_to_ras, dtype=torch.float32, device=device)
    k, j, i = torch.meshgrid(
        torch.arange(k_start, k_stop, device=device, dtype=torch.float32),
        torch.arange(grid.shape[1], device=device, dtype=torch.float32),
        torch.arange(grid.shape[2], device=device, dtype=torch.float32),
        indexing="ij",
    )
    ijk = torch.stack((i, j, k), dim=-1)
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]


def gaussian_smooth(volume: torch.Tensor, sigma_kji: tuple[float, float, float] | np.ndarray) -> torch.Tensor:
    """Separable Gaussian smoothing of a ``(N, C, D, H, W)`` tensor, per-axis sigma in voxels.

    Written here rather than taken from MONAI's ``GaussianFilter`` because a zero sigma on one
    axis (an already-coarse slice direction) must simply skip that axis.
    """
    result = volume
    for axis, sigma in enumerate(sigma_kji):
        sigma = float(sigma)
        if sigma <= 0.05 or volume.shape[2 + axis] < 2:
            continue
        radius = max(math.ceil(3.0 * sigma), 1)
        offsets = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        channels = result.shape[1]
        weight = kernel.reshape(shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        # F.pad lists the last axis first.
        pad[2 * (2 - axis)] = radius
        pad[2 * (2 - axis) + 1] = radius
        result = F.conv3d(F.pad(result, pad, mode="replicate"), weight, groups=channels)
    return result


def resample_to_grid(
    volume: torch.Tensor, grid: Grid, target: Grid, factors: np.ndarray, smooth: bool = True
) -> torch.Tensor:
    """Move a ``(1, C, D, H, W)`` image from ``grid`` to its coarsened ``target`` grid.

    Smoothing with sigma = half the downsampling factor (in source voxels) before interpolation
    keeps coarse levels free of aliasing.
    """
    if tuple(volume.shape[2:]) == tuple(target.shape):
        return volume
    if smooth:
        sigma_kji = 0.5 * np.where(factors > 1, factors, 0.0)[::-1]
        volume = gaussian_smooth(volume, sigma_kji)
    return F.interpolate(volume, size=target.shape, mode="trilinear", align_corners=True)


def apply_matrix(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``points @ matrix[:3, :3].T + matrix[:3, 3]`` for (..., 3) points and a 4x4 (or 3x4) matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def rotation_matrix(rotation_vector: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of an axis-angle vector (radians), differentiable, via the matrix exponential."""
    zero = rotation_vector.new_zeros(())
    rx, ry, rz = rotation_vector
    skew = torch.stack(
        (
            torch.stack((zero, -rz, ry)),
            torch.stack((rz, zero, -rx)),
            torch.stack((-ry, rx, zero)),
        )
    )
    return torch.linalg.matrix_exp(skew)
