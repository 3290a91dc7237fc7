"""Registration engine: rigid, affine and diffeomorphic deformable registration on torch/MONAI.

No MRML here: images are ``(k, j, i)`` arrays with a 4x4 ``ijk_to_ras``; results are a RAS
``fixed_to_moving_ras`` matrix and RAS-mm displacement fields on the fixed grid (see
:class:`RegistrationResult` for the exact conventions).
"""

from __future__ import annotations

from DeepSegModuleLib.lazy import lazy_attributes

# Names are imported from their submodules on first use: the command line reads the preset names (presets.py,
# no torch) to check an argument in a fraction of a second, without importing the engine.
_SUBMODULE_OF = {
    "RegistrationCancelled": "pyramid", "RegistrationResult": "resampling", "register": "engine",
    "PRESETS": "presets", "RegistrationConfig": "presets", "get_preset": "presets", "preset_names": "presets",
    "with_overrides": "presets", "RegistrationOptions": "presets", "linear_preset_names": "presets",
    "QualityReport": "results", "RegistrationOutputs": "results", "deformation_quality": "quality", "dice_per_label": "quality",
    "jacobian_determinant": "quality", "landmark_errors": "quality",
}  # fmt: skip


__getattr__ = lazy_attributes(__name__, _SUBMODULE_OF, globals())


__all__ = [
    "PRESETS",
    "QualityReport",
    "RegistrationOutputs",
    "RegistrationCancelled",
    "RegistrationConfig",
    "RegistrationOptions",
    "RegistrationResult",
    "deformation_quality",
    "dice_per_label",
    "get_preset",
    "jacobian_determinant",
    "landmark_errors",
    "linear_preset_names",
    "preset_names",
    "register",
    "with_overrides",
]
