"""Models: every supported format read into one :class:`ModelDescription`, a local store, a warm cache.

Public API::

    from DeepSegModuleLib.models import load_model, ModelCache, ModelStore, detect_format
    model = load_model("path/to/model_or_zip", device="auto")   # LoadedModel: description + predictor
"""

from __future__ import annotations

from DeepSegModuleLib.lazy import lazy_attributes

# Names are imported from their submodules on first use, so that listing or verifying the model store (what
# Slicer's panel does when it opens) does not import torch into the application.
_SUBMODULE_OF = {
    "safe_extract_zip": "archive", "sha256_of_file": "archive", "verify_sha256": "archive",
    "ModelCache": "cache", "default_cache": "cache",
    "InputSpec": "description", "LoadedModel": "description", "ModelDescription": "description",
    "ModelFormat": "description", "NormalizationMode": "description", "NormalizationSpec": "description",
    "OutputActivation": "description", "Tiling": "description",
    "ChecksumError": "errors", "ModelError": "errors", "ModelFileError": "errors", "ModelFormatError": "errors",
    "ModelMismatchError": "errors", "UnsafeArchiveError": "errors",
    "detect_format": "loader", "load_model": "loader", "resolve_device": "loader",
    "ModelStore": "store", "StoredModel": "store",
}  # fmt: skip


__getattr__ = lazy_attributes(__name__, _SUBMODULE_OF, globals())


__all__ = [
    "ChecksumError", "InputSpec", "LoadedModel", "ModelCache", "ModelDescription", "ModelError", "ModelFileError",
    "ModelFormat", "ModelFormatError", "ModelMismatchError", "ModelStore", "NormalizationMode", "NormalizationSpec",
    "OutputActivation", "StoredModel", "Tiling", "UnsafeArchiveError", "default_cache", "detect_format", "load_model",
    "resolve_device", "safe_extract_zip", "sha256_of_file", "verify_sha256",
]  # fmt: skip
