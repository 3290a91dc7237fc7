"""Loss terms of the optimisation: masked similarity measures and smoothness penalties.

Lower is better for all of them, so they are minimised directly.

MONAI's losses have no mask argument; registration needs one (fixed/moving masks, and the part of
the fixed image that maps outside the moving image must not count), so these wrap them with a
weight map.
"""

from __future__ import annotations

import torch
from monai.losses import GlobalMutualInformationLoss

_EPS = 1e-6


def weighted_ncc_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Negative global normalised cross-correlation over weighted samples.

    Args:
        fixed: Fixed intensities, any shape.
        moving: Moving intensities sampled at the mapped fixed points, same shape.
        weight: Non-negative weights (mask x inside-moving-image), same shape.

    Returns:
        ``-ncc`` in [-1, 1] (scalar tensor).
    """
    total = weight.sum().clamp_min(_EPS)
    fixed_mean = (weight * fixed).sum() / total
    moving_mean = (weight * moving).sum() / total
    fixed_c = fixed - fixed_mean
    moving_c = moving - moving_mean
    covariance = (weight * fixed_c * moving_c).sum()
    variance = ((weight * fixed_c**2).sum() * (weight * moving_c**2).sum()).clamp_min(_EPS * _EPS)
    return -covariance / variance.sqrt()


def weighted_pearson(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> float:
    """Weighted Pearson correlation as a float (used to sanity-check the modality choice)."""
    with torch.no_grad():
        return float(-weighted_ncc_loss(fixed, moving, weight))


class WeightedMutualInformationLoss:
    """MONAI's Parzen-window global mutual information, restricted to samples with weight > 0.5.

    The selection is not differentiable, but the mask and field of view change slowly, so the
    gradient through the sampled intensities is all the optimiser needs.

    Args:
        num_bins: Histogram bins; intensities are expected in [0, 1].
    """

    def __init__(self, num_bins: int = 32) -> None:
        self._loss = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=num_bins, sigma_ratio=0.5)

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self._loss = self._loss.to(fixed.device)
        selected = weight.reshape(-1) > 0.5
        if int(selected.sum()) < 16:
            # Nothing to compare: the caller checks overlap and raises a clear error.
            return fixed.sum() * 0.0 + moving.sum() * 0.0
        fixed_values = fixed.reshape(-1)[selected].reshape(1, 1, -1)
        moving_values = moving.reshape(-1)[selected].reshape(1, 1, -1)
        return self._loss(moving_values, fixed_values)


class WeightedLocalNCCLoss:
    """Local (windowed) squared normalised cross-correlation, averaged over a weight map.

    Same measure as MONAI's ``LocalNormalizedCrossCorrelationLoss`` with a rectangular kernel,
    but the window sums come from ``avg_pool3d`` instead of separable convolutions: about three
    times faster on CPU, which is where most of a registration's time goes.

    Args:
        kernel_size: Odd window size in voxels.
    """

    def __init__(self, kernel_size: int = 5) -> None:
        self.kernel_size = kernel_size

    def _window_mean(self, volume: torch.Tensor) -> torch.Tensor:
        # One axis at a time, each a difference of cumulative sums: a few operations per voxel
        # whatever the window (avg_pool3d costs k^3 and was the slowest step on CPU). Dividing by
        # the number of voxels inside the image gives the mean over the valid part of the box.
        radius = self.kernel_size // 2
        for axis in (2, 3, 4):
            size = volume.shape[axis]
            cumulative = torch.cumsum(volume, dim=axis)
            cumulative = torch.cat((torch.zeros_like(cumulative.narrow(axis, 0, 1)), cumulative), dim=axis)
            index = torch.arange(size, device=volume.device)
            upper = (index + radius + 1).clamp(max=size)
            lower = (index - radius).clamp(min=0)
            count_shape = [1, 1, 1, 1, 1]
            count_shape[axis] = size
            counts = (upper - lower).to(volume.dtype).reshape(count_shape)
            volume = (cumulative.index_select(axis, upper) - cumulative.index_select(axis, lower)) / counts
        return volume

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Args are ``(1, 1, D, H, W)`` tensors on one grid; returns the weighted mean of ``-lncc^2``."""
        # The five window sums in one pass over a 5-channel tensor.
        stacked = torch.cat((fixed, moving, fixed * fixed, moving * moving, fixed * moving), dim=1)
        fixed_mean, moving_mean, fixed_square, moving_square, product = self._window_mean(stacked).unbind(dim=1)
        fixed_variance = (fixed_square - fixed_mean**2).clamp_min(_EPS)
        moving_variance = (moving_square - moving_mean**2).clamp_min(_EPS)
        covariance = product - fixed_mean * moving_mean
        local = (covariance**2 / (fixed_variance * moving_variance))[:, None]
        return -(local * weight).sum() / weight.sum().clamp_min(_EPS)


# Smoothness penalties of a velocity field (N, 3, D, H, W) in voxel units. Same quantities as
# MONAI's DiffusionLoss and BendingEnergyLoss but with forward differences on plain slices: MONAI's
# central differences go through list indexing that measured about ten times slower on CPU here,
# and the penalty runs every iteration.


def diffusion_energy(field: torch.Tensor) -> torch.Tensor:
    """Mean squared first derivative (membrane energy), summed over the three axes."""
    return sum((field.diff(dim=axis) ** 2).mean() for axis in (2, 3, 4))  # type: ignore[return-value]


def bending_energy(field: torch.Tensor) -> torch.Tensor:
    """Mean squared second derivative (thin-plate bending energy), pure and mixed terms."""
    energy = field.new_zeros(())
    for axis in (2, 3, 4):
        if field.shape[axis] < 3:
            continue
        energy = energy + (field.diff(n=2, dim=axis) ** 2).mean()
    for first, second in ((2, 3), (2, 4), (3, 4)):
        energy = energy + 2 * (field.diff(dim=first).diff(dim=second) ** 2).mean()
    return energy
