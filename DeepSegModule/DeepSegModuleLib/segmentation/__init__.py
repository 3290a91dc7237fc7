"""The segmentation engine (pure torch / MONAI / SimpleITK / numpy; no MRML).

Public API::

    from DeepSegModuleLib.segmentation import segment, SegmentationOptions, VolumeArray
    result = segment(VolumeArray(array_kji, ijk_to_ras), "path/to/model", SegmentationOptions(device="auto"))
    result.labels, result.ijk_to_ras, result.label_table, result.probabilities, result.timings
"""

from __future__ import annotations

from DeepSegModuleLib.lazy import lazy_attributes

# Names are imported from their submodules on first use: the panel and the command line read the options and
# their choices (options.py, no torch) without importing the engine.
_SUBMODULE_OF = {
    "SegmentationCancelled": "inference",
    "SegmentationOptions": "options", "PRECISIONS": "options",
    "SegmentationResult": "results", "check_inputs": "pipeline", "segment": "pipeline",
    "segment_with_models": "pipeline",
    "VolumeArray": "volume",
}  # fmt: skip

__getattr__ = lazy_attributes(__name__, _SUBMODULE_OF, globals())

__all__ = [
    "PRECISIONS",
    "SegmentationCancelled",
    "SegmentationOptions",
    "SegmentationResult",
    "VolumeArray",
    "check_inputs",
    "segment",
    "segment_with_models",
]
