"""Images as they cross the engine boundary: a (k, j, i) array plus its IJK-to-RAS matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclass
class VolumeArray:
    """One image volume.

    Attributes:
        array: voxel values in Slicer's (k, j, i) axis order, as ``slicer.util.arrayFromVolume`` returns.
        ijk_to_ras: 4x4 float64 matrix mapping homogeneous (i, j, k, 1) to RAS millimetres.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {self.ijk_to_ras.shape}")
        if self.array.ndim != 3:
            raise ValueError(
                f"expected a 3D volume (k, j, i), got an array of shape {self.array.shape}; "
                "2D images and time series are not supported: pick a 3D volume"
            )
        if abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12:
            raise ValueError("ijk_to_ras is singular (zero spacing or collinear axes); fix the volume's geometry")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm."""
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))


def as_volume(image: Any) -> VolumeArray:
    """Accepts a :class:`VolumeArray` or an ``(array, ijk_to_ras)`` pair."""
    if isinstance(image, VolumeArray):
        return image
    if isinstance(image, Sequence) and len(image) == 2:
        return VolumeArray(image[0], image[1])
    raise TypeError("an image is a VolumeArray or an (array in (k, j, i) order, 4x4 ijk_to_ras) pair")


def to_sitk(volume: VolumeArray) -> sitk.Image:
    """A SimpleITK image (LPS physical space) with the same voxels and geometry."""
    from DeepSegModuleLib.nodes import array_to_sitk

    return array_to_sitk(volume.array, volume.ijk_to_ras)


def resample_onto(moving: VolumeArray, reference: VolumeArray) -> VolumeArray:
    """Resamples ``moving`` onto ``reference``'s grid in physical space (linear, zero outside)."""
    if moving.array.shape == reference.array.shape and np.allclose(moving.ijk_to_ras, reference.ijk_to_ras, atol=1e-6):
        return moving
    fixed_image = to_sitk(VolumeArray(np.zeros(reference.array.shape, np.uint8), reference.ijk_to_ras))
    moving_image = to_sitk(VolumeArray(moving.array.astype(np.float32, copy=False), moving.ijk_to_ras))
    resampled = sitk.Resample(moving_image, fixed_image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return VolumeArray(sitk.GetArrayFromImage(resampled), reference.ijk_to_ras)
