"""Bad input to the registration engine is refused before any work, with a message that says what to do."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from DeepSegModuleLib.registration import get_preset, register


# ----------------------------------------------------------------------------------------------
# Bad input


def small_volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((16, 16, 16)).astype(np.float32)


def test_2d_input_is_refused_with_advice():
    with pytest.raises(ValueError, match="3D volume"):
        register(np.ones((64, 64), np.float32), np.eye(4), small_volume(), np.eye(4), "rigid")
    with pytest.raises(ValueError, match="3D volume"):
        register(np.ones((1, 64, 64), np.float32), np.eye(4), small_volume(), np.eye(4), "rigid")


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match="fixed_mask is empty"):
        register(small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", fixed_mask=np.zeros((16, 16, 16)))
    with pytest.raises(ValueError, match="moving_mask is empty"):
        register(
            small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", moving_mask=np.zeros((16, 16, 16), bool)
        )


def test_images_that_do_not_overlap_are_refused_unless_aligned_first():
    far_away = np.eye(4)
    far_away[:3, 3] = (500.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="do not overlap"):
        register(small_volume(), np.eye(4), small_volume(1), far_away, "rigid", initial_alignment="none")


def test_unknown_preset_and_parameter_are_refused():
    with pytest.raises(ValueError, match="unknown registration preset"):
        get_preset("syn")
    with pytest.raises(ValueError, match="unknown registration parameter"):
        get_preset("rigid", learning_rate=1.0)
    with pytest.raises(ValueError, match="stages"):
        get_preset("rigid", stages=("deformable", "rigid"))
    assert get_preset("Deformable_Fast", regularization_weight=3.0).regularization_weight == 3.0


def test_unusable_device_and_initial_transform_are_refused():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            register(small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", device="cuda")
    with pytest.raises(ValueError, match="invertible 4x4"):
        register(
            small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", initial_fixed_to_moving_ras=np.zeros((4, 4))
        )
    with pytest.raises(ValueError, match="corresponding"):
        register(
            small_volume(),
            np.eye(4),
            small_volume(1),
            np.eye(4),
            "rigid",
            fixed_landmarks_ras=np.zeros((3, 3)),
            moving_landmarks_ras=np.zeros((4, 3)),
        )
