"""Quality report of a registration: the Learn2Reg metric set plus runtime and memory.

Folding and log-Jacobian spread, Dice of propagated labels, landmark error. Functions work on
plain numpy arrays in Slicer's (k, j, i) order so they can also judge a field made elsewhere.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

# Voxels per slab when deriving Jacobians (bounds memory on large grids).
_SLAB_VOXELS = 2_000_000


def jacobian_determinant(displacement_ras: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``p -> p + d(p)`` on the displacement's grid.

    The determinant is invariant to the change of basis between RAS and voxel coordinates, so it
    is computed from voxel-unit derivatives (central differences, one-sided at the edges), which
    handles oblique and anisotropic grids exactly.

    Args:
        displacement_ras: ``(k, j, i, 3)`` displacement, RAS mm components.
        ijk_to_ras: 4x4 matrix of the grid.

    Returns:
        ``(k, j, i)`` float32 determinants.

    Raises:
        ValueError: Wrong shape.
    """
    field_ras = np.asarray(displacement_ras)
    if field_ras.ndim != 4 or field_ras.shape[-1] != 3:
        raise ValueError(f"displacement_ras must have shape (k, j, i, 3), got {field_ras.shape}")
    ras_to_ijk_linear = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]).astype(np.float32)
    depth = field_ras.shape[0]
    determinant = np.empty(field_ras.shape[:3], dtype=np.float32)
    # Slabs along k with one voxel of overlap give exactly the whole-array central differences while
    # keeping the nine derivative arrays small on 512^3 grids.
    slab = max(1, _SLAB_VOXELS // max(field_ras.shape[1] * field_ras.shape[2], 1))
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        low, high = max(start - 1, 0), min(stop + 1, depth)
        block = _determinant_block(field_ras[low:high].astype(np.float32) @ ras_to_ijk_linear.T)
        determinant[start:stop] = block[start - low : start - low + (stop - start)]
    return determinant


def _determinant_block(field_ijk: np.ndarray) -> np.ndarray:
    """det(I + grad d) for a (k, j, i, 3) block whose components are (di, dj, dk) in voxels."""
    # Array axes are (k, j, i); voxel coordinate x_b for b = i, j, k lives on array axis 2 - b.
    gradients = [
        [
            np.gradient(field_ijk[..., a], axis=2 - b)
            if field_ijk.shape[2 - b] > 1
            else np.zeros_like(field_ijk[..., a])
            for b in range(3)
        ]
        for a in range(3)
    ]
    j = [[gradients[a][b] + (1.0 if a == b else 0.0) for b in range(3)] for a in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    ).astype(np.float32)


def deformation_quality(
    displacement_ras: np.ndarray, ijk_to_ras: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Folding statistics of a displacement field.

    Args:
        displacement_ras: ``(k, j, i, 3)`` RAS mm displacement.
        ijk_to_ras: 4x4 matrix of the grid.
        mask: Optional ``(k, j, i)`` region to evaluate (the fixed mask or foreground).

    Returns:
        ``folding_percent``, ``log_jacobian_std``, ``jacobian_min``, ``jacobian_max``.
    """
    det = jacobian_determinant(displacement_ras, ijk_to_ras)
    values = det[np.asarray(mask, dtype=bool)] if mask is not None else det.reshape(-1)
    if values.size == 0:
        values = det.reshape(-1)
    log_det = np.log(np.clip(values.astype(np.float64), 1e-9, None))
    return {
        "folding_percent": float(100.0 * np.count_nonzero(values <= 0) / values.size),
        "log_jacobian_std": float(log_det.std()),
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
    }


def dice_per_label(reference: np.ndarray, propagated: np.ndarray) -> dict[int, float]:
    """Dice of every non-zero label present in either map.

    Args:
        reference: Fixed label map.
        propagated: Moving label map warped onto the fixed grid, same shape.

    Returns:
        ``{label: dice}``; a label missing from both maps is not listed.
    """
    reference = np.asarray(reference)
    propagated = np.asarray(propagated)
    if reference.shape != propagated.shape:
        raise ValueError(f"label maps differ in shape: {reference.shape} vs {propagated.shape}")
    labels = np.union1d(np.unique(reference), np.unique(propagated))
    scores: dict[int, float] = {}
    for label in labels[labels != 0]:
        in_reference = reference == label
        in_propagated = propagated == label
        denominator = np.count_nonzero(in_reference) + np.count_nonzero(in_propagated)
        scores[int(label)] = float(2.0 * np.count_nonzero(in_reference & in_propagated) / denominator)
    return scores


def landmark_errors(
    fixed_points_ras: np.ndarray, moving_points_ras: np.ndarray, mapped_fixed_points_ras: np.ndarray
) -> dict[str, float]:
    """Target registration error of corresponding landmarks, before and after.

    Args:
        fixed_points_ras: ``(n, 3)`` fiducials in the fixed image (RAS mm).
        moving_points_ras: ``(n, 3)`` corresponding fiducials in the moving image.
        mapped_fixed_points_ras: the fixed fiducials mapped by the registration into moving space.

    Returns:
        ``mean``, ``median``, ``max`` after, and ``mean_before``, ``median_before``, ``max_before``
        (identity mapping), all in mm, plus ``count``.
    """
    fixed_points = np.asarray(fixed_points_ras, dtype=np.float64).reshape(-1, 3)
    moving_points = np.asarray(moving_points_ras, dtype=np.float64).reshape(-1, 3)
    if fixed_points.shape != moving_points.shape or len(fixed_points) == 0:
        raise ValueError(
            f"fixed and moving landmarks must be equally many (n, 3) RAS points, got {fixed_points.shape} "
            f"and {moving_points.shape}"
        )
    before = np.linalg.norm(fixed_points - moving_points, axis=1)
    after = np.linalg.norm(np.asarray(mapped_fixed_points_ras, dtype=np.float64) - moving_points, axis=1)
    return {
        "mean": float(after.mean()),
        "median": float(np.median(after)),
        "max": float(after.max()),
        "mean_before": float(before.mean()),
        "median_before": float(np.median(before)),
        "max_before": float(before.max()),
        "count": float(len(after)),
    }


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """Peak memory of this run's device in MiB, and what was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    try:
        import resource  # POSIX only; Slicer also runs on Windows
    except ImportError:
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return (peak / 2**20 if sys.platform == "darwin" else peak / 2**10), "process_peak_rss"
