"""The registration quality report as lines for a person, without torch: the panel formats it in Slicer's
main process and the command line formats it before it has imported the engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def report_lines(quality: Mapping[str, Any]) -> list[str]:
    """A quality report in its plain-dict form (as it crosses the worker boundary) as short lines for a person:
    no empty fields, numbers to three significant digits. The panel and the ``deepseg`` command both use it."""

    def number(value: Any, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}g}"

    lines = []
    if quality.get("folding_percent") is not None:
        lines.append(
            f"folding {number(quality['folding_percent'])}% of voxels ({quality.get('quality_mask') or '-'}); "
            f"det J from {number(quality.get('jacobian_min'))} to {number(quality.get('jacobian_max'))}; "
            f"SD log J {number(quality.get('log_jacobian_std'))}"
        )
    if quality.get("dice"):
        per_label = ", ".join(f"{label}: {number(value)}" for label, value in sorted(quality["dice"].items()))
        lines.append(f"Dice {per_label}; mean {number(quality.get('mean_dice'))}")
    for when, statistics in sorted((quality.get("landmark_error_mm") or {}).items()):
        if isinstance(statistics, Mapping):
            values = ", ".join(f"{name} {number(value)}" for name, value in statistics.items())
            lines.append(f"landmark error {when} (mm): {values}")
        else:
            lines.append(f"landmark error {when}: {number(statistics)} mm")
    if quality.get("final_similarity"):
        values = ", ".join(f"{stage} {number(value)}" for stage, value in quality["final_similarity"].items())
        lines.append(f"final similarity: {values}")
    if quality.get("runtime_s"):
        lines.append("time: " + ", ".join(f"{stage} {value:.1f} s" for stage, value in quality["runtime_s"].items()))
    if quality.get("peak_memory_mb") is not None:
        lines.append(f"peak memory: {quality['peak_memory_mb']:.0f} MB")
    lines += [f"note: {note}" for note in quality.get("notes") or []]
    lines += [f"WARNING: {warning}" for warning in quality.get("warnings") or []]
    return lines
