"""Pairwise image registration by instance optimisation on the compute device.

Stages (each optional, chained): initial alignment (centres of mass or geometric centres), rigid,
affine, and a diffeomorphic deformable stage (stationary velocity field integrated by scaling and
squaring, MONAI ``DVF2DDF``), each over a multi-resolution pyramid, optimised with Adam in the
spirit of ConvexAdam. Pure torch/MONAI/numpy: no MRML; images cross the boundary as Slicer-ordered
(k, j, i) arrays plus a 4x4 ``ijk_to_ras``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import (
    Grid,
    NormalizedFrame,
    apply_matrix,
    gaussian_smooth,
    grid_points,
    resample_to_grid,
    rotation_matrix,
)
from .presets import RegistrationConfig, get_preset, with_overrides
from .quality import (
    QualityReport,
    deformation_quality,
    dice_per_label,
    jacobian_determinant,
    landmark_errors,
    peak_memory,
)
from .similarity import (
    WeightedLocalNCCLoss,
    WeightedMutualInformationLoss,
    bending_energy,
    diffusion_energy,
    weighted_ncc_loss,
    weighted_pearson,
)

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]

# Below this Pearson correlation (inside both foregrounds, after initial alignment) two images
# are unlikely to share a modality, and NCC would pull them apart rather than together.
_MODALITY_CORRELATION_THRESHOLD = 0.2
# Least share of the fixed foreground that must land inside the moving image before optimising.
_MIN_OVERLAP_FRACTION = 0.05
# Voxels per slab when resampling at full resolution (bounds memory on 512^3 grids).
_SLAB_VOXELS = 4_000_000


class RegistrationCancelled(Exception):
    """Raised when the caller's ``cancel`` check returned True; nothing was produced."""


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
        total = np.empty((*self.fixed_shape, 3), dtype=np.float32)
        for start, stop in _slabs(fixed_grid):
            points = grid_points(fixed_grid, np.eye(4), torch.device("cpu"), (start, stop)).numpy().astype(np.float64)
            displaced = points if self.displacement_ras is None else points + self.displacement_ras[start:stop]
            total[start:stop] = displaced @ linear[:3, :3].T + linear[:3, 3] - points
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
        field_ras = _integrate_velocity_ras(velocity, self._velocity_grid, self.config.integration_steps)
        return _field_to_grid(field_ras, self._velocity_grid, Grid(self.fixed_shape, self.fixed_ijk_to_ras))

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
        warped = _resample_full(
            moving_tensor,
            Grid(self.moving_shape, self.moving_ijk_to_ras),
            Grid(self.fixed_shape, self.fixed_ijk_to_ras),
            self.fixed_to_moving_ras,
            displacement,
            mode,
        )
        return warped.astype(moving_array.dtype) if interpolation == "nearest" else warped


def register(
    fixed: np.ndarray,
    fixed_ijk_to_ras: np.ndarray,
    moving: np.ndarray,
    moving_ijk_to_ras: np.ndarray,
    config: RegistrationConfig | str = "deformable fast",
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    fixed_landmarks_ras: np.ndarray | None = None,
    moving_landmarks_ras: np.ndarray | None = None,
    initial_fixed_to_moving_ras: np.ndarray | None = None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    **overrides: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed: ``(k, j, i)`` fixed image (Slicer's ``arrayFromVolume`` order).
        fixed_ijk_to_ras: Its 4x4 IJK-to-RAS matrix.
        moving: ``(k, j, i)`` moving image.
        moving_ijk_to_ras: Its 4x4 IJK-to-RAS matrix.
        config: A :class:`RegistrationConfig` or a preset name ("rigid", "affine",
            "deformable fast", "deformable accurate", "multimodal").
        fixed_mask: Optional ``(k, j, i)`` mask on the fixed grid: only these voxels drive the
            similarity; the quality report is taken inside it.
        moving_mask: Optional mask on the moving grid.
        fixed_labels: Optional label map on the fixed grid (for Dice).
        moving_labels: Optional label map on the moving grid, propagated to the fixed grid.
        fixed_landmarks_ras: Optional ``(n, 3)`` RAS fiducials in the fixed image (for the error report).
        moving_landmarks_ras: The corresponding ``(n, 3)`` RAS fiducials in the moving image.
        initial_fixed_to_moving_ras: Optional starting linear transform (replaces initial alignment).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        progress: Optional ``progress(stage, fraction)`` callback, ``fraction`` in [0, 1] per stage.
        cancel: Optional callable returning True to stop; raises :class:`RegistrationCancelled`.
        **overrides: Fields of :class:`RegistrationConfig` replacing the preset's.

    Returns:
        The :class:`RegistrationResult`.

    Raises:
        ValueError: 2D or degenerate input, empty masks, mismatched shapes, images that do not
            overlap, unknown preset/parameter; the message says what to do.
        RegistrationCancelled: ``cancel()`` returned True.
    """
    started = time.perf_counter()
    if isinstance(config, str):
        config = get_preset(config, **overrides)
    elif overrides:
        config = with_overrides(config, **overrides)
    torch_device = _resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)

    fixed_grid = _check_image("fixed", fixed, fixed_ijk_to_ras)
    moving_grid = _check_image("moving", moving, moving_ijk_to_ras)
    fixed_mask_array = _check_mask("fixed_mask", fixed_mask, fixed_grid)
    moving_mask_array = _check_mask("moving_mask", moving_mask, moving_grid)
    if fixed_labels is not None and np.asarray(fixed_labels).shape != fixed_grid.shape:
        raise ValueError(f"fixed_labels must have the fixed image's shape {fixed_grid.shape}")
    if moving_labels is not None and np.asarray(moving_labels).shape != moving_grid.shape:
        raise ValueError(f"moving_labels must have the moving image's shape {moving_grid.shape}")
    if (fixed_landmarks_ras is None) != (moving_landmarks_ras is None):
        raise ValueError("give both fixed_landmarks_ras and moving_landmarks_ras, or neither")
    if fixed_landmarks_ras is not None and moving_landmarks_ras is not None:
        fixed_points, moving_points = np.asarray(fixed_landmarks_ras), np.asarray(moving_landmarks_ras)
        if fixed_points.ndim != 2 or fixed_points.shape[1:] != (3,) or fixed_points.shape != moving_points.shape:
            raise ValueError(
                "fixed_landmarks_ras and moving_landmarks_ras must be corresponding (n, 3) arrays of RAS points, "
                f"got {fixed_points.shape} and {moving_points.shape}"
            )

    run = _Run(
        config=config,
        device=torch_device,
        fixed_grid=fixed_grid,
        moving_grid=moving_grid,
        fixed=torch.as_tensor(_normalize_intensity(fixed, fixed_mask_array))[None, None].to(torch_device),
        moving=torch.as_tensor(_normalize_intensity(moving, moving_mask_array))[None, None].to(torch_device),
        fixed_mask=_mask_tensor(fixed_mask_array, torch_device),
        moving_mask=_mask_tensor(moving_mask_array, torch_device),
        progress=progress,
        cancel=cancel,
    )
    report = QualityReport()

    stage_start = time.perf_counter()
    run.report_progress("initial alignment", 0.0)
    if initial_fixed_to_moving_ras is not None:
        initial = np.asarray(initial_fixed_to_moving_ras, dtype=np.float64)
        if initial.shape != (4, 4) or not np.all(np.isfinite(initial)) or abs(np.linalg.det(initial[:3, :3])) < 1e-9:
            raise ValueError("initial_fixed_to_moving_ras must be an invertible 4x4 matrix")
        matrix_u, translation_u = run.frame.linear_from_ras(initial)
    else:
        matrix_u, translation_u = np.eye(3), run.initial_translation_u()
    run.check_overlap(matrix_u, translation_u)
    linear_uses_ncc = config.linear_similarity == "ncc" and bool({"rigid", "affine"} & set(config.stages))
    deformable_uses_ncc = config.deformable_similarity == "lncc" and "deformable" in config.stages
    if linear_uses_ncc or deformable_uses_ncc:
        correlation = run.foreground_correlation(matrix_u, translation_u)
        if correlation < _MODALITY_CORRELATION_THRESHOLD:
            message = (
                f"the fixed and moving images look like different modalities (intensity correlation "
                f"{correlation:.2f} after initial alignment) but the similarity is cross-correlation; "
                f"use the 'multimodal' preset (mutual information) for e.g. CT to MR or T1 to T2/FLAIR"
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            report.warnings.append(message)
    run.report_progress("initial alignment", 1.0)
    report.runtime_s["initial alignment"] = time.perf_counter() - stage_start

    for stage in ("rigid", "affine"):
        if stage in config.stages:
            stage_start = time.perf_counter()
            matrix_u, translation_u, report.final_similarity[stage] = run.optimise_linear(
                stage, matrix_u, translation_u
            )
            report.runtime_s[stage] = time.perf_counter() - stage_start

    fixed_to_moving_ras = run.frame.linear_to_ras(matrix_u, translation_u)
    velocity_ras = velocity_grid = None
    displacement_ras = None
    if "deformable" in config.stages:
        stage_start = time.perf_counter()
        velocity_u, velocity_grid, report.final_similarity["deformable"] = run.optimise_deformable(
            matrix_u, translation_u
        )
        # u-space components to RAS mm: the frame only scales.
        velocity_ras_tensor = velocity_u * run.frame.scale
        field_ras = _integrate_velocity_ras(velocity_ras_tensor, velocity_grid, config.integration_steps)
        displacement_ras = _field_to_grid(field_ras, velocity_grid, fixed_grid)
        velocity_ras = velocity_ras_tensor[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)
        report.runtime_s["deformable"] = time.perf_counter() - stage_start

    stage_start = time.perf_counter()
    run.report_progress("resampling", 0.0)
    displacement_tensor = None if displacement_ras is None else torch.as_tensor(displacement_ras).to(torch_device)
    resampled = _resample_full(
        torch.as_tensor(np.asarray(moving, dtype=np.float32))[None, None].to(torch_device),
        moving_grid,
        fixed_grid,
        fixed_to_moving_ras,
        displacement_tensor,
        "bilinear",
    )
    propagated = None
    if moving_labels is not None:
        labels = np.asarray(moving_labels)
        propagated = _resample_full(
            torch.as_tensor(labels.astype(np.float32))[None, None].to(torch_device),
            moving_grid,
            fixed_grid,
            fixed_to_moving_ras,
            displacement_tensor,
            "nearest",
        ).astype(labels.dtype)
    run.report_progress("resampling", 1.0)
    report.runtime_s["resampling"] = time.perf_counter() - stage_start

    result = RegistrationResult(
        fixed_to_moving_ras=fixed_to_moving_ras,
        displacement_ras=displacement_ras,
        fixed_shape=fixed_grid.shape,
        fixed_ijk_to_ras=fixed_grid.ijk_to_ras,
        moving_shape=moving_grid.shape,
        moving_ijk_to_ras=moving_grid.ijk_to_ras,
        resampled_moving=resampled,
        propagated_labels=propagated,
        quality=report,
        config=config,
        device=str(torch_device),
        _velocity_ras=velocity_ras,
        _velocity_grid=velocity_grid,
    )

    stage_start = time.perf_counter()
    if displacement_ras is not None:
        if fixed_mask_array is not None:
            quality_mask, report.quality_mask = fixed_mask_array, "fixed mask"
        else:
            quality_mask, report.quality_mask = _foreground(run.fixed), "fixed foreground"
        for key, value in deformation_quality(displacement_ras, fixed_grid.ijk_to_ras, quality_mask).items():
            setattr(report, key, value)
        if report.folding_percent is not None and report.folding_percent > config.folding_warning_percent:
            message = (
                f"the deformation folds in {report.folding_percent:.2f}% of the {report.quality_mask} "
                f"(det J <= 0); increase regularization_weight or velocity_smoothing_vox"
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            report.warnings.append(message)
    if fixed_labels is not None and propagated is not None:
        report.dice = dice_per_label(np.asarray(fixed_labels), propagated)
        report.mean_dice = float(np.mean(list(report.dice.values()))) if report.dice else None
    if fixed_landmarks_ras is not None and moving_landmarks_ras is not None:
        mapped = result.transform_points_ras(np.asarray(fixed_landmarks_ras, dtype=np.float64))
        report.landmark_error_mm = landmark_errors(fixed_landmarks_ras, moving_landmarks_ras, mapped)
    report.runtime_s["quality"] = time.perf_counter() - stage_start
    report.runtime_s["total"] = time.perf_counter() - started
    report.peak_memory_mb, report.peak_memory_kind = peak_memory(torch_device)
    return result


# --------------------------------------------------------------------------------------------
# The optimisation


@dataclass
class _Level:
    """One pyramid level: both images, their masks and grids at one spacing."""

    fixed: torch.Tensor
    fixed_weight: torch.Tensor
    fixed_grid: Grid
    moving: torch.Tensor
    moving_mask: torch.Tensor | None
    moving_grid: Grid


class _Run:
    """State of one registration: inputs on the device, the frame, the pyramid cache."""

    def __init__(
        self,
        config: RegistrationConfig,
        device: torch.device,
        fixed_grid: Grid,
        moving_grid: Grid,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_mask: torch.Tensor | None,
        moving_mask: torch.Tensor | None,
        progress: ProgressCallback | None,
        cancel: CancelCheck | None,
    ) -> None:
        self.config = config
        self.device = device
        self.fixed_grid = fixed_grid
        self.moving_grid = moving_grid
        self.fixed = fixed
        self.moving = moving
        self.fixed_mask = fixed_mask
        self.moving_mask = moving_mask
        self.progress = progress
        self.cancel = cancel
        self.frame = NormalizedFrame(fixed_grid.center_ras, fixed_grid.half_extent_mm)
        self._levels: dict[float, _Level] = {}
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)

    # -- bookkeeping

    def report_progress(self, stage: str, fraction: float) -> None:
        if self.cancel is not None and self.cancel():
            raise RegistrationCancelled(f"registration cancelled during {stage}")
        if self.progress is not None:
            self.progress(stage, float(min(max(fraction, 0.0), 1.0)))

    def level(self, spacing_mm: float) -> _Level:
        """The pyramid level at ``spacing_mm``, built once."""
        if spacing_mm not in self._levels:
            fixed_grid, fixed_factors = self.fixed_grid.coarsened(spacing_mm)
            moving_grid, moving_factors = self.moving_grid.coarsened(spacing_mm)
            fixed_weight = (
                resample_to_grid(self.fixed_mask, self.fixed_grid, fixed_grid, fixed_factors, smooth=False)
                if self.fixed_mask is not None
                else torch.ones((1, 1, *fixed_grid.shape), device=self.device)
            )
            moving_mask = (
                resample_to_grid(self.moving_mask, self.moving_grid, moving_grid, moving_factors, smooth=False)
                if self.moving_mask is not None
                else None
            )
            self._levels[spacing_mm] = _Level(
                fixed=resample_to_grid(self.fixed, self.fixed_grid, fixed_grid, fixed_factors),
                fixed_weight=fixed_weight,
                fixed_grid=fixed_grid,
                moving=resample_to_grid(self.moving, self.moving_grid, moving_grid, moving_factors),
                moving_mask=moving_mask,
                moving_grid=moving_grid,
            )
        return self._levels[spacing_mm]

    def _u_to_moving_normalized(self, level: _Level) -> torch.Tensor:
        matrix = level.moving_grid.ras_to_normalized() @ self.frame.u_to_ras()
        return torch.as_tensor(matrix, dtype=torch.float32, device=self.device)

    def _sample_moving(self, level: _Level, normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Moving intensities at normalised points ``(1, D, H, W, 3)`` and their validity weight."""
        values = F.grid_sample(level.moving, normalized, mode="bilinear", padding_mode="zeros", align_corners=True)
        inside = (normalized.abs() <= 1.0).all(dim=-1)[:, None].to(values.dtype)
        if level.moving_mask is not None:
            # A selection of samples, not something to optimise: no gradient pulls points into the mask.
            with torch.no_grad():
                inside = inside * F.grid_sample(
                    level.moving_mask, normalized, mode="bilinear", padding_mode="zeros", align_corners=True
                )
        return values, inside

    def _coarsest_level(self) -> _Level:
        spacings = []
        if {"rigid", "affine"} & set(self.config.stages):
            spacings.append(self.config.linear_spacings_mm[0])
        if "deformable" in self.config.stages:
            spacings.append(self.config.deformable_spacings_mm[0])
        return self.level(max(spacings))

    def _linear_samples(self, level: _Level, matrix_u: np.ndarray, translation_u: np.ndarray):
        points = grid_points(level.fixed_grid, self.frame.ras_to_u(), self.device)[None]
        mapped = apply_matrix(
            points, torch.as_tensor(np.c_[matrix_u, translation_u], dtype=torch.float32, device=self.device)
        )
        normalized = apply_matrix(mapped, self._u_to_moving_normalized(level))
        moving_values, inside = self._sample_moving(level, normalized)
        return moving_values, inside

    # -- initialisation and checks

    def initial_translation_u(self) -> np.ndarray:
        """Translation (u-frame) of the initial alignment."""
        mode = self.config.initial_alignment
        if mode == "none":
            return np.zeros(3)
        if mode == "geometric_center":
            offset_ras = self.moving_grid.center_ras - self.fixed_grid.center_ras
        else:
            offset_ras = self._center_of_mass(self._coarsest_level(), moving=True) - self._center_of_mass(
                self._coarsest_level(), moving=False
            )
        return offset_ras / self.frame.scale

    def _center_of_mass(self, level: _Level, moving: bool) -> np.ndarray:
        image = level.moving if moving else level.fixed
        grid = level.moving_grid if moving else level.fixed_grid
        weight = image.clamp_min(0.0)
        if moving and level.moving_mask is not None:
            weight = weight * level.moving_mask
        if not moving:
            weight = weight * level.fixed_weight
        total = float(weight.sum())
        if total <= 0:
            return grid.center_ras
        points = grid_points(grid, np.eye(4), self.device)
        return ((points * weight[0, 0, ..., None]).sum(dim=(0, 1, 2)) / total).double().cpu().numpy()

    def check_overlap(self, matrix_u: np.ndarray, translation_u: np.ndarray) -> None:
        """Raise when too little of the fixed foreground maps inside the moving image."""
        level = self._coarsest_level()
        _, inside = self._linear_samples(level, matrix_u, translation_u)
        foreground = level.fixed_weight * (level.fixed > 0.05).to(level.fixed.dtype)
        if float(foreground.sum()) == 0:
            foreground = level.fixed_weight
        fraction = float((inside * foreground).sum() / foreground.sum().clamp_min(1e-6))
        if fraction < _MIN_OVERLAP_FRACTION:
            raise ValueError(
                f"the fixed and moving images do not overlap in physical (RAS) space: only "
                f"{100 * fraction:.1f}% of the fixed image maps inside the moving image (or its mask). "
                f"Use initial_alignment='center_of_mass' or 'geometric_center', give "
                f"initial_fixed_to_moving_ras, or check that both volumes carry the right geometry"
            )

    def foreground_correlation(self, matrix_u: np.ndarray, translation_u: np.ndarray) -> float:
        """Pearson correlation inside both foregrounds, away from their edges, after initial alignment.

        The foreground edge is left out (eroded) because every modality drops to background
        there, which correlates even when the contrasts inside are opposite.
        """
        spacings = [self.config.linear_spacings_mm[-1]] if {"rigid", "affine"} & set(self.config.stages) else []
        if "deformable" in self.config.stages:
            spacings.append(self.config.deformable_spacings_mm[0])
        level = self.level(min(spacings))
        moving_values, inside = self._linear_samples(level, matrix_u, translation_u)
        foreground = inside * level.fixed_weight * (level.fixed > 0.05) * (moving_values > 0.05)
        interior = -F.max_pool3d(-foreground.to(level.fixed.dtype), kernel_size=5, stride=1, padding=2)
        if float(interior.sum()) < 64:
            interior = foreground.to(level.fixed.dtype)
        return weighted_pearson(level.fixed, moving_values, interior)

    # -- linear stages

    def optimise_linear(
        self, stage: str, matrix_u: np.ndarray, translation_u: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Rigid or affine stage over the linear pyramid; returns the new (matrix_u, translation_u, loss)."""
        config = self.config
        start_matrix = torch.as_tensor(matrix_u, dtype=torch.float32, device=self.device)
        translation = torch.tensor(translation_u, dtype=torch.float32, device=self.device, requires_grad=True)
        if stage == "rigid":
            rotation = torch.zeros(3, device=self.device, requires_grad=True)
            parameters = [rotation, translation]

            def current_matrix() -> torch.Tensor:
                # Rotation about the fixed centre, applied after whatever came before.
                return rotation_matrix(rotation) @ start_matrix
        else:
            matrix = start_matrix.clone().requires_grad_(True)
            parameters = [matrix, translation]

            def current_matrix() -> torch.Tensor:
                return matrix

        similarity = (
            WeightedMutualInformationLoss(config.mi_bins) if config.linear_similarity == "mi" else weighted_ncc_loss
        )
        total_iterations = max(sum(config.linear_iterations), 1)
        done = 0
        loss_value = float("nan")
        for level_index, (spacing, iterations) in enumerate(zip(config.linear_spacings_mm, config.linear_iterations)):
            level = self.level(spacing)
            points = grid_points(level.fixed_grid, self.frame.ras_to_u(), self.device).reshape(-1, 3)
            fixed_values = level.fixed.reshape(-1)
            fixed_weight = level.fixed_weight.reshape(-1)
            keep = fixed_weight > 0
            # Point, intensity and weight in one (N, 5) table: one gather per iteration instead of three.
            samples = torch.cat((points[keep], fixed_values[keep, None], fixed_weight[keep, None]), dim=1)
            to_normalized = self._u_to_moving_normalized(level)
            base_rate = config.linear_learning_rate * 0.5**level_index
            optimizer = torch.optim.Adam(parameters, lr=base_rate)
            for iteration in range(iterations):
                # Cosine decay inside a level: large steps to travel, small ones to settle.
                for group in optimizer.param_groups:
                    group["lr"] = base_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * iteration / iterations)))
                batch = samples
                if len(samples) > config.linear_max_points:
                    # Sampling with replacement: randperm of millions of points every iteration costs more
                    # than the similarity itself.
                    chosen = torch.randint(len(samples), (config.linear_max_points,), generator=self.generator)
                    batch = samples[chosen.to(self.device)]
                batch_points, batch_fixed, batch_weight = batch[:, :3], batch[:, 3], batch[:, 4]
                optimizer.zero_grad(set_to_none=True)
                mapped = batch_points @ current_matrix().T + translation
                normalized = apply_matrix(mapped, to_normalized).reshape(1, -1, 1, 1, 3)
                moving_values, inside = self._sample_moving(level, normalized)
                weight = batch_weight * inside.reshape(-1)
                if float(weight.sum()) < 1.0:
                    raise ValueError(
                        f"the {stage} registration lost all overlap between the images; check the input "
                        f"geometry or start from a better initial transform"
                    )
                loss = similarity(batch_fixed, moving_values.reshape(-1), weight)
                loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
                done += 1
                if iteration % 10 == 0:
                    self.report_progress(stage, done / total_iterations)
        self.report_progress(stage, 1.0)
        with torch.no_grad():
            final_matrix = current_matrix().double().cpu().numpy()
        return final_matrix, translation.detach().double().cpu().numpy(), loss_value

    # -- deformable stage

    def optimise_deformable(self, matrix_u: np.ndarray, translation_u: np.ndarray) -> tuple[torch.Tensor, Grid, float]:
        """Stationary velocity field over the deformable pyramid.

        The velocity lives on a *control grid* ``velocity_grid_factor`` times coarser than the
        level's image grid (integration is the costly part and the field is smooth anyway); the
        displacement is interpolated to the image grid to warp the moving image. Its components
        are in the u frame, so it survives changes of level unchanged; they are converted to
        control-grid voxels in (k, j, i) channel order (MONAI's convention) for integration by
        scaling and squaring (``DVF2DDF``) and for the regulariser.

        Returns:
            The smoothed velocity (u-frame components) on the finest control grid, that grid, and
            the final similarity.
        """
        config = self.config
        from monai.networks.blocks import DVF2DDF

        with warnings.catch_warnings():
            # MONAI warns that it falls back to torch's grid_sample; that is what we want.
            warnings.simplefilter("ignore")
            integrate = DVF2DDF(num_steps=config.integration_steps, mode="bilinear", padding_mode="border")
        regularizer = bending_energy if config.regularization == "bending" else diffusion_energy
        similarity = (
            WeightedMutualInformationLoss(config.mi_bins)
            if config.deformable_similarity == "mi"
            else WeightedLocalNCCLoss(config.lncc_kernel_size)
        )
        linear = torch.as_tensor(np.c_[matrix_u, translation_u], dtype=torch.float32, device=self.device)
        total_iterations = max(sum(config.deformable_iterations), 1)
        done = 0
        velocity: torch.Tensor | None = None
        loss_value = float("nan")
        control_grid: Grid | None = None
        for spacing, iterations in zip(config.deformable_spacings_mm, config.deformable_iterations):
            level = self.level(spacing)
            control_grid, _ = level.fixed_grid.coarsened(spacing * config.velocity_grid_factor, min_size=4)
            u_to_voxel, voxel_to_u = _velocity_conversions(control_grid, self.frame.scale, self.device)
            points = grid_points(level.fixed_grid, self.frame.ras_to_u(), self.device)[None]
            to_normalized = self._u_to_moving_normalized(level)
            # One matrix from displaced fixed points (u) to the moving image's sampling coordinates.
            linear_to_normalized = to_normalized[:3, :3] @ linear
            linear_to_normalized[:, 3] += to_normalized[:3, 3]
            image_shape = level.fixed_grid.shape
            if velocity is None:
                velocity = torch.zeros((1, 3, *control_grid.shape), device=self.device)
                if config.initializer is not None:
                    velocity = self._initial_velocity(level, linear, to_normalized, points, control_grid)
            else:
                velocity = F.interpolate(
                    velocity.detach(), size=control_grid.shape, mode="trilinear", align_corners=True
                )
            velocity.requires_grad_(True)
            base_rate = config.deformable_learning_rate_mm / self.frame.scale
            optimizer = torch.optim.Adam([velocity], lr=base_rate)
            sigma = (config.velocity_smoothing_vox,) * 3
            for iteration in range(iterations):
                for group in optimizer.param_groups:
                    group["lr"] = base_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * iteration / iterations)))
                optimizer.zero_grad(set_to_none=True)
                velocity_voxel = _change_components(gaussian_smooth(velocity, sigma), u_to_voxel)
                displacement_u = _change_components(integrate(velocity_voxel), voxel_to_u)
                # Control and image grids share their corner voxel centres: align_corners is exact.
                displacement_u = F.interpolate(displacement_u, size=image_shape, mode="trilinear", align_corners=True)
                normalized = apply_matrix(points + displacement_u.permute(0, 2, 3, 4, 1), linear_to_normalized)
                moving_values, inside = self._sample_moving(level, normalized)
                loss_similarity = similarity(level.fixed, moving_values, level.fixed_weight * inside)
                loss = loss_similarity + config.regularization_weight * regularizer(velocity_voxel)
                loss.backward()
                optimizer.step()
                loss_value = float(loss_similarity.detach())
                done += 1
                if iteration % 5 == 0:
                    self.report_progress("deformable", done / total_iterations)
        assert velocity is not None and control_grid is not None
        self.report_progress("deformable", 1.0)
        with torch.no_grad():
            smoothed = gaussian_smooth(velocity.detach(), (config.velocity_smoothing_vox,) * 3)
        return smoothed, control_grid, loss_value

    def _initial_velocity(
        self,
        level: _Level,
        linear: torch.Tensor,
        to_normalized: torch.Tensor,
        points: torch.Tensor,
        control_grid: Grid,
    ) -> torch.Tensor:
        """Velocity seeded by the TorchScript initialiser (first order: exp(v) ~ id + v for small v)."""
        config = self.config
        network = config.initializer
        if isinstance(network, (str, Path)):
            network = torch.jit.load(str(network), map_location=self.device)
        network.eval()
        with torch.no_grad():
            moving_on_fixed, _ = self._sample_moving(level, apply_matrix(apply_matrix(points, linear), to_normalized))
            fixed_input, moving_input = level.fixed, moving_on_fixed
            if config.initializer_input_shape is not None:
                target = tuple(int(n) for n in config.initializer_input_shape)
                fixed_input = F.interpolate(fixed_input, size=target, mode="trilinear", align_corners=True)
                moving_input = F.interpolate(moving_input, size=target, mode="trilinear", align_corners=True)
            displacement = network(fixed_input, moving_input)
            if not isinstance(displacement, torch.Tensor) or displacement.ndim != 5 or displacement.shape[:2] != (1, 3):
                raise ValueError(
                    "the initializer network must return a (1, 3, D, H, W) displacement tensor in voxels "
                    f"(k, j, i channel order), got {getattr(displacement, 'shape', type(displacement))}"
                )
            # The network's voxels span the level grid's extent; express its output on the control grid.
            displacement = displacement.float().to(self.device)
            network_shape = tuple(displacement.shape[2:])
            shape = tuple(control_grid.shape)
            if network_shape != shape:
                # Voxel units change with the grid: rescale each component by its axis' size ratio.
                ratio = torch.tensor(
                    [(n - 1) / max(m - 1, 1) for n, m in zip(shape, network_shape)], device=self.device
                ).reshape(1, 3, 1, 1, 1)
                displacement = F.interpolate(displacement.float(), size=shape, mode="trilinear", align_corners=True)
                displacement = displacement * ratio
            _, voxel_to_u = _velocity_conversions(control_grid, self.frame.scale, self.device)
            return _change_components(displacement, voxel_to_u)


# --------------------------------------------------------------------------------------------
# Helpers


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but PyTorch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(device)


def _check_image(name: str, array: np.ndarray, ijk_to_ras: np.ndarray) -> Grid:
    array = np.asarray(array)
    if array.ndim != 3 or min(array.shape) < 4:
        raise ValueError(
            f"the {name} image must be a 3D volume with at least 4 voxels along each axis, got shape "
            f"{array.shape}; 2D images and single slices cannot be registered here, stack slices into a volume first"
        )
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise ValueError(f"the {name} image must be numeric without NaN or infinite values")
    if float(array.max()) == float(array.min()):
        raise ValueError(f"the {name} image is constant; there is nothing to register")
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError(f"{name}_ijk_to_ras must be an invertible 4x4 IJK-to-RAS matrix, got {matrix!r}")
    return Grid(tuple(int(n) for n in array.shape), matrix)  # type: ignore[arg-type]


def _check_mask(name: str, mask: np.ndarray | None, grid: Grid) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != grid.shape:
        raise ValueError(f"{name} must have its image's shape {grid.shape}, got {mask.shape}")
    mask = mask > 0
    if not mask.any():
        raise ValueError(f"{name} is empty (no voxel set); pass a mask that covers the anatomy to register, or None")
    return mask


def _mask_tensor(mask: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if mask is None else torch.as_tensor(mask.astype(np.float32))[None, None].to(device)


def _normalize_intensity(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Robust [0, 1] scaling (0.5th-99.5th percentile) so MI bins and NCC see comparable ranges."""
    values = np.asarray(array, dtype=np.float32)
    sample = values[mask] if mask is not None else values.reshape(-1)
    step = max(sample.size // 1_000_000, 1)  # percentiles of a subsample are plenty and fast
    low, high = np.percentile(sample[::step], [0.5, 99.5])
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    return np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)


def _foreground(fixed_normalized: torch.Tensor) -> np.ndarray:
    """Fixed voxels that carry signal (for the Jacobian statistics when no mask was given)."""
    return (fixed_normalized[0, 0] > 0.1).cpu().numpy()


def _velocity_conversions(grid: Grid, frame_scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 matrices from u-frame components to voxel components in (k, j, i) order, and back."""
    ras_to_ijk = np.linalg.inv(grid.ijk_to_ras[:3, :3])
    u_to_kji = (ras_to_ijk * frame_scale)[::-1].copy()  # rows i, j, k -> k, j, i
    return (
        torch.as_tensor(u_to_kji, dtype=torch.float32, device=device),
        torch.as_tensor(np.linalg.inv(u_to_kji), dtype=torch.float32, device=device),
    )


def _change_components(field: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the vector channel of a ``(N, 3, D, H, W)`` field."""
    return torch.einsum("ab,nbdhw->nadhw", matrix, field)


def _integrate_velocity_ras(velocity_ras: torch.Tensor, grid: Grid, steps: int) -> torch.Tensor:
    """exp(v) by scaling and squaring for a ``(1, 3, D, H, W)`` RAS-mm velocity; returns RAS-mm displacement."""
    from monai.networks.blocks import DVF2DDF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        integrate = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")
    ras_to_voxel, voxel_to_ras = _velocity_conversions(grid, 1.0, velocity_ras.device)
    with torch.no_grad():
        return _change_components(integrate(_change_components(velocity_ras.float(), ras_to_voxel)), voxel_to_ras)


def _field_to_grid(field_ras: torch.Tensor, source: Grid, target: Grid) -> np.ndarray:
    """A ``(1, 3, ...)`` RAS field on a coarsened grid, interpolated to the full grid, as (k, j, i, 3)."""
    if tuple(field_ras.shape[2:]) != tuple(target.shape):
        # Coarsened grids keep the corner voxel centres, so align_corners interpolation is exact in space.
        field_ras = F.interpolate(field_ras, size=target.shape, mode="trilinear", align_corners=True)
    return field_ras[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)


def _resample_full(
    moving: torch.Tensor,
    moving_grid: Grid,
    fixed_grid: Grid,
    fixed_to_moving_ras: np.ndarray,
    displacement_ras: torch.Tensor | None,
    mode: str,
) -> np.ndarray:
    """Sample ``moving`` at ``A @ (p + d(p))`` for every fixed voxel ``p``, slab by slab."""
    device = moving.device
    to_normalized = torch.as_tensor(
        moving_grid.ras_to_normalized() @ fixed_to_moving_ras, dtype=torch.float32, device=device
    )
    output = np.empty(fixed_grid.shape, dtype=np.float32)
    for k_start, k_stop in _slabs(fixed_grid):
        points = grid_points(fixed_grid, np.eye(4), device, (k_start, k_stop))
        if displacement_ras is not None:
            points = points + displacement_ras[k_start:k_stop].to(device)
        normalized = apply_matrix(points, to_normalized)[None]
        with torch.no_grad():
            values = F.grid_sample(moving, normalized, mode=mode, padding_mode="zeros", align_corners=True)
        output[k_start:k_stop] = values[0, 0].cpu().numpy()
    return output


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
