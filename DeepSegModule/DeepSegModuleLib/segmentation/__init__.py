"""The segmentation engine (pure torch / MONAI / SimpleITK / numpy; no MRML).

Public API::

    from DeepSegModuleLib.segmentation import segment, SegmentationOptions, VolumeArray
    result = segment(VolumeArray(array_kji, ijk_to_ras), "path/to/model", SegmentationOptions(device="auto"))
    result.labels, result.ijk_to_ras, result.label_table, result.probabilities, result.timings
"""

from __future__ import annotations

from DeepSegModuleLib.segmentation.inference import SegmentationCancelled
from DeepSegModuleLib.segmentation.pipeline import (
    SegmentationOptions,
    SegmentationResult,
    check_inputs,
    segment,
    segment_with_models,
)
from DeepSegModuleLib.segmentation.volume import VolumeArray

__all__ = [
    "SegmentationCancelled",
    "SegmentationOptions",
    "SegmentationResult",
    "VolumeArray",
    "check_inputs",
    "segment",
    "segment_with_models",
]
