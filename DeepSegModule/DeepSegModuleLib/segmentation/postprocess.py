"""Clean-up of a label map on the input grid: largest component, hole filling, speck removal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from scipy import ndimage

_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


def _regions(labels: np.ndarray, values: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Each present label value with the view of ``labels`` on its bounding box (edits go into ``labels``)."""
    for value in values:
        boxes = ndimage.find_objects((labels == value).astype(np.uint8))
        if boxes and boxes[0] is not None:
            yield value, labels[boxes[0]]


def keep_largest_component(labels: np.ndarray, values: Iterable[int]) -> None:
    """For each label value, keeps only its largest connected component (in place)."""
    for value, region in _regions(labels, values):
        components, count = ndimage.label(region == value, structure=_CONNECTIVITY)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        region[(components != 0) & (components != int(np.argmax(sizes)))] = 0


def fill_holes(labels: np.ndarray, values: Iterable[int]) -> None:
    """For each label value, fills enclosed background holes with that value (in place)."""
    for value, region in _regions(labels, values):
        filled = ndimage.binary_fill_holes(region == value, structure=_CONNECTIVITY)
        region[filled & (region == 0)] = value


def remove_small_components(labels: np.ndarray, values: Iterable[int], min_voxels: int) -> None:
    """Sets connected components smaller than ``min_voxels`` voxels to background (in place)."""
    if min_voxels <= 1:
        return
    for value, region in _regions(labels, values):
        components, count = ndimage.label(region == value, structure=_CONNECTIVITY)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())
        small = np.nonzero(sizes < min_voxels)[0]
        small = small[small != 0]
        if small.size:
            region[np.isin(components, small)] = 0
