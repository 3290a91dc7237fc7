"""Pairwise image registration by instance optimisation on the compute device; :func:`register` chains the stages.

Stages (each optional, chained): initial alignment (centres of mass or geometric centres), rigid,
affine, and a diffeomorphic deformable stage (stationary velocity field integrated by scaling and
squaring), each over a multi-resolution pyramid: the linear stages by resilient propagation
(Rprop) on one fixed sample of each level, the deformable stage by Adam in the spirit of
ConvexAdam. Each pyramid level ends once it has converged, so easy problems and small images take
few iterations. Pure torch/MONAI/numpy: no MRML; images cross the boundary as Slicer-ordered
(k, j, i) arrays plus a 4x4 ``ijk_to_ras``.

Where each stage lives (as FireANTs splits its registration by stage):

* :mod:`.initialization` -- inputs checked, automatic masks, intensities scaled, initial alignment, the overlap
  and modality checks;
* :mod:`.pyramid` -- both images on the device at every spacing a stage asks for;
* :mod:`.linear` -- the rigid and affine stages; :mod:`.optimizers` -- Rprop, Adam and the convergence schedule;
* :mod:`.deformable` -- the velocity field;
* :mod:`.resampling` -- the :class:`RegistrationResult` and the resampling at full resolution;
* :mod:`.quality`, :mod:`.results` -- the quality report.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..devices import resolve_device
from .deformable import integrate_velocity_ras, optimise_deformable
from .geometry import Grid
from .initialization import (
    automatic_masks,
    check_image,
    check_mask,
    check_overlap,
    initial_translation_u,
    mask_tensor,
    modality_correlations,
    normalize_intensity,
    search_initial_pose,
    warn_modality,
    MODALITY_CORRELATION_THRESHOLD,
)
from .linear import optimise_linear
from .presets import RegistrationConfig, get_preset, with_overrides
from .pyramid import Pyramid, RegistrationCancelled, threads_for
from .quality import deformation_quality, dice_per_label, landmark_errors, peak_memory
from .resampling import RegistrationResult, field_to_grid, resample_full
from .results import QualityReport

__all__ = ["RegistrationCancelled", "RegistrationResult", "register"]

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


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
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    inputs = _Inputs.checked(
        config, fixed, fixed_ijk_to_ras, moving, moving_ijk_to_ras, fixed_mask, moving_mask, fixed_labels,
        moving_labels, fixed_landmarks_ras, moving_landmarks_ras,
    )  # fmt: skip
    pyramid = Pyramid(
        config=config,
        device=torch_device,
        fixed_grid=inputs.fixed_grid,
        moving_grid=inputs.moving_grid,
        fixed=torch.as_tensor(normalize_intensity(fixed, inputs.fixed_mask))[None, None].to(torch_device),
        moving=torch.as_tensor(normalize_intensity(moving, inputs.moving_mask))[None, None].to(torch_device),
        fixed_mask=mask_tensor(inputs.fixed_mask, torch_device),
        moving_mask=mask_tensor(inputs.moving_mask, torch_device),
        progress=progress,
        cancel=cancel,
    )
    report = QualityReport(notes=inputs.notes)
    matrix_u, translation_u = _initial_alignment(pyramid, initial_fixed_to_moving_ras, report)
    matrix_u, translation_u = _linear_stages(pyramid, matrix_u, translation_u, report)
    fixed_to_moving_ras = pyramid.frame.linear_to_ras(matrix_u, translation_u)
    velocity_ras, velocity_grid, displacement_ras = _deformable_stage(pyramid, matrix_u, translation_u, report)
    resampled, propagated = _resampling_stage(
        pyramid, moving, moving_labels, fixed_to_moving_ras, displacement_ras, report
    )
    result = RegistrationResult(
        fixed_to_moving_ras=fixed_to_moving_ras,
        displacement_ras=displacement_ras,
        fixed_shape=inputs.fixed_grid.shape,
        fixed_ijk_to_ras=inputs.fixed_grid.ijk_to_ras,
        moving_shape=inputs.moving_grid.shape,
        moving_ijk_to_ras=inputs.moving_grid.ijk_to_ras,
        resampled_moving=resampled,
        propagated_labels=propagated,
        quality=report,
        config=config,
        device=str(torch_device),
        _velocity_ras=velocity_ras,
        _velocity_grid=velocity_grid,
    )
    _quality_stage(result, pyramid, inputs, fixed_labels, fixed_landmarks_ras, moving_landmarks_ras)
    report.runtime_s["total"] = time.perf_counter() - started
    report.peak_memory_mb, report.peak_memory_kind = peak_memory(torch_device)
    return result


@dataclass
class _Inputs:
    """The checked inputs: grids, the masks (the user's or automatic), and the notes on automatic masks."""

    fixed_grid: Grid
    moving_grid: Grid
    fixed_mask: np.ndarray | None
    moving_mask: np.ndarray | None
    notes: list[str]

    @classmethod
    def checked(
        cls, config: RegistrationConfig, fixed: np.ndarray, fixed_ijk_to_ras: np.ndarray, moving: np.ndarray,
        moving_ijk_to_ras: np.ndarray, fixed_mask: np.ndarray | None, moving_mask: np.ndarray | None,
        fixed_labels: np.ndarray | None, moving_labels: np.ndarray | None, fixed_landmarks_ras: np.ndarray | None,
        moving_landmarks_ras: np.ndarray | None,
    ) -> _Inputs:  # fmt: skip
        """Raises ValueError naming what to fix."""
        fixed_grid = check_image("fixed", fixed, fixed_ijk_to_ras)
        moving_grid = check_image("moving", moving, moving_ijk_to_ras)
        fixed_mask_array = check_mask("fixed_mask", fixed_mask, fixed_grid)
        moving_mask_array = check_mask("moving_mask", moving_mask, moving_grid)
        notes: list[str] = []
        # For each side the user gave no mask: a user's mask of the head's brain and an automatic template mask
        # work together, as the linear stages sample inside both masks (docs/registration.md has the figures).
        if config.automatic_masks and (fixed_mask_array is None or moving_mask_array is None):
            sides = tuple(name for name, given in (("fixed", fixed_mask_array), ("moving", moving_mask_array))
                          if given is None)  # fmt: skip
            automatic, notes = automatic_masks(fixed, fixed_grid, moving, moving_grid, sides)
            fixed_mask_array = automatic.get("fixed", fixed_mask_array)
            moving_mask_array = automatic.get("moving", moving_mask_array)
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
        return cls(fixed_grid, moving_grid, fixed_mask_array, moving_mask_array, notes)


def _initial_alignment(
    pyramid: Pyramid, initial_fixed_to_moving_ras: np.ndarray | None, report: QualityReport
) -> tuple[np.ndarray, np.ndarray]:
    """The starting linear transform (u frame), checked for overlap and, for cross-correlation, for one modality."""
    config = pyramid.config
    stage_start = time.perf_counter()
    pyramid.report_progress("initial alignment", 0.0)
    if initial_fixed_to_moving_ras is not None:
        initial = np.asarray(initial_fixed_to_moving_ras, dtype=np.float64)
        if initial.shape != (4, 4) or not np.all(np.isfinite(initial)) or abs(np.linalg.det(initial[:3, :3])) < 1e-9:
            raise ValueError("initial_fixed_to_moving_ras must be an invertible 4x4 matrix")
        matrix_u, translation_u = pyramid.frame.linear_from_ras(initial)
    else:
        matrix_u, translation_u = np.eye(3), initial_translation_u(pyramid)
    check_overlap(pyramid, matrix_u, translation_u)
    linear_uses_ncc = config.linear_similarity == "ncc" and bool({"rigid", "affine"} & set(config.stages))
    deformable_uses_ncc = config.deformable_similarity == "lncc" and "deformable" in config.stages
    if linear_uses_ncc or deformable_uses_ncc:
        highest, lowest = modality_correlations(pyramid, matrix_u, translation_u)
        if highest < MODALITY_CORRELATION_THRESHOLD or -lowest > highest:
            warn_modality(report, highest, lowest, extracted=bool(report.notes))
    if (initial_fixed_to_moving_ras is None and config.initial_pose_search and config.initial_alignment != "none"
            and pyramid.fixed_mask is None and pyramid.moving_mask is None and linear_uses_ncc):  # fmt: skip
        matrix_u, translation_u, note = search_initial_pose(pyramid, matrix_u, translation_u)
        if note:
            report.notes.append(note)
    pyramid.report_progress("initial alignment", 1.0)
    report.runtime_s["initial alignment"] = time.perf_counter() - stage_start
    return matrix_u, translation_u


def _linear_stages(
    pyramid: Pyramid, matrix_u: np.ndarray, translation_u: np.ndarray, report: QualityReport
) -> tuple[np.ndarray, np.ndarray]:
    for stage in ("rigid", "affine"):
        if stage in pyramid.config.stages:
            stage_start = time.perf_counter()
            with threads_for(pyramid.device, pyramid.config.linear_max_points):
                matrix_u, translation_u, report.final_similarity[stage] = optimise_linear(
                    pyramid, stage, matrix_u, translation_u
                )
            report.runtime_s[stage] = time.perf_counter() - stage_start
    return matrix_u, translation_u


def _deformable_stage(
    pyramid: Pyramid, matrix_u: np.ndarray, translation_u: np.ndarray, report: QualityReport
) -> tuple[np.ndarray | None, Grid | None, np.ndarray | None]:
    """The velocity (RAS, on its control grid), that grid, and the displacement on the fixed grid; Nones without
    a deformable stage."""
    if "deformable" not in pyramid.config.stages:
        return None, None, None
    stage_start = time.perf_counter()
    velocity_u, velocity_grid, report.final_similarity["deformable"] = optimise_deformable(
        pyramid, matrix_u, translation_u
    )
    # u-space components to RAS mm: the frame only scales.
    velocity_ras_tensor = velocity_u * pyramid.frame.scale
    field_ras = integrate_velocity_ras(velocity_ras_tensor, velocity_grid, pyramid.config.integration_steps)
    displacement_ras = field_to_grid(field_ras, velocity_grid, pyramid.fixed_grid)
    velocity_ras = velocity_ras_tensor[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)
    report.runtime_s["deformable"] = time.perf_counter() - stage_start
    return velocity_ras, velocity_grid, displacement_ras


def _resampling_stage(
    pyramid: Pyramid, moving: np.ndarray, moving_labels: np.ndarray | None, fixed_to_moving_ras: np.ndarray,
    displacement_ras: np.ndarray | None, report: QualityReport,
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """The moving image (linear) and its labels (nearest) on the fixed grid."""
    device = pyramid.device
    stage_start = time.perf_counter()
    pyramid.report_progress("resampling", 0.0)
    displacement_tensor = None if displacement_ras is None else torch.as_tensor(displacement_ras).to(device)
    to_resample = [(torch.as_tensor(np.asarray(moving, dtype=np.float32))[None, None].to(device), "bilinear")]
    if moving_labels is not None:
        labels = np.asarray(moving_labels)
        to_resample.append((torch.as_tensor(labels.astype(np.float32))[None, None].to(device), "nearest"))
    resampled, *rest = resample_full(
        to_resample, pyramid.moving_grid, pyramid.fixed_grid, fixed_to_moving_ras, displacement_tensor
    )
    propagated = rest[0].astype(labels.dtype) if moving_labels is not None else None
    pyramid.report_progress("resampling", 1.0)
    report.runtime_s["resampling"] = time.perf_counter() - stage_start
    return resampled, propagated


def _quality_stage(
    result: RegistrationResult, pyramid: Pyramid, inputs: _Inputs, fixed_labels: np.ndarray | None,
    fixed_landmarks_ras: np.ndarray | None, moving_landmarks_ras: np.ndarray | None,
) -> None:  # fmt: skip
    """Folding inside the fixed mask (or foreground), Dice of the propagated labels, landmark errors."""
    report, config = result.quality, pyramid.config
    stage_start = time.perf_counter()
    if result.displacement_ras is not None:
        if inputs.fixed_mask is not None:
            quality_mask, report.quality_mask = inputs.fixed_mask, "fixed mask"
        else:
            quality_mask, report.quality_mask = (pyramid.fixed[0, 0] > 0.1).cpu().numpy(), "fixed foreground"
        for key, value in deformation_quality(result.displacement_ras, result.fixed_ijk_to_ras, quality_mask).items():
            setattr(report, key, value)
        if report.folding_percent is not None and report.folding_percent > config.folding_warning_percent:
            message = (
                f"the deformation folds in {report.folding_percent:.2f}% of the {report.quality_mask} "
                f"(det J <= 0); increase regularization_weight or velocity_smoothing_vox"
            )
            warnings.warn(message, UserWarning, stacklevel=3)
            report.warnings.append(message)
    if fixed_labels is not None and result.propagated_labels is not None:
        report.dice = dice_per_label(np.asarray(fixed_labels), result.propagated_labels)
        report.mean_dice = float(np.mean(list(report.dice.values()))) if report.dice else None
    if fixed_landmarks_ras is not None and moving_landmarks_ras is not None:
        mapped = result.transform_points_ras(np.asarray(fixed_landmarks_ras, dtype=np.float64))
        report.landmark_error_mm = landmark_errors(fixed_landmarks_ras, moving_landmarks_ras, mapped)
    report.iterations = pyramid.iterations
    report.runtime_s["quality"] = time.perf_counter() - stage_start
