"""The image pyramid of one registration: both images and their masks on the device, in one frame, smoothed and
resampled to every spacing a stage asks for (each level built once), with the samplers the stages read them by."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Grid, NormalizedFrame, SliceStack, resample_to_grid, sample
from .presets import RegistrationConfig

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]

# Fewest elements per tensor of an optimisation loop for which it runs on more than one thread (see threads_for).
_PARALLEL_MIN_VOXELS = 2**18


class RegistrationCancelled(Exception):
    """Raised when the caller's ``cancel`` check returned True; nothing was produced."""


@dataclass
class Level:
    """One pyramid level: both images, their masks and grids at one spacing."""

    fixed: torch.Tensor
    fixed_weight: torch.Tensor
    fixed_grid: Grid
    moving: torch.Tensor
    moving_mask: torch.Tensor | None
    moving_grid: Grid
    # The linear stages' samples of this level by side ("fixed", "moving"): points (u), intensities, weights.
    linear_samples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # MIND-SSC descriptors of both images, for the deformable stage's "mind" similarity, built on first use.
    fixed_descriptor: torch.Tensor | None = None
    moving_descriptor: torch.Tensor | None = None
    # The moving image and mask as slice stacks (the fast CPU sampler), built on first use.
    _samplers: dict[str, SliceStack] = field(default_factory=dict, repr=False)

    def sampler(self, name: str) -> torch.Tensor | SliceStack:
        """``"moving"``, ``"moving_mask"``, ``"fixed"`` or ``"fixed_weight"`` as :func:`sample` reads it fastest here."""
        volume = getattr(self, name)
        if name not in self._samplers and SliceStack.suits(volume):
            self._samplers[name] = SliceStack(volume)
        return self._samplers.get(name, volume)


class Pyramid:
    """State of one registration: inputs on the device, the frame, the pyramid cache, the progress callbacks."""

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
        self._levels: dict[float, Level] = {}
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        # Iterations run per stage and pyramid level (levels can end early, see Schedule).
        self.iterations: dict[str, list[int]] = {}

    def report_progress(self, stage: str, fraction: float) -> None:
        if self.cancel is not None and self.cancel():
            raise RegistrationCancelled(f"registration cancelled during {stage}")
        if self.progress is not None:
            self.progress(stage, float(min(max(fraction, 0.0), 1.0)))

    def level(self, spacing_mm: float) -> Level:
        """The pyramid level at ``spacing_mm``, built once.

        A level is smoothed and resampled from the level at half its spacing when that is still
        coarser than the images (rather than from the full images), so that the wide Gaussians of
        coarse levels run over an eighth of the voxels; the smoothing adds up to about the same.
        """
        if spacing_mm not in self._levels:
            finest = min(float(self.fixed_grid.spacing.min()), float(self.moving_grid.spacing.min()))
            source = self.level(spacing_mm / 2) if spacing_mm / 2 >= 1.5 * finest else None
            with torch.no_grad():
                fixed_grid, _ = self.fixed_grid.coarsened(spacing_mm)
                moving_grid, _ = self.moving_grid.coarsened(spacing_mm)
                if source is None:
                    fixed, fixed_source_grid, fixed_mask = self.fixed, self.fixed_grid, self.fixed_mask
                    moving, moving_source_grid, moving_mask = self.moving, self.moving_grid, self.moving_mask
                else:
                    fixed, fixed_source_grid = source.fixed, source.fixed_grid
                    fixed_mask = source.fixed_weight if self.fixed_mask is not None else None
                    moving, moving_source_grid, moving_mask = source.moving, source.moving_grid, source.moving_mask
                fixed_factors = _coarsening_factors(fixed_source_grid, fixed_grid)
                moving_factors = _coarsening_factors(moving_source_grid, moving_grid)
                self._levels[spacing_mm] = Level(
                    fixed=resample_to_grid(fixed, fixed_source_grid, fixed_grid, fixed_factors),
                    fixed_weight=(
                        resample_to_grid(fixed_mask, fixed_source_grid, fixed_grid, fixed_factors, smooth=False)
                        if fixed_mask is not None
                        else torch.ones((1, 1, *fixed_grid.shape), device=self.device)
                    ),
                    fixed_grid=fixed_grid,
                    moving=resample_to_grid(moving, moving_source_grid, moving_grid, moving_factors),
                    moving_mask=(
                        resample_to_grid(moving_mask, moving_source_grid, moving_grid, moving_factors, smooth=False)
                        if moving_mask is not None
                        else None
                    ),
                    moving_grid=moving_grid,
                )
        return self._levels[spacing_mm]

    def u_to_normalized(self, grid: Grid) -> torch.Tensor:
        """4x4 from the u frame to ``grid``'s normalised sampling coordinates."""
        matrix = grid.ras_to_normalized() @ self.frame.u_to_ras()
        return torch.as_tensor(matrix, dtype=torch.float32, device=self.device)

    def sample_image(
        self, level: Level, side: str, normalized: torch.Tensor, image: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``side``'s (``"moving"`` or ``"fixed"``) intensities at points ``(1, D, H, W, 3)`` normalised to
        its level grid, and their validity weight (inside the image and its mask).

        ``image`` names another volume of that side on the level grid to sample instead (its descriptors).
        """
        default_image, mask = ("moving", "moving_mask") if side == "moving" else ("fixed", "fixed_weight")
        image = image or default_image
        has_mask = level.moving_mask is not None if side == "moving" else self.fixed_mask is not None
        values = sample(level.sampler(image), normalized)
        # A selection of samples, not something to optimise: no gradient pulls points into the image or mask.
        with torch.no_grad():
            inside = (normalized.abs().amax(dim=-1) <= 1.0)[:, None].to(values.dtype)
            if has_mask:
                inside = inside * sample(level.sampler(mask), normalized)
        return values, inside

    def coarsest_level(self) -> Level:
        spacings = []
        if {"rigid", "affine"} & set(self.config.stages):
            spacings.append(self.config.linear_spacings_mm[0])
        if "deformable" in self.config.stages:
            spacings.append(self.config.deformable_spacings_mm[0])
        return self.level(max(spacings))


@contextmanager
def threads_for(device: torch.device, voxels: int):
    """Intra-op threads for an optimisation loop whose tensors hold about ``voxels`` elements each.

    Below ``_PARALLEL_MIN_VOXELS`` an operation takes tens of microseconds, about what waking and
    joining a second OpenMP thread costs (more on a shared machine, where the thread waits for a
    core), so such loops run faster on one thread than on two (docs/registration.md, "Speed on a
    CPU"). The caller's setting is back afterwards, and for the final resampling.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or voxels >= _PARALLEL_MIN_VOXELS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _coarsening_factors(source: Grid, target: Grid) -> np.ndarray:
    """Per-axis (i, j, k) ratio of ``target``'s voxel size to ``source``'s, for grids with the same corners."""
    source_sizes, target_sizes = source.size_ijk, target.size_ijk
    return np.where(target_sizes > 1, (source_sizes - 1) / np.maximum(target_sizes - 1, 1), 1.0)

#: Intensities (each image scaled to 0..1) above this are an image's foreground; below it, its background (air).
FOREGROUND_LEVEL = 0.05


def fixed_foreground(level: Level) -> torch.Tensor:
    """The fixed image's foreground on ``level``, weighted by its mask: ``(1, 1, D, H, W)``."""
    return level.fixed_weight * (level.fixed > FOREGROUND_LEVEL).to(level.fixed.dtype)


def foreground_box(level: Level, margin: int) -> tuple[slice, slice, slice]:
    """(k, j, i) slices of the fixed level grid around its weighted foreground, ``margin`` voxels wider."""
    foreground = (fixed_foreground(level) > 0)[0, 0]
    if not bool(foreground.any()):
        return (slice(None),) * 3
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = torch.nonzero(foreground.any(dim=other[1]).any(dim=other[0])).reshape(-1)
        start = max(int(present[0]) - margin, 0)
        stop = min(int(present[-1]) + 1 + margin, foreground.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]

def erode(mask: torch.Tensor) -> torch.Tensor:
    """A ``(1, 1, D, H, W)`` 0/1 mask shrunk by one voxel (3x3x3 minimum, one axis at a time)."""
    for kernel in ((3, 1, 1), (1, 3, 1), (1, 1, 3)):
        padding = tuple(size // 2 for size in kernel)
        mask = -F.max_pool3d(-mask, kernel_size=kernel, stride=1, padding=padding)
    return mask
