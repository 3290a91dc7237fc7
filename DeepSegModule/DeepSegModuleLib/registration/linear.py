"""The rigid and affine stages: a few parameters, optimised by Rprop on one fixed sample of each pyramid level."""

from __future__ import annotations

import numpy as np
import torch

from .geometry import apply_matrix, rotation_matrix
from .optimizers import Rprop
from .pyramid import Level, Pyramid, fixed_foreground
from .similarity import WeightedMutualInformationLoss, weighted_ncc_loss

# A linear level ends once every Rprop step is below this fraction of the level's voxel (see Rprop).
_LINEAR_PRECISION_VOXELS = 0.005


def optimise_linear(
    pyramid: Pyramid, stage: str, matrix_u: np.ndarray, translation_u: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Rigid or affine stage over the linear pyramid; returns the new (matrix_u, translation_u, loss)."""
    config = pyramid.config
    start_matrix = torch.as_tensor(matrix_u, dtype=torch.float32, device=pyramid.device)
    translation = torch.tensor(translation_u, dtype=torch.float32, device=pyramid.device, requires_grad=True)
    if stage == "rigid":
        rotation = torch.zeros(3, device=pyramid.device, requires_grad=True)
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
    pyramid.iterations[stage] = []
    for level_index, (spacing, iterations) in enumerate(zip(config.linear_spacings_mm, config.linear_iterations)):
        level = pyramid.level(spacing)
        # u -> the *other* image's normalised coordinates, per sampled side, once per level.
        to_normalized = {
            side: pyramid.u_to_normalized(level.moving_grid if side == "fixed" else level.fixed_grid)
            for side in linear_directions(pyramid)
        }
        base_rate = config.linear_learning_rate * 0.5**level_index
        # Parameters are in u (mm / frame scale; radians for rotations, which move the points
        # within the frame by as much): precision of a fraction of this level's voxel, coarser
        # on the levels that a finer one refines.
        fraction = _LINEAR_PRECISION_VOXELS * (1 if level_index == len(config.linear_spacings_mm) - 1 else 4)
        precision = fraction * float(level.fixed_grid.spacing.min()) / pyramid.frame.scale
        # At least two halvings of the first step (tiny images have tiny frames, large precisions).
        optimizer = Rprop(parameters, step=base_rate, precision=min(precision, 0.25 * base_rate))
        ran = 0
        for iteration in range(iterations):
            optimizer.zero_grad()
            losses = [
                _linear_loss(pyramid, level, side, similarity, to_normalized[side], current_matrix(), translation)
                for side in linear_directions(pyramid)
            ]
            if any(term is None for term in losses):
                raise ValueError(
                    f"the {stage} registration lost all overlap between the images; check the input "
                    f"geometry or start from a better initial transform"
                )
            loss = sum(losses) / len(losses)  # type: ignore[arg-type]
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            done += 1
            ran += 1
            if iteration % 10 == 0:
                pyramid.report_progress(stage, done / total_iterations)
            if optimizer.converged():
                break
        done += iterations - ran
        pyramid.iterations[stage].append(ran)
    pyramid.report_progress(stage, 1.0)
    with torch.no_grad():
        final_matrix = current_matrix().double().cpu().numpy()
    return final_matrix, translation.detach().double().cpu().numpy(), loss_value


def _linear_samples_of(pyramid: Pyramid, level: Level, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points (u), intensities and weights of ``side``'s image that the linear stages compare at this level.

    Voxels inside that side's mask (all of the fixed image without one). One random sample of
    at most ``linear_max_points`` voxels per level and side, shared by the rigid and affine
    stages and kept for all their iterations (ANTs also samples once per level): the
    objective is then deterministic, which lets a level stop when it has converged (see
    :class:`~DeepSegModuleLib.registration.optimizers.Rprop`), and no gathering happens per iteration. With tens of thousands of points
    the sampling bias is negligible.
    """
    if side not in level.linear_samples:
        with torch.no_grad():
            if side == "moving":
                assert level.moving_mask is not None
                image, sample_weight, grid = level.moving, level.moving_mask.reshape(-1), level.moving_grid
            else:
                image, sample_weight, grid = level.fixed, level.fixed_weight.reshape(-1), level.fixed_grid
                if pyramid.fixed_mask is None and pyramid.config.linear_foreground:
                    # Without a mask, the fixed image's foreground, not the air around it: air matches air
                    # whatever the transform does to the head, and rewards squashing one head into the other.
                    foreground = fixed_foreground(level).reshape(-1)
                    if float(foreground.sum()) >= 64:
                        sample_weight = foreground
            keep = torch.nonzero(sample_weight > 0).reshape(-1)
            if len(keep) > pyramid.config.linear_max_points:
                # Drawn with replacement and deduplicated: a full permutation of a 1 mm volume's
                # millions of voxels cost more than the iterations that use the sample.
                drawn = torch.randint(len(keep), (pyramid.config.linear_max_points,), generator=pyramid.generator)
                keep = keep[torch.unique(drawn).to(keep.device)]
            height, width = grid.shape[1:]
            ijk = torch.stack((keep % width, (keep // width) % height, keep // (height * width)), dim=1)
            to_u = torch.as_tensor(pyramid.frame.ras_to_u() @ grid.ijk_to_ras, dtype=torch.float32, device=pyramid.device)
            level.linear_samples[side] = (
                apply_matrix(ijk.to(torch.float32), to_u).contiguous(),
                image.reshape(-1)[keep].contiguous(),
                sample_weight[keep].contiguous(),
            )
    return level.linear_samples[side]


def _linear_loss(
    pyramid: Pyramid,
    level: Level,
    side: str,
    similarity,
    to_normalized: torch.Tensor,
    matrix: torch.Tensor,
    translation: torch.Tensor,
) -> torch.Tensor | None:
    """Similarity of ``side``'s samples with the other image under fixed -> moving ``u -> A u + t``.

    ``to_normalized`` is the 4x4 from u to the other image's normalised coordinates on this level.
    Returns ``None`` when no sample maps inside the other image (and its mask).
    """
    points, values, sample_weight = _linear_samples_of(pyramid, level, side)
    # Sample point -> normalised coordinates on the other side as one 3x4 matrix, one product
    # per point: fixed -> moving is u -> A u + t, moving -> fixed its inverse.
    if side == "fixed":
        to_other = to_normalized[:3, :3] @ matrix
        offset = to_normalized[:3, :3] @ translation + to_normalized[:3, 3]
    else:
        to_other = to_normalized[:3, :3] @ torch.linalg.inv(matrix)
        offset = to_normalized[:3, 3] - to_other @ translation
    normalized = torch.addmm(offset, points, to_other.T).reshape(1, -1, 1, 1, 3)
    other, inside = pyramid.sample_image(level, "moving" if side == "fixed" else "fixed", normalized)
    if side == "fixed":
        fixed_values, moving_values = values, other.reshape(-1)
    else:
        fixed_values, moving_values = other.reshape(-1), values
    weight = sample_weight * inside.reshape(-1)
    if float(weight.sum()) < 1.0:
        return None
    return similarity(fixed_values, moving_values, weight)


def linear_directions(pyramid: Pyramid) -> tuple[str, ...]:
    """Which image(s) the linear stages sample: ``"fixed"``, ``"moving"`` or both.

    A mask on one side only fixes the region to compare on that side. Sampled on the other
    side, it would instead decide which of those samples count, through the transform being
    optimised: shrinking or shifting the masked image's footprint then picks the subset of the
    other image that correlates best (a brain-extracted template against a head shrank to a
    third of its volume; docs/registration.md, "Where the linear stages sample"). So the samples are
    taken inside the mask: with only a moving mask, the moving voxels inside it, mapped into
    the fixed image through the inverse of the linear transform. With masks on both sides each
    mask would select the other side's samples, so both directions are compared and averaged
    (each favours the opposite error: shrinking the moving image for one, growing it for the
    other).
    """
    if pyramid.moving_mask is None:
        return ("fixed",)
    if pyramid.fixed_mask is None:
        return ("moving",)
    return ("fixed", "moving")
