"""Errors raised while reading models. Each message says what the user can do about it."""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every model-reading error."""


class ModelFormatError(ModelError, ValueError):
    """The file or folder is not a model DeepSeg can read, or its description is inconsistent."""


class ModelFileError(ModelError, OSError):
    """A model file is missing, truncated or damaged."""


class ChecksumError(ModelFileError):
    """A model file's sha256 does not match the one recorded for it."""


class UnsafeArchiveError(ModelError, ValueError):
    """An archive contains entries that would be written outside the extraction folder, or is a zip bomb."""


class ModelMismatchError(ModelError, ValueError):
    """The network does not behave as its description says (channel counts, shapes)."""


def load_error_detail(error: BaseException) -> str:
    """The line of a torch loading error that says what is wrong, without torch's advice to load unsafely.

    ``torch.load`` answers a refused pickle with "...do those steps only if you trust the source...
    weights_only=False"; DeepSeg never does that for the user, so the advice is not passed on.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.split("We recommend")[0].strip()
    kept = [line for line in lines if "weights_only" not in line and "trust the source" not in line]
    return (kept[0] if kept else type(error).__name__)[:300]
