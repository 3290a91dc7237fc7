"""What a registration run gives back, without torch: the worker sends :class:`RegistrationOutputs` (arrays through
shared memory) and the panel and the command line format its :class:`QualityReport` before, or without, importing
the engine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Up to this many structures the report lists each one's Dice; past it, the mean and the worst three.
_DICE_LISTED = 8


@dataclass
class QualityReport:
    """What a user checks after a registration.

    Attributes:
        folding_percent: Percent of voxels inside the quality mask whose Jacobian determinant of
            the deformable part ``p -> p + d(p)`` is <= 0 (folded). ``None`` without a deformable stage.
        log_jacobian_std: Standard deviation of ``log(det J)`` inside the mask (determinants
            clipped at 1e-9), Learn2Reg's SDlogJ.
        jacobian_min / jacobian_max: Extremes of det J inside the mask.
        quality_mask: What the Jacobian statistics were taken over (``"fixed mask"`` or
            ``"fixed foreground"``).
        dice: Dice per label value of the propagated moving labels against the fixed labels.
        mean_dice: Mean over the labels present in either map.
        landmark_error_mm: Statistics of ``|phi(p_fixed) - p_moving|`` in mm (mean, median, max),
            before (identity) and after registration.
        runtime_s: Seconds per stage and in total.
        peak_memory_mb: Peak CUDA memory allocated on a GPU, or the process' peak resident set on CPU.
        peak_memory_kind: ``"cuda_max_memory_allocated"`` or ``"process_peak_rss"``.
        final_similarity: Last loss value of each stage (lower is better).
        iterations: Optimiser iterations run per stage, one count per pyramid level (a level ends
            before its budget once its loss stops improving).
        warnings: Problems a user must know about (heavy folding, weak modality match).
        notes: What the engine decided on its own that changes the result (an automatic mask).
        label_names: Label value -> structure name, for ``dice`` (set by the caller that knows the segments).
    """

    folding_percent: float | None = None
    log_jacobian_std: float | None = None
    jacobian_min: float | None = None
    jacobian_max: float | None = None
    quality_mask: str = ""
    dice: dict[int, float] = field(default_factory=dict)
    mean_dice: float | None = None
    landmark_error_mm: dict[str, float] = field(default_factory=dict)
    runtime_s: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    peak_memory_kind: str = ""
    final_similarity: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as short lines for a person, for the panel's log and the command line alike: no empty
        fields, numbers to three significant digits."""

        def number(value: Any, digits: int = 3) -> str:
            return "n/a" if value is None else f"{value:.{digits}g}"

        lines = []
        if self.folding_percent is not None:
            lines.append(
                f"folding {number(self.folding_percent)}% of voxels ({self.quality_mask or '-'}); "
                f"det J from {number(self.jacobian_min)} to {number(self.jacobian_max)}; "
                f"SD log J {number(self.log_jacobian_std)}"
            )
        if self.dice:
            def name(label: int) -> str:
                return self.label_names.get(label, str(label))

            if len(self.dice) <= _DICE_LISTED:
                per_label = ", ".join(f"{name(label)}: {number(value)}" for label, value in sorted(self.dice.items()))
                lines.append(f"Dice {per_label}; mean {number(self.mean_dice)}")
            else:  # a brain's 30 structures: the mean and the worst, which is what a user looks for
                worst = sorted(self.dice.items(), key=lambda item: item[1])[:3]
                listed = ", ".join(f"{name(label)} {number(value)}" for label, value in worst)
                lines.append(f"Dice mean {number(self.mean_dice)} over {len(self.dice)} structures; worst: {listed}")
        for when, statistics in sorted(self.landmark_error_mm.items()):
            if isinstance(statistics, Mapping):
                values = ", ".join(f"{name} {number(value)}" for name, value in statistics.items())
                lines.append(f"landmark error {when} (mm): {values}")
            else:
                lines.append(f"landmark error {when}: {number(statistics)} mm")
        if self.final_similarity:
            values = ", ".join(f"{stage} {number(value)}" for stage, value in self.final_similarity.items())
            lines.append(f"final similarity: {values}")
        if self.runtime_s:
            lines.append("time: " + ", ".join(f"{stage} {value:.1f} s" for stage, value in self.runtime_s.items()))
        if self.peak_memory_mb is not None:
            lines.append(f"peak memory: {self.peak_memory_mb:.0f} MB")
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"WARNING: {warning}" for warning in self.warnings]
        return lines


@dataclass
class RegistrationOutputs:
    """A registration's results as they cross the worker boundary.

    Attributes:
        fixed_to_moving_ras: 4x4 linear part, fixed RAS point -> moving RAS point.
        resampled_moving: the moving image on the fixed grid, ``(k, j, i)``.
        quality: the quality report.
        device: where it ran.
        total_displacement_ras: ``(k, j, i, 3)`` RAS displacement on the fixed grid (linear and deformable parts
            together), for a grid transform; None for a linear preset.
        inverse_total_displacement_ras: the inverse's field on the moving grid, when asked for (deformable presets).
        propagated_labels: the moving labels on the fixed grid, when moving labels were given.
    """

    fixed_to_moving_ras: np.ndarray
    resampled_moving: np.ndarray
    quality: QualityReport
    device: str
    total_displacement_ras: np.ndarray | None = None
    inverse_total_displacement_ras: np.ndarray | None = None
    propagated_labels: np.ndarray | None = None
