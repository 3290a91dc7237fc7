"""Registration engine: rigid, affine and diffeomorphic deformable registration on torch/MONAI.

No MRML here: images are ``(k, j, i)`` arrays with a 4x4 ``ijk_to_ras``; results are a RAS
``fixed_to_moving_ras`` matrix and RAS-mm displacement fields on the fixed grid (see
:class:`RegistrationResult` for the exact conventions).
"""

from __future__ import annotations

from .engine import RegistrationCancelled, RegistrationResult, register
from .presets import PRESETS, RegistrationConfig, get_preset, preset_names, with_overrides
from .quality import QualityReport, deformation_quality, dice_per_label, jacobian_determinant, landmark_errors

__all__ = [
    "PRESETS",
    "QualityReport",
    "RegistrationCancelled",
    "RegistrationConfig",
    "RegistrationResult",
    "deformation_quality",
    "dice_per_label",
    "get_preset",
    "jacobian_determinant",
    "landmark_errors",
    "preset_names",
    "register",
    "with_overrides",
]
