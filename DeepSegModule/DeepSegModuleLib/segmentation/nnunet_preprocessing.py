"""nnU-Net v2's preprocessing and its inverse, reproduced for in-memory volumes.

nnU-Net works in the input's own voxel space, in SimpleITK array order (k, j, i) with spacing
(sk, sj, si), which is exactly Slicer's array order. In order, as ``DefaultPreprocessor`` does it:
transpose by ``transpose_forward``; crop to the bounding box of the non-zero region (holes
filled); normalise each channel with its scheme (before resampling, as nnU-Net insists); resample
to the target spacing with a third-order spline, or, when the spacing is anisotropic (max/min > 3),
slice by slice in-plane and nearest-neighbour along the low-resolution axis. The network's logits
come back through the same rule with first order, are placed into the uncropped grid (background
outside the crop) and transposed back. The spline and linear resizes follow
``skimage.transform.resize(mode="edge", anti_aliasing=False)`` (``scipy.ndimage.zoom`` in grid mode,
clipped to the input range), so results match nnU-Net's own predictor.

For a 2d configuration (``NnunetPlan.in_plane_spacing``) the target spacing is the input's own spacing along
the first transposed axis, the slice axis, followed by the configuration's two in-plane spacings, as in
nnU-Net: slices are never resampled along that axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from DeepSegModuleLib.models.description import ModelDescription, NormalizationMode
from DeepSegModuleLib.segmentation.grid import ModelGrid, resized_labels
from DeepSegModuleLib.segmentation.normalization import normalize
from DeepSegModuleLib.segmentation.volume import VolumeArray

ANISOTROPY_THRESHOLD = 3.0


def separate_axis(current_spacing: Sequence[float], new_spacing: Sequence[float]) -> int | None:
    """The low-resolution axis to resample separately, or None (nnU-Net's rule)."""
    for spacing in (current_spacing, new_spacing):
        spacing = np.asarray(spacing, dtype=float)
        if spacing.max() / spacing.min() > ANISOTROPY_THRESHOLD:
            axes = np.where(spacing.max() / spacing == 1)[0]
            return int(axes[0]) if len(axes) == 1 else None
    return None


@functools.lru_cache(maxsize=32)
def _resize_matrix(old: int, new: int, order: int) -> torch.Tensor:
    """The 1D spline resize of ``old`` samples to ``new`` as a (new, old) float32 matrix (scipy's own zoom of
    the identity, so prefilter, boundary mode and grid are scipy's)."""
    identity = np.eye(old)
    return torch.from_numpy(
        ndimage.zoom(identity, (new / old, 1.0), order=order, mode="nearest", grid_mode=True)
    ).float()


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(image, shape, order, mode="edge", anti_aliasing=False)``.

    That is ``scipy.ndimage.zoom(order, mode="nearest", grid_mode=True)`` clipped to the input range. A
    spline's prefilter and interpolation are linear and separable, so the resize is one small matrix per
    axis: three float32 matrix products give scipy's answer to float32 rounding (1e-5 HU on a CT) about 3x
    faster on one core, multi-threaded, and without scipy's float64 copy of the padded image (1.1 GB for a
    512x512x300 CT).
    """
    if tuple(image.shape) == tuple(shape):
        return image
    resized = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    for axis in range(image.ndim):
        if resized.shape[axis] == shape[axis]:
            continue
        matrix = _resize_matrix(int(resized.shape[axis]), int(shape[axis]), order)
        resized = torch.tensordot(matrix, resized, dims=([1], [axis])).movedim(0, axis)
    out = resized.contiguous().numpy()
    if order > 0:
        np.clip(out, image.min(), image.max(), out=out)
    return out.astype(image.dtype, copy=False)


def _nearest_along(data: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Nearest-neighbour resize along one axis with nnU-Net's (align_corners=False) coordinates."""
    old = data.shape[axis]
    if old == size:
        return data
    coords = (np.arange(size) + 0.5) * (old / size) - 0.5
    index = np.clip(np.floor(coords + 0.5), 0, old - 1).astype(np.int64)
    return np.take(data, index, axis=axis)


def resample_like_nnunet(
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int,
) -> np.ndarray:
    """Resamples (C, X, Y, Z) as nnU-Net's ``resample_data_or_seg_to_shape`` (order_z = 0)."""
    new_shape = [int(s) for s in new_shape]
    if tuple(data.shape[1:]) == tuple(new_shape):
        return data
    axis = separate_axis(current_spacing, new_spacing)
    # float32 in, float32 out: scipy's spline filter and interpolation compute in float64 anyway, so a float64
    # copy of the image (630 MB for a 512x512x300 CT) would change nothing but memory and time (2x).
    source = data.astype(np.float32, copy=False)
    result = np.empty((data.shape[0], *new_shape), dtype=data.dtype)
    for channel in range(data.shape[0]):
        if axis is None:
            result[channel] = _resize(source[channel], new_shape, order)
            continue
        in_plane = [s for a, s in enumerate(new_shape) if a != axis]
        slices = [
            _resize(np.take(source[channel], index, axis=axis), in_plane, order)
            for index in range(data.shape[1 + axis])
        ]
        stacked = np.stack(slices, axis=axis)
        result[channel] = _nearest_along(stacked, axis, new_shape[axis])
    return result


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        hits = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


class NnunetPreprocessor:
    """nnU-Net's preprocessing for one run (see the module docstring)."""

    def __init__(self, description: ModelDescription) -> None:
        self.description = description
        plan = description.nnunet
        assert plan is not None, "an nnU-Net model carries its plan"
        self.plan = plan
        self.transpose_forward = list(plan.transpose_forward)
        self.transpose_backward = list(plan.transpose_backward)
        self.use_mask = list(plan.use_mask_for_norm) or [False] * len(description.inputs)
        self.shape_before_crop: tuple[int, ...] = ()
        self.crop: tuple[slice, ...] = ()
        self.spacing: list[float] = []
        self.grid: ModelGrid | None = None

    def target_spacing(self) -> tuple[float, ...]:
        """The model grid's spacing for this run's (transposed) input spacing."""
        in_plane = self.plan.in_plane_spacing
        if in_plane is not None:
            return (self.spacing[0], *(float(s) for s in in_plane))
        return self.description.spacing or tuple(self.spacing)

    def prepare(self, volumes: list[VolumeArray], device: torch.device) -> torch.Tensor:
        reference = volumes[0]
        self.grid = None
        if self.description.orientation is not None:
            # Reorient (permute/flip only) first, so nnU-Net sees the voxel order its training data had.
            self.grid = ModelGrid.plan(
                reference.array.shape[::-1], reference.ijk_to_ras, self.description.orientation, None
            )
            oriented = []
            for volume in volumes:
                ijk = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)).permute(2, 1, 0)[None]
                oriented.append(self.grid.reorient(ijk)[0].permute(2, 1, 0).numpy())
            volumes = [VolumeArray(array, self.grid.ijk_to_ras) for array in oriented]
        spacing_kji = volumes[0].spacing[::-1]
        data = np.stack([np.asarray(v.array, dtype=np.float32) for v in volumes])
        data = data.transpose([0, *[t + 1 for t in self.transpose_forward]])
        self.spacing = [float(spacing_kji[t]) for t in self.transpose_forward]
        self.shape_before_crop = tuple(data.shape[1:])
        nonzero = ndimage.binary_fill_holes((data != 0).any(axis=0))
        self.crop = _bounding_box(nonzero)
        data = np.ascontiguousarray(data[(slice(None), *self.crop)])
        mask = torch.from_numpy(np.ascontiguousarray(nonzero[self.crop]))
        for channel, spec in enumerate(spec.normalization for spec in self.description.inputs):
            values = torch.from_numpy(data[channel])  # shares memory with `data`, this run's own copy
            if spec.mode == NormalizationMode.CT:
                # In place, the same arithmetic as normalize(): three CT-sized temporaries (0.9 GB for a
                # 512x512x300 CT, the run's peak) are never made.
                values.clamp_(float(spec.lower), float(spec.upper)).sub_(float(spec.mean))
                values.div_(max(float(spec.std), 1e-8))
                continue
            if spec.mode == NormalizationMode.ZSCORE and self.use_mask[channel]:
                normalized = normalize(values, spec, mask=mask)
                values = torch.where(mask, normalized, values)
            else:
                values = normalize(values, spec.__class__(**{**spec.__dict__, "nonzero": False}))
            data[channel] = values.numpy()
        target = self.target_spacing()
        new_shape = [round(s / t * n) for s, t, n in zip(self.spacing, target, data.shape[1:])]
        from DeepSegModuleLib import limits

        limits.VOXELS.check(float(np.prod(new_shape, dtype=np.float64)),
                            f"the input resampled to the model's spacing {tuple(target)} mm")  # fmt: skip
        self.shape_after_crop = tuple(data.shape[1:])
        data = resample_like_nnunet(data, new_shape, self.spacing, target, order=3)
        return torch.from_numpy(np.ascontiguousarray(data))[None].to(device)

    def to_input_grid(self, channels: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
        target = self.target_spacing()
        axis = separate_axis(target, self.spacing)
        size = self.shape_after_crop
        if tuple(channels.shape[1:]) != tuple(size):
            if axis is None:
                channels = F.interpolate(channels[None].float(), size=size, mode="trilinear", align_corners=False)[0]
            else:
                in_plane = [size[a] if a != axis else channels.shape[1 + a] for a in range(3)]
                channels = F.interpolate(channels[None].float(), size=in_plane, mode="trilinear", align_corners=False)[
                    0
                ]
                old = channels.shape[1 + axis]
                coords = (torch.arange(size[axis], dtype=torch.float64) + 0.5) * (old / size[axis]) - 0.5
                index = torch.clamp(torch.floor(coords + 0.5), 0, old - 1).to(torch.int64).to(channels.device)
                channels = torch.index_select(channels, 1 + axis, index)
        full = torch.empty((channels.shape[0], *self.shape_before_crop), dtype=channels.dtype, device=channels.device)
        for g in range(channels.shape[0]):
            full[g] = float(fill[g]) if g < len(fill) else 0.0
        full[(slice(None), *self.crop)] = channels
        return self._back_to_input_axes(full)

    def _back_to_input_axes(self, full: torch.Tensor) -> torch.Tensor:
        """(G, *uncropped transposed grid) -> (G, i, j, k) on the first input's grid."""
        full = full.permute(0, *[t + 1 for t in self.transpose_backward])  # (G, k, j, i)
        full = full.permute(0, 3, 2, 1)
        return self.grid.unorient(full) if self.grid is not None else full

    def labels_to_input_grid(
        self, channels: torch.Tensor, to_labels: Callable[[torch.Tensor], torch.Tensor], background: int
    ) -> torch.Tensor:
        """Resamples ``(C, *model grid)`` outputs as :meth:`to_input_grid` does and reduces them to labels slab
        by slab (see :func:`~DeepSegModuleLib.segmentation.grid.resized_labels`); ``background`` outside the
        crop. Returns ``(i, j, k)``."""
        target = self.target_spacing()
        axis = separate_axis(target, self.spacing)
        labels = resized_labels(channels, self.shape_after_crop, to_labels, nearest_axis=axis)
        if tuple(labels.shape) == tuple(self.shape_before_crop):
            full = labels
        else:
            full = torch.full(self.shape_before_crop, background, dtype=labels.dtype, device=labels.device)
            full[self.crop] = labels
        return self._back_to_input_axes(full[None])[0]
