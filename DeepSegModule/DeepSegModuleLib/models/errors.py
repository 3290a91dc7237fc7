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
