"""Loss terms of the optimisation: masked similarity measures and smoothness penalties.

Lower is better for all of them, so they are minimised directly.

MONAI's losses have no mask argument; registration needs one (fixed/moving masks, and the part of
the fixed image that maps outside the moving image must not count), so these wrap them with a
weight map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class WeightedMutualInformationLoss:
    """MONAI's Parzen-window global mutual information, restricted to samples with weight > 0.5.

    The selection is not differentiable, but the mask and field of view change slowly, so the
    gradient through the sampled intensities is all the optimiser needs.

    Args:
        num_bins: Histogram bins; intensities are expected in [0, 1].
    """

    def __init__(self, num_bins: int = 32) -> None:
        # Imported here: importing MONAI takes seconds, and only mutual information needs it.
        from monai.losses import GlobalMutualInformationLoss

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


def _box_sum(volume: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sum over a window of ``2 * radius + 1`` voxels along ``dim``, zeros beyond the edges."""
    size = volume.shape[dim]
    pad = [0] * (2 * (volume.ndim - 2))
    # F.pad lists the last axis first.
    pad[2 * (volume.ndim - 1 - dim)] = radius
    pad[2 * (volume.ndim - 1 - dim) + 1] = radius
    padded = F.pad(volume, pad)
    total = padded.narrow(dim, 0, size).clone()
    for shift in range(1, 2 * radius + 1):
        total.add_(padded.narrow(dim, shift, size))
    return total


def _window_counts(volume: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """How many voxels of the image each window along ``dim`` holds (fewer near the edges)."""
    size = volume.shape[dim]
    index = torch.arange(size, device=volume.device)
    counts = ((index + radius + 1).clamp(max=size) - (index - radius).clamp(min=0)).to(volume.dtype)
    shape = [1] * volume.ndim
    shape[dim] = size
    return counts.reshape(shape)


class _WindowMean(torch.autograd.Function):
    """Mean over the part of a cubic window that lies inside the image, one axis at a time.

    The operator is ``C^-1 S`` per axis (``S`` a symmetric box sum, ``C`` the voxel counts), so its
    adjoint is ``S C^-1``: the backward pass costs what the forward does instead of autograd's
    pad/narrow bookkeeping, which took twice as long.
    """

    @staticmethod
    def forward(ctx, volume: torch.Tensor, radius: int, counts: tuple[torch.Tensor, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.radius = radius
        ctx.counts = counts
        for dim, count in zip(range(2, volume.ndim), counts):
            volume = _box_sum(volume, radius, dim).div_(count)
        return volume

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):  # type: ignore[override]
        for dim, count in zip(range(2, gradient.ndim), ctx.counts):
            gradient = _box_sum(gradient / count, ctx.radius, dim)
        return gradient, None, None


class WeightedLocalNCCLoss:
    """Local (windowed) squared normalised cross-correlation, averaged over a weight map.

    Same measure as MONAI's ``LocalNormalizedCrossCorrelationLoss`` with a rectangular kernel,
    computed with separable window means (shifted sums, a hand-written adjoint for the backward
    pass) instead of convolutions, which are slow on CPU, where most registrations run. The fixed
    image's window statistics are computed once and reused while the same fixed tensor is passed.

    Args:
        kernel_size: Odd window size in voxels.
    """

    def __init__(self, kernel_size: int = 5) -> None:
        self.kernel_size = kernel_size
        self._fixed: torch.Tensor | None = None
        self._fixed_statistics: tuple[torch.Tensor, torch.Tensor] | None = None
        self._counts: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}

    def _window_mean(self, volume: torch.Tensor) -> torch.Tensor:
        radius = self.kernel_size // 2
        shape = tuple(volume.shape[2:])
        if shape not in self._counts:
            self._counts[shape] = tuple(_window_counts(volume, radius, dim) for dim in range(2, volume.ndim))
        return _WindowMean.apply(volume, radius, self._counts[shape])

    def _statistics_of_fixed(self, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fixed is not fixed or self._fixed_statistics is None:
            with torch.no_grad():
                mean, square = self._window_mean(torch.cat((fixed, fixed * fixed), dim=1)).unbind(dim=1)
                self._fixed_statistics = (mean, (square - mean**2).clamp_min(_EPS))
            self._fixed = fixed
        return self._fixed_statistics

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Args are ``(1, 1, D, H, W)`` tensors on one grid; returns the weighted mean of ``-lncc^2``."""
        fixed_mean, fixed_variance = self._statistics_of_fixed(fixed)
        # The three moving window sums in one pass over a 3-channel tensor.
        stacked = torch.cat((moving, moving * moving, fixed * moving), dim=1)
        moving_mean, moving_square, product = self._window_mean(stacked).unbind(dim=1)
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


# The six face neighbours of a voxel, in (k, j, i) steps; MIND-SSC compares the 12 pairs of them that
# are sqrt(2) apart (every pair but the opposite ones), so no pair involves the centre voxel itself.
_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_SSC_PAIRS = tuple(
    (a, b)
    for a in range(6)
    for b in range(a + 1, 6)
    if any(x != -y for x, y in zip(_NEIGHBOURS[a], _NEIGHBOURS[b]))
)


def _shifted(volume: torch.Tensor, step: tuple[int, int, int], pad: int) -> torch.Tensor:
    """``volume`` at ``p + step`` for every voxel ``p`` (edge values repeated beyond the border)."""
    padded = F.pad(volume, (pad,) * 6, mode="replicate")
    depth, height, width = volume.shape[2:]
    k, j, i = (pad + s for s in step)
    return padded[:, :, k : k + depth, j : j + height, i : i + width]


def mind_ssc(volume: torch.Tensor, dilation: int = 1, radius: int = 0) -> torch.Tensor:
    """Modality-independent neighbourhood descriptor, self-similarity context (Heinrich et al., MICCAI 2013).

    For each voxel, 12 patch distances between pairs of its face neighbours (``dilation`` voxels
    away), each the mean squared intensity difference over a ``2 * radius + 1`` window, turned into
    ``exp(-distance / local variance)`` and scaled so that the largest is 1. The descriptor
    describes local structure, not intensities: it is unchanged when the intensities are scaled,
    shifted or negated, so two modalities of one anatomy get similar descriptors and their squared
    difference is a local multimodal similarity (ConvexAdam and deeds register with it). MONAI has
    no such measure.

    Args:
        volume: ``(1, 1, D, H, W)`` intensities.
        dilation: Distance of the neighbours in voxels. The registration pyramid's levels are
            already smoothed to their spacing, so the immediate neighbours (1) and single-voxel
            patches (``radius=0``) serve, and were the most accurate on a multimodal known answer
            (docs/registration.md).
        radius: Half-width of the patches compared, in voxels.

    Returns:
        ``(1, 12, D, H, W)`` descriptors in [0, 1].
    """
    shifted = [_shifted(volume, tuple(dilation * s for s in step), dilation) for step in _NEIGHBOURS]
    squared = torch.cat([(shifted[a] - shifted[b]) ** 2 for a, b in _SSC_PAIRS], dim=1)
    window = 2 * radius + 1
    distance = F.avg_pool3d(F.pad(squared, (radius,) * 6, mode="replicate"), window, stride=1)
    variance = distance.mean(dim=1, keepdim=True)
    # Bounded relative to the image's mean (scale-free); a constant image has no structure to describe.
    mean_variance = max(float(variance.mean()), 1e-30)
    variance = variance.clamp(min=1e-3 * mean_variance, max=1e3 * mean_variance)
    descriptor = torch.exp(-distance / variance)
    return descriptor / descriptor.amax(dim=1, keepdim=True).clamp_min(_EPS)


def weighted_descriptor_ssd(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean (over voxels) of the mean squared difference of ``(1, C, ...)`` descriptors."""
    squared = ((fixed - moving) ** 2).mean(dim=1, keepdim=True)
    return (squared * weight).sum() / weight.sum().clamp_min(_EPS)
