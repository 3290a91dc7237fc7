"""The data DeepSegModuleTest runs on (Resources/Testing): rebuilt by its script, and right about itself.

The module test trusts these files: that the model labels what its card says, and that the moving brain is the fixed
one moved by the motion motion.json records, in the direction it records. Each is checked here without the code
the module test exercises (no model store, no registration engine), so a wrong file cannot hide behind a wrong engine.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from segmentation_helpers import dice, grid_center, oblique_grid, sphere_volume

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPT = REPOSITORY / "Resources" / "make_test_data.py"
TEST_DATA = REPOSITORY / "Resources" / "Testing"
MODEL = TEST_DATA / "BrightSphere"
PAIR = TEST_DATA / "BrainPair"


def _card(folder: Path) -> dict:
    return json.loads((folder / "deepseg.json").read_text(encoding="utf-8"))


def _image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NRRD file as its (k, j, i) voxels and IJK->RAS matrix (SimpleITK reads LPS)."""
    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    ijk_to_ras[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    return sitk.GetArrayFromImage(image), ijk_to_ras


def _network_outputs(weights: Path, intensities: torch.Tensor) -> torch.Tensor:
    network = torch.jit.load(str(weights), map_location="cpu").eval()
    with torch.no_grad():
        return network(intensities)


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    """Resources/make_test_data.py run again, into a temporary folder."""
    output = tmp_path_factory.mktemp("test-data")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output)], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    return output


def test_the_script_rebuilds_the_committed_card_and_motion(rebuilt: Path):
    committed, again = _card(MODEL), _card(rebuilt / "BrightSphere")
    # The weights' bytes follow the torch version that wrote them; everything else in the card must not change.
    assert {**again, "sha256": None} == {**committed, "sha256": None}
    for folder, card in ((MODEL, committed), (rebuilt / "BrightSphere", again)):
        assert hashlib.sha256((folder / card["weights"]).read_bytes()).hexdigest() == card["sha256"]
    assert json.loads((rebuilt / "BrainPair" / "motion.json").read_text()) == json.loads(
        (PAIR / "motion.json").read_text()
    )
    assert sorted(path.name for path in (rebuilt / "BrainPair").iterdir()) == sorted(
        path.name for path in PAIR.iterdir()
    )


def test_the_script_rebuilds_the_same_network(rebuilt: Path):
    intensities = torch.linspace(-500.0, 1500.0, 2 * 16 * 16 * 16).reshape(2, 1, 16, 16, 16)
    weights = _card(MODEL)["weights"]
    torch.testing.assert_close(
        _network_outputs(rebuilt / "BrightSphere" / weights, intensities),
        _network_outputs(MODEL / weights, intensities),
    )


@pytest.mark.parametrize("name", ["fixed.nrrd", "moving.nrrd"])
def test_the_script_rebuilds_the_same_brain_images(rebuilt: Path, name: str):
    committed_voxels, committed_grid = _image(PAIR / name)
    voxels, grid = _image(rebuilt / "BrainPair" / name)
    np.testing.assert_allclose(grid, committed_grid, atol=1e-9)
    assert voxels.shape == committed_voxels.shape and voxels.dtype == committed_voxels.dtype
    # Rounding to 8 bits may flip by one where another scipy or nilearn lands a hair away from .5.
    assert np.abs(voxels.astype(int) - committed_voxels.astype(int)).max() <= 1


def test_the_committed_model_labels_voxels_brighter_than_150_as_its_one_label():
    card = _card(MODEL)
    assert [(label["value"], label["name"]) for label in card["labels"]] == [(1, "Sphere")]
    intensities = torch.tensor([-1000.0, 0.0, 149.0, 151.0, 300.0, 3000.0]).reshape(1, 1, 6, 1, 1)
    labels = _network_outputs(MODEL / card["weights"], intensities).argmax(dim=1).flatten()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_the_committed_model_segments_a_bright_sphere_through_the_engine():
    """Read through its card as the module reads it (orientation, spacing, sliding windows, sha256 check)."""
    from DeepSegModuleLib.models import ModelCache
    from DeepSegModuleLib.segmentation import SegmentationOptions, segment

    grid = oblique_grid()
    volume, truth = sphere_volume(grid_center(grid) + np.array([2.0, -1.5, 1.0]), 9.0, grid)
    result = segment(volume, MODEL / "deepseg.json", SegmentationOptions(device="cpu"), cache=ModelCache())
    assert dice(result.labels == 1, truth) > 0.95


def test_the_brain_pair_is_small_8_bit_and_a_brain():
    for name in ("fixed.nrrd", "moving.nrrd"):
        assert (PAIR / name).stat().st_size < 200_000
        voxels, ijk_to_ras = _image(PAIR / name)
        assert voxels.dtype == np.uint8
        np.testing.assert_allclose(np.linalg.norm(ijk_to_ras[:3, :3], axis=0), [4.0, 4.0, 4.0])
        # A skull-stripped brain fills roughly a fifth of the template's box; the box is about 20 cm wide.
        assert 0.1 < np.mean(voxels > 40) < 0.35
        assert 180 <= voxels.shape[2] * 4 <= 220


def test_the_moving_brain_is_the_fixed_brain_moved_as_motion_json_says():
    """moving(T x) == fixed(x) for the recorded fixed-to-moving matrix T, and not for its inverse."""
    from scipy.ndimage import map_coordinates

    motion = json.loads((PAIR / "motion.json").read_text())
    fixed_to_moving = np.array(motion["fixed_to_moving_ras"])
    fixed, fixed_grid = _image(PAIR / motion["fixed"])
    moving, moving_grid = _image(PAIR / motion["moving"])
    k, j, i = np.meshgrid(*(np.arange(n) for n in fixed.shape), indexing="ij")
    fixed_ras = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4) @ fixed_grid.T
    brain = fixed.ravel() > 40

    def moving_at(fixed_to_moving_ras: np.ndarray) -> np.ndarray:
        ijk = (fixed_ras @ fixed_to_moving_ras.T) @ np.linalg.inv(moving_grid).T
        return map_coordinates(moving.astype(float), ijk[:, 2::-1].T, order=1, mode="constant")

    def mean_difference(samples: np.ndarray) -> float:
        return float(np.abs(samples - fixed.ravel())[brain].mean())

    # Each image was sampled from the template separately, so "equal" is up to interpolation at 4 mm: a few grey
    # levels, where the brain averages about 180 and the unmoved or wrongly moved image is off by 40 or more.
    aligned = mean_difference(moving_at(fixed_to_moving))
    assert aligned < 10.0
    assert mean_difference(moving_at(np.linalg.inv(fixed_to_moving))) > 4 * aligned
    assert mean_difference(moving.ravel().astype(float)) > 4 * aligned
    # The motion is the rigid one the description states: a rotation (orthonormal, det 1) and a few mm of shift.
    rotation = fixed_to_moving[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(fixed_to_moving[:3, 3], motion["translation_mm"])
    np.testing.assert_allclose(fixed_to_moving[3], [0, 0, 0, 1])
