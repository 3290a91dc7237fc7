"""Models: every supported format read into one :class:`ModelDescription`, a local store, a warm cache.

Public API::

    from DeepSegModuleLib.models import load_model, ModelCache, ModelStore, detect_format
    model = load_model("path/to/model_or_zip", device="auto")   # LoadedModel: description + predictor
"""

from __future__ import annotations

from DeepSegModuleLib.models.archive import safe_extract_zip, sha256_of_file, verify_sha256
from DeepSegModuleLib.models.cache import ModelCache, default_cache
from DeepSegModuleLib.models.description import (
    InputSpec,
    LoadedModel,
    ModelDescription,
    ModelFormat,
    NormalizationMode,
    NormalizationSpec,
    OutputActivation,
    Tiling,
)
from DeepSegModuleLib.models.errors import (
    ChecksumError,
    ModelError,
    ModelFileError,
    ModelFormatError,
    ModelMismatchError,
    UnsafeArchiveError,
)
from DeepSegModuleLib.models.loader import detect_format, load_model, resolve_device
from DeepSegModuleLib.models.store import ModelStore, StoredModel

__all__ = [
    "ChecksumError", "InputSpec", "LoadedModel", "ModelCache", "ModelDescription", "ModelError", "ModelFileError",
    "ModelFormat", "ModelFormatError", "ModelMismatchError", "ModelStore", "NormalizationMode", "NormalizationSpec",
    "OutputActivation", "StoredModel", "Tiling", "UnsafeArchiveError", "default_cache", "detect_format", "load_model",
    "resolve_device", "safe_extract_zip", "sha256_of_file", "verify_sha256",
]  # fmt: skip
