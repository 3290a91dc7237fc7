"""The model grid: the input grid reoriented (axis permutation and flips only) and rescaled.

A model trained on, say, RAS-oriented 1.5 mm voxels sees the input through a grid whose axes are
the input's own voxel axes, permuted and flipped to point as close as possible to R, A and S, and
whose voxels are 1.5 mm. No rotation is applied, so an oblique scan stays oblique (as MONAI's
``Orientationd`` + ``Spacingd`` and nnU-Net do) and the mapping between the two grids is a pure
per-axis scale and shift. Resampling keeps the outer edges of the field of view in place (the
convention of ``torch.nn.functional.interpolate(align_corners=False)`` and of nnU-Net's
``skimage.transform.resize``), so the model grid's physical position is exact and the way back is
the same mapping inverted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_AXIS_OF_LETTER = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def orientation_code(ijk_to_ras: np.ndarray) -> str:
    """The closest three-letter orientation code of a grid (e.g. ``"RAS"``, ``"LPS"``)."""
    perm, signs = _closest_axes(ijk_to_ras)
    letters = {(0, 1): "R", (0, -1): "L", (1, 1): "A", (1, -1): "P", (2, 1): "S", (2, -1): "I"}
    return "".join(letters[(perm[a], signs[a])] for a in range(3))


def _closest_axes(ijk_to_ras: np.ndarray) -> tuple[list[int], list[int]]:
    """For each voxel axis, the world axis it points along most and the sign (unique assignment)."""
    direction = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    direction = direction / np.linalg.norm(direction, axis=0)
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(direction[p[a], a]) for a in range(3)))
    return list(best), [1 if direction[best[a], a] >= 0 else -1 for a in range(3)]


@dataclass
class ModelGrid:
    """How the input grid (i, j, k) maps onto the model grid.

    Attributes:
        permutation: model axis m takes input voxel axis ``permutation[m]``.
        flips: model axes that run opposite to their input axis.
        oriented_shape: the input's shape after permutation (model axis order).
        shape: the model grid's shape.
        ijk_to_ras: the model grid's voxel-to-RAS matrix.
    """

    permutation: tuple[int, int, int]
    flips: tuple[int, ...]
    oriented_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    @classmethod
    def plan(
        cls,
        input_shape_ijk: tuple[int, int, int],
        ijk_to_ras: np.ndarray,
        orientation: str | None,
        spacing: tuple[float, float, float] | None,
    ) -> ModelGrid:
        """Works out the model grid for an input grid.

        Args:
            input_shape_ijk: the input's size along i, j, k.
            ijk_to_ras: the input's voxel-to-RAS matrix.
            orientation: target orientation code, or None to keep the voxel order.
            spacing: target spacing (model axis order), or None to keep the input's.
        """
        ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
        if orientation is None:
            permutation, flips = (0, 1, 2), ()
        else:
            world_of_axis, sign_of_axis = _closest_axes(ijk_to_ras)
            axis_of_world = {w: a for a, w in enumerate(world_of_axis)}
            permutation_list, flip_list = [], []
            for model_axis, letter in enumerate(orientation):
                world, wanted_sign = _AXIS_OF_LETTER[letter]
                input_axis = axis_of_world[world]
                permutation_list.append(input_axis)
                if sign_of_axis[input_axis] != wanted_sign:
                    flip_list.append(model_axis)
            permutation, flips = tuple(permutation_list), tuple(flip_list)
        oriented_shape = tuple(int(input_shape_ijk[a]) for a in permutation)
        # Input index = P @ oriented index + offset.
        reorient = np.zeros((4, 4))
        reorient[3, 3] = 1.0
        for model_axis, input_axis in enumerate(permutation):
            if model_axis in flips:
                reorient[input_axis, model_axis] = -1.0
                reorient[input_axis, 3] = oriented_shape[model_axis] - 1
            else:
                reorient[input_axis, model_axis] = 1.0
        oriented_to_ras = ijk_to_ras @ reorient
        current_spacing = np.linalg.norm(oriented_to_ras[:3, :3], axis=0)
        if spacing is None:
            shape = oriented_shape
        else:
            shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(oriented_shape, current_spacing, spacing))
        from DeepSegModuleLib import limits

        limits.VOXELS.check(float(np.prod(shape, dtype=np.float64)),
                            f"the input resampled to the model's spacing {tuple(spacing or ())} mm")  # fmt: skip
        scale = np.array(oriented_shape, dtype=np.float64) / np.array(shape, dtype=np.float64)
        rescale = np.eye(4)
        rescale[:3, :3] = np.diag(scale)
        rescale[:3, 3] = (scale - 1.0) / 2.0
        return cls(permutation, flips, oriented_shape, shape, oriented_to_ras @ rescale)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    def reorient(self, channels_ijk: torch.Tensor) -> torch.Tensor:
        """(C, i, j, k) input-grid tensor -> (C, *oriented_shape) (no resampling)."""
        oriented = channels_ijk.permute(0, *(a + 1 for a in self.permutation))
        if self.flips:
            oriented = torch.flip(oriented, dims=[a + 1 for a in self.flips])
        return oriented

    def unorient(self, channels_oriented: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`reorient`."""
        if self.flips:
            channels_oriented = torch.flip(channels_oriented, dims=[a + 1 for a in self.flips])
        inverse = [0] * 3
        for model_axis, input_axis in enumerate(self.permutation):
            inverse[input_axis] = model_axis
        return channels_oriented.permute(0, *(a + 1 for a in inverse))

    def to_model(self, channels_ijk: torch.Tensor, mode: str = "trilinear") -> torch.Tensor:
        """(C, i, j, k) on the input grid -> (C, *shape) on the model grid."""
        oriented = self.reorient(channels_ijk)
        return resize(oriented, self.shape, mode)

    def to_input(self, channels_model: torch.Tensor, mode: str = "trilinear") -> torch.Tensor:
        """(C, *shape) on the model grid -> (C, i, j, k) on the input grid."""
        return self.unorient(resize(channels_model, self.oriented_shape, mode))


def resize(channels: torch.Tensor, shape: tuple[int, ...], mode: str = "trilinear") -> torch.Tensor:
    """Resizes (C, X, Y, Z) keeping the outer edges in place; no-op when the shape already matches."""
    if tuple(channels.shape[1:]) == tuple(shape):
        return channels
    dtype = channels.dtype
    source = channels if dtype.is_floating_point else channels.float()
    kwargs = {"align_corners": False} if mode in ("trilinear", "linear") else {}
    resized = F.interpolate(source[None], size=tuple(int(s) for s in shape), mode=mode, **kwargs)[0]
    return resized if dtype.is_floating_point else resized.to(dtype)


def _source_positions(old: int, new: int, linear: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``new`` output positions along an axis of ``old`` samples: the lower and upper source
    index and the weight of the upper one, as ``F.interpolate(align_corners=False)`` computes them (linear)
    or as nnU-Net's nearest-neighbour rule along a low-resolution axis picks one index (weight 0)."""
    coords = (torch.arange(new, dtype=torch.float64) + 0.5) * (old / new) - 0.5
    if not linear:
        index = torch.clamp(torch.floor(coords + 0.5), 0, old - 1).to(torch.int64)
        return index, index, torch.zeros(new, dtype=torch.float32)
    coords = coords.clamp(min=0.0)
    lower = coords.floor().to(torch.int64).clamp(max=old - 1)
    upper = (lower + 1).clamp(max=old - 1)
    return lower, upper, (coords - lower).to(torch.float32)


def resized_labels(
    channels: torch.Tensor,
    shape: tuple[int, int, int],
    to_labels: Callable[[torch.Tensor], torch.Tensor],
    nearest_axis: int | None = None,
    slab_bytes: int = 128 * 2**20,
) -> torch.Tensor:
    """Resizes ``(C, X, Y, Z)`` network outputs to ``shape`` and reduces them to a label map, a slab at a time.

    Equal to ``to_labels`` applied to :func:`resize` (trilinear, edges kept) of the whole stack, but the
    resized outputs never exist at once: slabs of output slices along one axis are interpolated (linear
    along that axis, bilinear across it: trilinear is separable) and reduced right away. Memory stays at
    ``slab_bytes`` beyond the label map whatever the number of labels, and the work is cache-sized.

    Args:
        channels: outputs on the model grid.
        shape: the output grid's size.
        to_labels: ``(n, C, Y', Z')`` resized outputs of ``n`` slices -> ``(n, Y', Z')`` labels.
        nearest_axis: an axis resized with nnU-Net's nearest-neighbour rule instead of linearly (its
            low-resolution axis of an anisotropic grid); slabs run along it.
        slab_bytes: about how many bytes of resized outputs to hold at a time.
    """
    axis = 0 if nearest_axis is None else int(nearest_axis)
    source = channels.movedim(1 + axis, 1)  # a view: (C, A, B, D) with A the slab axis
    out_shape = [int(s) for s in shape]
    slab_length = out_shape[axis]
    plane = [s for a, s in enumerate(out_shape) if a != axis]
    lower, upper, weight = _source_positions(source.shape[1], slab_length, linear=nearest_axis is None)
    lower, upper, weight = lower.to(source.device), upper.to(source.device), weight.to(source.device)
    per_slice = max(channels.shape[0] * plane[0] * plane[1] * 4, 1)
    step = max(1, int(slab_bytes) // per_slice)
    labels = None
    for start in range(0, slab_length, step):
        stop = min(start + step, slab_length)
        slab = source.index_select(1, lower[start:stop])
        if bool((weight[start:stop] > 0).any()):
            above = source.index_select(1, upper[start:stop])
            slab = torch.lerp(slab.float(), above.float(), weight[start:stop].view(1, -1, 1, 1))
            del above
        slab = slab.float().transpose(0, 1)  # (n, C, B, D)
        if list(slab.shape[2:]) != plane:
            slab = F.interpolate(slab, size=plane, mode="bilinear", align_corners=False)
        reduced = to_labels(slab)
        del slab
        if labels is None:
            labels = torch.empty((slab_length, *plane), dtype=reduced.dtype, device=reduced.device)
        labels[start:stop] = reduced
    assert labels is not None
    return labels.movedim(0, axis)
