"""Everything before the first optimisation step: the inputs checked, automatic masks for a brain-extracted image,
intensities scaled, the initial alignment (centres of mass or of the grids), and two checks that stop a doomed run
early (the images must overlap; cross-correlation needs one modality)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .geometry import Grid, apply_matrix, grid_points, sample
from .pyramid import FOREGROUND_LEVEL, Level, Pyramid, erode, fixed_foreground
from .results import QualityReport

# Below this Pearson correlation (inside both foregrounds, at the best shift around the initial
# alignment) two images are unlikely to share a modality, and NCC would pull them apart rather than
# together. See modality_correlations.
MODALITY_CORRELATION_THRESHOLD = 0.2
# Shifts searched by the modality check: up to this many voxels of the coarsest level along each
# axis, five steps per axis (+-3 voxels of 8 mm cover the offset of a centre-of-mass alignment
# between a cropped and a whole head); and the most foreground samples it correlates per shift.
_MODALITY_SEARCH_VOXELS = 3.0
_MODALITY_SAMPLES = 2000
# An image whose voxels lie within this fraction of its intensity range of its background level, over at
# least _EMPTY_MIN_SHARE of the grid, has an empty background (zeroed outside a brain extraction).
_EMPTY_LEVEL = 1e-3
_EMPTY_MIN_SHARE = 0.1
# An image with an empty background whose signal covers less than this fraction of the other
# image's (in mm^3) is taken as extracted from it (a brain against a head: about half).
_EXTRACTED_VOLUME_RATIO = 0.75
# Least share of the fixed foreground that must land inside the moving image before optimising.
_MIN_OVERLAP_FRACTION = 0.05


def check_image(name: str, array: np.ndarray, ijk_to_ras: np.ndarray) -> Grid:
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

def check_mask(name: str, mask: np.ndarray | None, grid: Grid) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != grid.shape:
        raise ValueError(f"{name} must have its image's shape {grid.shape}, got {mask.shape}")
    mask = mask > 0
    if not mask.any():
        raise ValueError(f"{name} is empty (no voxel set); pass a mask that covers the anatomy to register, or None")
    return mask

def _signal_region(array: np.ndarray) -> np.ndarray | None:
    """Voxels above an image's empty background, or None when it has none (noise fills an MRI's air)."""
    values = np.asarray(array, dtype=np.float32)
    sample = values.reshape(-1)[:: max(values.size // 1_000_000, 1)]
    # The background's level is the commonest of the low values, not the minimum: a cubic
    # resampling rings below zero next to the brain but leaves the far background empty.
    low, high = (float(v) for v in np.percentile(sample, [0.1, 99.9]))
    if not high > low:
        return None
    width = _EMPTY_LEVEL * (high - low)
    low_values = sample[(sample >= low) & (sample < low + 0.2 * (high - low))]
    if low_values.size == 0:
        return None
    level = low + (np.argmax(np.bincount(((low_values - low) / width).astype(np.int64))) + 0.5) * width
    signal = np.abs(values - level) > width
    if signal.mean() > 1.0 - _EMPTY_MIN_SHARE or not signal.any():
        return None
    return signal

def automatic_masks(
    fixed: np.ndarray, fixed_grid: Grid, moving: np.ndarray, moving_grid: Grid, sides: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Masks for an image that is empty outside an organ the other image shows with its surroundings.

    A brain-extracted template registered to a head with skull is the common case: unmasked, the
    similarity is best with the template's brain stretched over the whole head (for every tool we
    measured; docs/registration.md has the figures). Compared only inside the template's
    signal, the skull and scalp no longer pull it outwards. Only the image with an empty
    background and the clearly smaller signal gets a mask; two heads, or two templates, get none.

    Args:
        sides: The sides that may get a mask (``"fixed"``, ``"moving"``): those the user gave none.

    Returns:
        The masks made, by side, and a note for each for the quality report.
    """
    fixed_signal, moving_signal = _signal_region(fixed), _signal_region(moving)
    fixed_voxel_mm3 = abs(float(np.linalg.det(fixed_grid.ijk_to_ras[:3, :3])))
    moving_voxel_mm3 = abs(float(np.linalg.det(moving_grid.ijk_to_ras[:3, :3])))
    fixed_volume = fixed_voxel_mm3 * (fixed_signal.sum() if fixed_signal is not None else fixed.size)
    moving_volume = moving_voxel_mm3 * (moving_signal.sum() if moving_signal is not None else moving.size)
    masks: dict[str, np.ndarray] = {}
    notes = []
    for name, signal, volume, other_volume in (
        ("fixed", fixed_signal, fixed_volume, moving_volume),
        ("moving", moving_signal, moving_volume, fixed_volume),
    ):
        if name in sides and signal is not None and volume < _EXTRACTED_VOLUME_RATIO * other_volume:
            masks[name] = signal
            notes.append(
                f"the {name} image is empty outside {volume / 1e6:.2f} l of signal (brain-extracted?) and the "
                f"other image shows {other_volume / 1e6:.2f} l: only the {name} image's signal is compared "
                f"(an automatic {name} mask; give your own mask, or automatic_masks=False, to change this)"
            )
    return masks, notes

def mask_tensor(mask: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if mask is None else torch.as_tensor(mask.astype(np.float32))[None, None].to(device)

def normalize_intensity(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Robust [0, 1] scaling (0.5th-99.5th percentile) so MI bins and NCC see comparable ranges."""
    values = np.asarray(array, dtype=np.float32)
    sample = values[mask] if mask is not None else values.reshape(-1)
    # Percentiles of a quarter-million-voxel subsample are plenty (over a thousand voxels in each tail) and fast.
    step = max(sample.size // 250_000, 1)
    low, high = np.percentile(sample[::step], [0.5, 99.5])
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    return np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)

def initial_translation_u(pyramid: Pyramid) -> np.ndarray:
    """Translation (u-frame) of the initial alignment."""
    mode = pyramid.config.initial_alignment
    if mode == "none":
        return np.zeros(3)
    if mode == "geometric_center":
        offset_ras = pyramid.moving_grid.center_ras - pyramid.fixed_grid.center_ras
    else:
        offset_ras = _center_of_mass(pyramid, pyramid.coarsest_level(), moving=True) - _center_of_mass(pyramid, 
            pyramid.coarsest_level(), moving=False
        )
    return offset_ras / pyramid.frame.scale


def _center_of_mass(pyramid: Pyramid, level: Level, moving: bool) -> np.ndarray:
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
    points = grid_points(grid, np.eye(4), pyramid.device)
    return ((points * weight[0, 0, ..., None]).sum(dim=(0, 1, 2)) / total).double().cpu().numpy()


def check_overlap(pyramid: Pyramid, matrix_u: np.ndarray, translation_u: np.ndarray) -> None:
    """Raise when too little of the fixed foreground maps inside the moving image."""
    level = pyramid.coarsest_level()
    _, inside = _moving_samples(pyramid, level, matrix_u, translation_u)
    foreground = fixed_foreground(level)
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


def _moving_samples(pyramid: Pyramid, level: Level, matrix_u: np.ndarray, translation_u: np.ndarray):
    points = grid_points(level.fixed_grid, pyramid.frame.ras_to_u(), pyramid.device)[None]
    mapped = apply_matrix(
        points, torch.as_tensor(np.c_[matrix_u, translation_u], dtype=torch.float32, device=pyramid.device)
    )
    normalized = apply_matrix(mapped, pyramid.u_to_normalized(level.moving_grid))
    with torch.no_grad():
        moving_values, inside = pyramid.sample_image(level, "moving", normalized)
    return moving_values, inside


# The initial pose search (search_initial_pose): shifts of up to _POSE_SHIFT_MM in steps of _POSE_STEP_MM along
# each axis, each combined with nods (rotations about the left-right axis) of _POSE_NODS_DEG, scored on at most
# _POSE_SAMPLES fixed foreground voxels of the coarsest level. A candidate replaces the centre-of-mass start only
# when it correlates better by _POSE_MARGIN.
_POSE_SHIFT_MM = 40.0
_POSE_STEP_MM = 10.0
_POSE_NODS_DEG = (-20.0, -10.0, 0.0, 10.0, 20.0)
_POSE_SAMPLES = 3000
_POSE_MARGIN = 0.02
_POSE_CHUNK = 512


def search_initial_pose(
    pyramid: Pyramid, matrix_u: np.ndarray, translation_u: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """A better starting pose than the centres of mass, where two heads differ in field of view or in how they nod.

    Two different people's heads, one scanned with the neck and one without, or one nodding: their centres of mass
    are centimetres apart in what they show, and a rigid stage that starts there can fall into the wrong valley
    (the affine stage then squashes one head onto the other). So every candidate of a coarse grid of shifts and
    nods (see the constants above) is scored by the correlation of the fixed foreground with the moving image,
    times the share of that foreground that lands inside the moving image, in one batched pass on the coarsest
    level; the best replaces the start when clearly better. Rotations are about the fixed image's centre.

    Returns:
        The (possibly) new ``matrix_u``, ``translation_u`` and a note for the report (None when unchanged).
    """
    level = pyramid.coarsest_level()
    with torch.no_grad():
        foreground = fixed_foreground(level).reshape(-1) > 0
        points = grid_points(level.fixed_grid, pyramid.frame.ras_to_u(), pyramid.device).reshape(-1, 3)[foreground]
        values = level.fixed.reshape(-1)[foreground]
        if len(points) < 64:
            return matrix_u, translation_u, None
        stride = max(1, len(points) // _POSE_SAMPLES)
        points, values = points[::stride], values[::stride]
        steps = torch.arange(-_POSE_SHIFT_MM, _POSE_SHIFT_MM + 1e-6, _POSE_STEP_MM, dtype=torch.float32)
        shifts_u = torch.cartesian_prod(steps, steps, steps).to(pyramid.device) / pyramid.frame.scale
        start = torch.as_tensor(matrix_u, dtype=torch.float32, device=pyramid.device)
        translation = torch.as_tensor(translation_u, dtype=torch.float32, device=pyramid.device)
        to_normalized = pyramid.u_to_normalized(level.moving_grid)
        candidates: list[tuple[float, float, torch.Tensor]] = []  # (score, nod, shift)
        for nod in _POSE_NODS_DEG:
            rotation = torch.as_tensor(_nod(nod), dtype=torch.float32, device=pyramid.device)
            mapped = points @ (rotation @ start).T + translation  # (N, 3) in the moving u frame
            for first in range(0, len(shifts_u), _POSE_CHUNK):
                chunk = shifts_u[first : first + _POSE_CHUNK]
                normalized = apply_matrix(mapped[None] + chunk[:, None], to_normalized)[:, :, None]  # (S, N, 1, 3)
                scores = _pose_scores(pyramid, level, normalized, values)
                best = int(torch.argmax(scores))
                candidates.append((float(scores[best]), nod, chunk[best]))
        score, nod, shift = max(candidates, key=lambda candidate: candidate[0])
        unchanged = apply_matrix((points @ start.T + translation)[None], to_normalized)[:, :, None]
        initial = float(_pose_scores(pyramid, level, unchanged, values)[0])
    if score < initial + _POSE_MARGIN:
        return matrix_u, translation_u, None
    shift_mm = shift.double().cpu().numpy() * pyramid.frame.scale
    note = (f"initial pose search: moved the start by ({shift_mm[0]:.0f}, {shift_mm[1]:.0f}, {shift_mm[2]:.0f}) mm "
            f"and a {nod:.0f} degree nod (correlation {initial:.2f} -> {score:.2f})")  # fmt: skip
    return _nod(nod) @ matrix_u, translation_u + shift.double().cpu().numpy(), note


def _nod(degrees: float) -> np.ndarray:
    """The rotation about the left-right (R) axis of the u frame by ``degrees``."""
    angle = np.radians(degrees)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])


def _pose_scores(pyramid: Pyramid, level: Level, normalized: torch.Tensor, fixed_values: torch.Tensor) -> torch.Tensor:
    """Per candidate (first axis of ``normalized``, (S, N, 1, 3)): the weighted correlation of the fixed samples with
    the moving image there, times the share of samples inside the moving image (and its mask)."""
    moving_values, inside = pyramid.sample_image(level, "moving", normalized[None])
    moving_values, inside = moving_values.reshape(normalized.shape[:2]), inside.reshape(normalized.shape[:2])
    correlation, total = _weighted_correlations(fixed_values, moving_values, inside)
    return correlation * (total / normalized.shape[1])


def _weighted_correlations(
    fixed_values: torch.Tensor, moving_values: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``moving_values`` and ``weight`` (S, N): the weighted Pearson correlation with ``fixed_values``
    (N), and the row's total weight."""
    total = weight.sum(dim=1).clamp_min(1e-6)
    fixed_centred = fixed_values - (weight * fixed_values).sum(dim=1, keepdim=True) / total[:, None]
    moving_centred = moving_values - (weight * moving_values).sum(dim=1, keepdim=True) / total[:, None]
    covariance = (weight * fixed_centred * moving_centred).sum(dim=1)
    variance = (weight * fixed_centred**2).sum(dim=1) * (weight * moving_centred**2).sum(dim=1)
    return covariance / variance.clamp_min(1e-12).sqrt(), total


def modality_correlations(pyramid: Pyramid, matrix_u: np.ndarray, translation_u: np.ndarray) -> tuple[float, float]:
    """Highest and lowest foreground correlation over shifts around the initial alignment.

    Before registration the images can be centimetres apart (a centre-of-mass alignment of a
    cropped field of view is off by the crop), where even two T1 images correlate at about
    zero. So the Pearson correlation inside both foregrounds, away from their edges (every
    modality drops to background there, which correlates even when the contrasts inside are
    opposite), is taken on the coarsest level at shifts of up to ``_MODALITY_SEARCH_VOXELS``
    voxels along each axis. Images of one modality reach a clearly
    positive peak; inverted contrasts reach a deeper negative one; unrelated contrasts neither.

    Returns:
        ``(highest, lowest)`` correlation over the shifts.
    """
    level = pyramid.coarsest_level()
    with torch.no_grad():
        foreground = fixed_foreground(level)
        fixed_interior = erode(foreground)
        if float(fixed_interior.sum()) < 64:
            fixed_interior = foreground
        moving_foreground = (level.moving > FOREGROUND_LEVEL).to(level.moving.dtype)
        if level.moving_mask is not None:
            moving_foreground = moving_foreground * (level.moving_mask > 0.5)
        moving_interior = erode(moving_foreground)
        if float(moving_interior.sum()) < 64:
            moving_interior = moving_foreground
        selected = fixed_interior.reshape(-1) > 0
        points = grid_points(level.fixed_grid, pyramid.frame.ras_to_u(), pyramid.device).reshape(-1, 3)[selected]
        fixed_values = level.fixed.reshape(-1)[selected]
        if len(points) == 0:
            return 1.0, 1.0  # no foreground to judge by: no evidence of a mismatch
        stride = max(1, len(points) // _MODALITY_SAMPLES)
        points, fixed_values = points[::stride], fixed_values[::stride]
        # Shifts along the fixed level grid's axes, in u.
        steps_u = torch.as_tensor(
            (pyramid.frame.ras_to_u()[:3, :3] @ level.fixed_grid.ijk_to_ras[:3, :3]).T, dtype=torch.float32
        ).to(pyramid.device)
        offsets = torch.linspace(
            -_MODALITY_SEARCH_VOXELS, _MODALITY_SEARCH_VOXELS, 5, dtype=torch.float32, device=pyramid.device
        )
        shifts = torch.cartesian_prod(offsets, offsets, offsets) @ steps_u  # (S, 3) in u
        linear = torch.as_tensor(np.c_[matrix_u, translation_u], dtype=torch.float32, device=pyramid.device)
        to_normalized = pyramid.u_to_normalized(level.moving_grid)
        mapped = apply_matrix(points[None] + shifts[:, None], linear)
        normalized = apply_matrix(mapped, to_normalized)
        channels = torch.cat((level.moving, moving_interior), dim=1)
        sampled = sample(channels, normalized[None])[0]
        moving_values, moving_inside = sampled[0], sampled[1]
        inside = (normalized.abs().amax(dim=-1) <= 1.0).to(moving_values.dtype)
        weight = inside * (moving_inside > 0.5).to(moving_values.dtype)
        correlation, total = _weighted_correlations(fixed_values, moving_values, weight)
        # Shifts that keep too few samples say nothing.
        usable = total >= max(32.0, 0.25 * float(total.max()))
        correlation = correlation[usable]
    if correlation.numel() == 0:
        return 0.0, 0.0
    return float(correlation.max()), float(correlation.min())


def warn_modality(report: QualityReport, highest: float, lowest: float, extracted: bool) -> None:
    message = (
        f"the fixed and moving images look like different modalities (intensity correlation at most "
        f"{highest:.2f}, and {lowest:.2f} at worst, near the initial alignment) but the similarity is "
        f"cross-correlation; use the 'multimodal' preset (mutual information) for e.g. CT to MR or T1 to T2/FLAIR"
    )
    if extracted:
        # Before alignment a brain-extracted image lies partly over the other's skull and scalp,
        # which lowers the correlation of two T1 images as well (docs/registration.md).
        message += (
            "; one image is brain-extracted, which lowers this correlation before alignment even for "
            "one modality: if both are e.g. T1, keep the preset"
        )
    warnings.warn(message, UserWarning, stacklevel=4)
    report.warnings.append(message)
