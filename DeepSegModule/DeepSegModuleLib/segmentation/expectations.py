"""What a model expects of its input, checked before it runs: a wrong input gives a warning, not a silent answer.

A brain model given an abdominal CT still returns "grey matter"; nothing in the numbers says the input was
wrong. A model card may say what the model was made for (``"expects"``, see docs/model_card.md)::

    "expects": {"body_region": "head", "modality": ["MR"], "extent_mm": [100, 320]}

- ``modality``: the modalities it was trained on. An image with a sizeable share of voxels at air's CT value
  (at most -500, at least 2 % of them) looks like a CT; one without looks like an MR (or a CT shifted to
  non-negative values, which is not told apart).
- ``extent_mm``: the physical size, per axis, of the images it was made for; an image larger than the upper
  bound, or smaller than half the lower bound, along its longest axis is flagged.

Each check gives a line starting with "Warning:" that says what was seen, what the model expects, and that the
result should not be trusted; the run still completes (the user decides).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: HU of air is -1000; MR intensities are not negative (or barely, after bias correction).
_AIR_HU = -500.0
_AIR_SHARE = 0.02


def looks_like(array: np.ndarray) -> str:
    """``"CT"`` when a sizeable share of voxels sits at air's Hounsfield value, else ``"MR"``."""
    sample = np.asarray(array).ravel()[:: max(1, array.size // 2_000_000)]
    return "CT" if np.count_nonzero(sample <= _AIR_HU) >= _AIR_SHARE * sample.size else "MR"


def check_expectations(array: np.ndarray, ijk_to_ras: np.ndarray, expects: Mapping[str, Any] | None,
                       model_name: str) -> list[str]:  # fmt: skip
    """Warnings for an input (k, j, i) array with its grid that is not what the model's card expects."""
    if not expects:
        return []
    warnings = []
    region = str(expects.get("body_region") or "").strip()
    made_for = f"{model_name} was made for {region + ' ' if region else ''}"
    modalities = expects.get("modality")
    if modalities:
        allowed = [str(m).upper() for m in (modalities if isinstance(modalities, Sequence) and not isinstance(
            modalities, str) else [modalities])]  # fmt: skip
        seen = looks_like(array)
        if seen not in allowed:
            evidence = ("many voxels at air's CT value (-1000 HU)" if seen == "CT"
                        else "no voxels at air's CT value (-1000 HU)")  # fmt: skip
            warnings.append(
                f"Warning: this image looks like {'a CT' if seen == 'CT' else 'an MR'} ({evidence}), but {made_for}"
                f"{' or '.join(allowed)} images; do not trust the result"
            )
    extent = expects.get("extent_mm")
    if isinstance(extent, Sequence) and len(extent) == 2:
        low, high = (float(v) for v in extent)
        size = np.asarray(array.shape[::-1], dtype=np.float64) * np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0)
        longest = float(size.max())
        if longest > high or longest < 0.5 * low:
            shown = " x ".join(f"{s:.0f}" for s in size)
            warnings.append(
                f"Warning: this image spans {shown} mm, but {made_for}images of {low:.0f} to {high:.0f} mm; is it "
                f"{'the right body region' if longest > high else 'cropped too tightly'}? Do not trust the result"
            )
    return warnings
