"""What a registration produces and how it is applied: :class:`RegistrationResult` (the linear and deformable parts,
their inverse, points mapped, other images resampled) and the slab-wise resampling at full resolution."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .deformable import integrate_velocity_ras
from .geometry import Grid, SliceStack, grid_points, sample
from .presets import RegistrationConfig
from .quality import jacobian_determinant
from .results import QualityReport

# Voxels per slab when resampling at full resolution (bounds memory on 512^3 grids).
_SLAB_VOXELS = 4_000_000


@dataclass
class RegistrationResult:
    """Output of :func:`register`.

    Transform conventions (all RAS mm; "fixed" and "moving" are the two input images):

    * ``fixed_to_moving_ras`` (4x4, float64) is the linear part ``A``: it maps a fixed-space RAS
      point to the moving-space RAS point the resampled image samples. It is the *resampling*
      transform, i.e. Slicer's "from parent" transform and what ITK writes to ``.h5``/``.tfm``
      (after the bridge converts RAS to LPS).
    * ``displacement_ras`` (``(k, j, i, 3)`` float32 on the fixed grid, ``None`` without a
      deformable stage) is the deformable part ``d``, applied in fixed space *before* ``A``:

          phi(p) = A @ (p + d(p))          p a fixed RAS point, phi(p) the moving RAS point

      In Slicer terms: the moving volume under a linear transform node holding ``A``
      ("from parent") which is itself under a grid transform node holding ``d``; or as one grid
      transform, :meth:`total_displacement_ras`, ``D(p) = phi(p) - p``.
    * ``d`` is exp(v) for a stationary velocity field ``v``; :meth:`inverse_displacement_ras` is
      exp(-v) (``p -> p + d_inv(p)`` undoes ``p -> p + d(p)``) and
      :meth:`inverse_total_displacement_ras` gives ``phi^-1`` as a field on the moving grid.

    Attributes:
        fixed_to_moving_ras: Linear part ``A`` (4x4).
        displacement_ras: Deformable part ``d`` or ``None``.
        fixed_shape: (k, j, i) shape of the fixed grid.
        fixed_ijk_to_ras: Fixed grid matrix (the grid of every field and output image).
        moving_shape: (k, j, i) shape of the moving grid.
        moving_ijk_to_ras: Moving grid matrix.
        resampled_moving: Moving image resampled by ``phi`` onto the fixed grid (float32,
            trilinear, zero outside the moving image).
        propagated_labels: Moving labels resampled by ``phi`` (nearest neighbour), or ``None``.
        quality: Quality report.
        config: The parameters used.
        device: Where it ran.
    """

    fixed_to_moving_ras: np.ndarray
    displacement_ras: np.ndarray | None
    fixed_shape: tuple[int, int, int]
    fixed_ijk_to_ras: np.ndarray
    moving_shape: tuple[int, int, int]
    moving_ijk_to_ras: np.ndarray
    resampled_moving: np.ndarray
    propagated_labels: np.ndarray | None
    quality: QualityReport
    config: RegistrationConfig
    device: str
    _velocity_ras: np.ndarray | None = field(default=None, repr=False)
    _velocity_grid: Grid | None = field(default=None, repr=False)

    @property
    def moving_to_fixed_ras(self) -> np.ndarray:
        """Inverse of the linear part (4x4)."""
        return np.linalg.inv(self.fixed_to_moving_ras)

    def total_displacement_ras(self) -> np.ndarray:
        """``D(p) = A @ (p + d(p)) - p`` on the fixed grid, ``(k, j, i, 3)`` float32 RAS mm.

        One grid transform ("from parent") holding ``D`` maps points exactly as the linear and
        deformable parts together.
        """
        fixed_grid = Grid(self.fixed_shape, self.fixed_ijk_to_ras)
        linear = self.fixed_to_moving_ras
        # D(p) = (A - I) p + t + A_3x3 d(p): the first part straight from the voxel indices.
        linear_minus_identity = linear - np.diag([1.0, 1.0, 1.0, 0.0])
        matrix = torch.as_tensor(linear[:3, :3], dtype=torch.float32)
        total = np.empty((*self.fixed_shape, 3), dtype=np.float32)
        for start, stop in _slabs(fixed_grid):
            slab = grid_points(fixed_grid, linear_minus_identity, torch.device("cpu"), (start, stop))
            if self.displacement_ras is not None:
                slab = slab + torch.as_tensor(self.displacement_ras[start:stop]) @ matrix.T
            total[start:stop] = slab.numpy()
        return total

    def jacobian_determinant(self) -> np.ndarray | None:
        """det J of the deformable part ``p -> p + d(p)`` on the fixed grid (a volume to show), or ``None``."""
        if self.displacement_ras is None:
            return None
        return jacobian_determinant(self.displacement_ras, self.fixed_ijk_to_ras)

    def transform_points_ras(self, points_ras: np.ndarray) -> np.ndarray:
        """Map fixed-space RAS points to moving space with ``phi`` (``d`` is trilinear, zero outside the grid).

        Args:
            points_ras: ``(n, 3)`` RAS mm.

        Returns:
            ``(n, 3)`` moving-space RAS mm.
        """
        points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
        displaced = points.copy()
        if self.displacement_ras is not None:
            displaced = displaced + _sample_field(
                self.displacement_ras, Grid(self.fixed_shape, self.fixed_ijk_to_ras), points
            )
        return displaced @ self.fixed_to_moving_ras[:3, :3].T + self.fixed_to_moving_ras[:3, 3]

    def inverse_displacement_ras(self) -> np.ndarray | None:
        """``d_inv = exp(-v)`` on the fixed grid: ``p -> p + d_inv(p)`` inverts ``p -> p + d(p)``.

        Returns:
            ``(k, j, i, 3)`` float32 RAS mm, or ``None`` without a deformable stage.
        """
        if self._velocity_ras is None or self._velocity_grid is None:
            return None
        velocity = torch.as_tensor(-self._velocity_ras).permute(3, 0, 1, 2)[None]
        field_ras = integrate_velocity_ras(velocity, self._velocity_grid, self.config.integration_steps)
        return field_to_grid(field_ras, self._velocity_grid, Grid(self.fixed_shape, self.fixed_ijk_to_ras))

    def inverse_total_displacement_ras(
        self, grid_shape: tuple[int, int, int] | None = None, grid_ijk_to_ras: np.ndarray | None = None
    ) -> np.ndarray:
        """``phi^-1(q) - q`` with ``phi^-1(q) = A^-1 q + d_inv(A^-1 q)``, on a grid in moving space.

        Args:
            grid_shape: (k, j, i) shape of the output grid; default the moving grid.
            grid_ijk_to_ras: Its 4x4 matrix; default the moving grid's.

        Returns:
            ``(k, j, i, 3)`` float32 RAS mm (the "from parent" field of the moving-to-fixed transform).
        """
        grid = Grid(
            tuple(grid_shape) if grid_shape is not None else self.moving_shape,  # type: ignore[arg-type]
            np.asarray(grid_ijk_to_ras if grid_ijk_to_ras is not None else self.moving_ijk_to_ras, dtype=np.float64),
        )
        inverse_linear = self.moving_to_fixed_ras
        inverse_field = self.inverse_displacement_ras()
        fixed_grid = Grid(self.fixed_shape, self.fixed_ijk_to_ras)
        total = np.empty((*grid.shape, 3), dtype=np.float32)
        for start, stop in _slabs(grid):
            points = grid_points(grid, np.eye(4), torch.device("cpu"), (start, stop)).numpy().astype(np.float64)
            fixed_points = points @ inverse_linear[:3, :3].T + inverse_linear[:3, 3]
            if inverse_field is not None:
                fixed_points = fixed_points + _sample_field(
                    inverse_field, fixed_grid, fixed_points.reshape(-1, 3)
                ).reshape(fixed_points.shape)
            total[start:stop] = fixed_points - points
        return total

    def resample(self, moving_array: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """Resample another image on the moving grid (e.g. a second channel) onto the fixed grid with ``phi``.

        Args:
            moving_array: ``(k, j, i)`` array on the moving grid.
            interpolation: ``"linear"`` or ``"nearest"`` (labels).

        Returns:
            ``(k, j, i)`` array on the fixed grid (float32 for linear, input dtype for nearest).
        """
        moving_array = np.asarray(moving_array)
        if moving_array.shape != tuple(self.moving_shape):
            raise ValueError(
                f"expected an array of the moving grid's shape {self.moving_shape}, got {moving_array.shape}"
            )
        mode = {"linear": "bilinear", "nearest": "nearest"}[interpolation]
        moving_tensor = torch.as_tensor(moving_array.astype(np.float32))[None, None]
        displacement = None if self.displacement_ras is None else torch.as_tensor(self.displacement_ras)
        (warped,) = resample_full(
            [(moving_tensor, mode)],
            Grid(self.moving_shape, self.moving_ijk_to_ras),
            Grid(self.fixed_shape, self.fixed_ijk_to_ras),
            self.fixed_to_moving_ras,
            displacement,
        )
        return warped.astype(moving_array.dtype) if interpolation == "nearest" else warped


def field_to_grid(field_ras: torch.Tensor, source: Grid, target: Grid) -> np.ndarray:
    """A ``(1, 3, ...)`` RAS field on a coarsened grid, interpolated to the full grid, as (k, j, i, 3)."""
    if tuple(field_ras.shape[2:]) != tuple(target.shape):
        # Coarsened grids keep the corner voxel centres, so align_corners interpolation is exact in space.
        field_ras = F.interpolate(field_ras, size=target.shape, mode="trilinear", align_corners=True)
    return field_ras[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)


def resample_full(
    volumes: list[tuple[torch.Tensor, str]],
    moving_grid: Grid,
    fixed_grid: Grid,
    fixed_to_moving_ras: np.ndarray,
    displacement_ras: torch.Tensor | None,
) -> list[np.ndarray]:
    """Sample each ``(volume, mode)`` of the moving grid at ``A @ (p + d(p))`` for every fixed voxel ``p``.

    Slab by slab; the sampling points are computed once per slab for all volumes (the image and
    its labels).
    """
    device = volumes[0][0].device
    # Fixed voxel -> moving sampling coordinates: one matrix for the voxel indices (see grid_points),
    # plus the displacement through its 3x3 part.
    ras_to_normalized = moving_grid.ras_to_normalized() @ fixed_to_moving_ras
    displacement_to_normalized = torch.as_tensor(ras_to_normalized[:3, :3], dtype=torch.float32, device=device)
    samplers = [(SliceStack(volume) if SliceStack.suits(volume) else volume, mode) for volume, mode in volumes]
    outputs = [np.empty(fixed_grid.shape, dtype=np.float32) for _ in volumes]
    for k_start, k_stop in _slabs(fixed_grid):
        with torch.no_grad():
            normalized = grid_points(fixed_grid, ras_to_normalized, device, (k_start, k_stop))
            if displacement_ras is not None:
                normalized = normalized + displacement_ras[k_start:k_stop].to(device) @ displacement_to_normalized.T
            for (sampler, mode), output in zip(samplers, outputs):
                output[k_start:k_stop] = sample(sampler, normalized[None], mode)[0, 0].cpu().numpy()
    return outputs


def _slabs(grid: Grid) -> list[tuple[int, int]]:
    """(start, stop) ranges along k of about ``_SLAB_VOXELS`` voxels each."""
    slab = max(1, _SLAB_VOXELS // (grid.shape[1] * grid.shape[2]))
    return [(start, min(start + slab, grid.shape[0])) for start in range(0, grid.shape[0], slab)]


def _sample_field(field_ras: np.ndarray, grid: Grid, points_ras: np.ndarray) -> np.ndarray:
    """Trilinear value of a (k, j, i, 3) field at RAS points; zero outside the grid (as ITK does)."""
    field_tensor = torch.as_tensor(np.asarray(field_ras, dtype=np.float32)).permute(3, 0, 1, 2)[None]
    normalized = points_ras @ grid.ras_to_normalized()[:3, :3].T + grid.ras_to_normalized()[:3, 3]
    normalized_tensor = torch.as_tensor(normalized, dtype=torch.float32).reshape(1, -1, 1, 1, 3)
    values = F.grid_sample(field_tensor, normalized_tensor, mode="bilinear", padding_mode="zeros", align_corners=True)
    return values[0, :, :, 0, 0].T.double().numpy()
