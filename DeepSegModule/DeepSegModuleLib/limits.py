"""Limits on what foreign input may make DeepSeg allocate or wait for, each checked before the work.

A one-kilobyte image can declare a grid of terabytes, a one-megabyte zip can expand to a gigabyte, and a server
can send one byte every few seconds forever. Every limit here has a default sized for real data (a whole-body
CT, TotalSegmentator's largest release, a 100-label segmentation) and an environment variable that raises it.
The error a limit raises names the variable.

| variable                          | default      | what it bounds                                              |
|-----------------------------------|--------------|-------------------------------------------------------------|
| ``DEEPSEG_MAX_UNPACKED_BYTES``    | 8 GiB        | what one model archive may expand to                        |
| ``DEEPSEG_MAX_ARCHIVE_ENTRIES``   | 100000       | files in one model archive                                  |
| ``DEEPSEG_MAX_COMPRESSION_RATIO`` | 100          | how much more an archive over 64 MiB may expand to than it holds |
| ``DEEPSEG_MAX_DOWNLOAD_BYTES``    | 8 GiB        | one download (when the catalog gives no size)               |
| ``DEEPSEG_DOWNLOAD_STALL_S``      | 60           | seconds a download may receive nothing                      |
| ``DEEPSEG_DOWNLOAD_DEADLINE_S``   | 7200         | seconds one download may take in all                       |
| ``DEEPSEG_MAX_VOXELS``            | 2^29 (5.4e8) | voxels of an input image, and of any grid it is resampled to |
| ``DEEPSEG_MAX_SEGMENTS``          | 2000         | segments in one ``.seg.nrrd``                               |
| ``DEEPSEG_MAX_UNPACKED_CACHE_BYTES`` | 20 GiB    | the cache of unpacked model archives (oldest removed first) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class LimitExceeded(ValueError):
    """Input asks for more than a limit allows; the message names the limit's environment variable."""


@dataclass(frozen=True)
class Limit:
    variable: str
    default: int
    unit: str = ""

    def value(self) -> int:
        """The limit in force: the environment variable when set to a positive number, else the default."""
        text = os.environ.get(self.variable, "").strip()
        try:
            value = int(float(text)) if text else self.default
        except ValueError:
            raise LimitExceeded(f"{self.variable}={text!r} is not a number") from None
        return value if value > 0 else self.default

    def check(self, amount: float, what: str) -> None:
        """Raises LimitExceeded when ``amount`` is over the limit, naming ``what`` and how to raise it."""
        limit = self.value()
        if amount > limit:
            raise LimitExceeded(
                f"{what} is {_readable(amount, self.unit)}, over DeepSeg's limit of {_readable(limit, self.unit)}. "
                f"If this is expected, raise it: export {self.variable}={int(amount) + 1}"
            )


def _readable(amount: float, unit: str) -> str:
    if unit == "bytes":
        for scale, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if amount >= scale:
                return f"{amount / scale:.1f} {name}"
        return f"{int(amount)} bytes"
    if unit == "s":
        return f"{amount:g} s"
    return f"{amount:,.0f}{(' ' + unit) if unit else ''}"


UNPACKED_BYTES = Limit("DEEPSEG_MAX_UNPACKED_BYTES", 8 << 30, "bytes")
ARCHIVE_ENTRIES = Limit("DEEPSEG_MAX_ARCHIVE_ENTRIES", 100_000, "entries")
# weights hardly compress (about 1.1:1); a zip that inflates a hundredfold is a bomb, not a model
COMPRESSION_RATIO = Limit("DEEPSEG_MAX_COMPRESSION_RATIO", 100, "times")
DOWNLOAD_BYTES = Limit("DEEPSEG_MAX_DOWNLOAD_BYTES", 8 << 30, "bytes")
DOWNLOAD_STALL_S = Limit("DEEPSEG_DOWNLOAD_STALL_S", 60, "s")
DOWNLOAD_DEADLINE_S = Limit("DEEPSEG_DOWNLOAD_DEADLINE_S", 7200, "s")
# 512 x 512 x 2048: a whole-body CT at 0.5 mm slices; a 2 GiB float32 volume before any copy
VOXELS = Limit("DEEPSEG_MAX_VOXELS", 1 << 29, "voxels")
SEGMENTS = Limit("DEEPSEG_MAX_SEGMENTS", 2000, "segments")
UNPACKED_CACHE_BYTES = Limit("DEEPSEG_MAX_UNPACKED_CACHE_BYTES", 20 << 30, "bytes")
