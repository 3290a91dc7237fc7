"""What a segmentation run gives back, without torch: the engine returns it, the worker sends it back unchanged
(its arrays through shared memory) and the Slicer side reads it (see :class:`~DeepSegModuleLib.logic.SegmentationOutcome`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from DeepSegModuleLib.labels import LabelInfo


@dataclass
class SegmentationResult:
    """The engine's answer, on the first input's grid.

    Attributes:
        labels: integer label map in (k, j, i) order (uint8, or uint16 past 255).
        ijk_to_ras: the grid of ``labels`` (the first input's).
        label_table: one :class:`LabelInfo` per kept label, in value order.
        probabilities: label value -> float32 probability map (k, j, i), when asked for.
        timings: seconds per stage (``load``, ``preprocess``, ``inference``, ``resample``, ``postprocess``,
            ``total``).
        peak_memory: ``cuda_peak_bytes`` (this run) and ``process_peak_rss_bytes`` (the process's high-water
            mark so far), in bytes.
        model_from_cache: True when the model was already loaded.
        device: where the network ran in the end (after any fallback).
        messages: user-readable notes (fallbacks, skipped steps).
        model_name: the model's name from its description.
        model_version: the model's version from its description ("" when it gives none).
    """

    labels: np.ndarray
    ijk_to_ras: np.ndarray
    label_table: list[LabelInfo]
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    model_from_cache: bool = False
    device: str = "cpu"
    messages: list[str] = field(default_factory=list)
    model_name: str = ""
    model_version: str = ""

    def report(self) -> dict[str, Any]:
        """The run's figures as plain values (for JSON, the panel's log and batch summaries)."""
        return {
            "timings_s": dict(self.timings),
            "peak_memory_bytes": dict(self.peak_memory),
            "model_from_cache": self.model_from_cache,
            "device": self.device,
            "messages": list(self.messages),
        }

    def volumes_ml(self) -> dict[str, float]:
        """Each kept label's volume in millilitres, by name, rounded to 0.01 ml."""
        voxel_ml = abs(float(np.linalg.det(np.asarray(self.ijk_to_ras)[:3, :3]))) / 1000.0
        return {info.name: round(float((self.labels == info.value).sum()) * voxel_ml, 2) for info in self.label_table}
