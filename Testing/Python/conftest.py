"""Shared fixtures: a fresh headless Slicer scene per test, and oblique anisotropic geometries."""

from __future__ import annotations

import os

import numpy as np
import pytest

# A Ray the tests start listens on the loopback address only (as DeepSeg's own local Ray does; read when ray is
# imported): no test traffic goes to this machine's network address. The two-node cluster test sets it back to 1
# inside a network namespace of its own.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture
def context():
    """A new headless scene with Slicer's module logics (slicer-core), cleared after the test."""
    from DeepSegModuleLib.context import SceneContext

    scene_context = SceneContext.headless()
    yield scene_context
    scene_context.clear()


def rotation(axis: str, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def oblique_ijk_to_ras(
    spacing=(0.7, 0.9, 2.5), origin=(12.5, -31.25, 7.75), source: str = "RAS"
) -> np.ndarray:
    """IJK->RAS of an anisotropic grid rotated 20 degrees about two axes.

    ``source="LPS"`` gives the grid a scanner in LPS (DICOM/ITK) would produce: the first two axes run
    towards left and posterior, so the RAS matrix has flipped first two rows.
    """
    directions = rotation("x", 20.0) @ rotation("z", 20.0)
    if source == "LPS":
        directions = np.diag([-1.0, -1.0, 1.0]) @ directions
    matrix = np.eye(4)
    matrix[:3, :3] = directions @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


@pytest.fixture(params=["RAS", "LPS"])
def oblique_grid(request) -> np.ndarray:
    return oblique_ijk_to_ras(source=request.param)


@pytest.fixture
def broken_copy(tmp_path):
    """A copy of the module folder, the .ui and the resources, for the checkers to find faults in."""
    import shutil

    from extension_checks import MODULE_DIR, MODULE_NAME, REPOSITORY

    copy = tmp_path / "repo"
    shutil.copytree(MODULE_DIR, copy / MODULE_NAME, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPOSITORY / "Resources", copy / "Resources")
    return copy / MODULE_NAME


@pytest.fixture
def deepseg_module():
    """The module file imported under Slicer's stubbed GUI (slicer_stubs.py), on slicer-core's real MRML."""
    import slicer_stubs
    from extension_checks import MODULE_FILE

    with slicer_stubs.stubbed_slicer():
        yield slicer_stubs.load_module_file(MODULE_FILE)


@pytest.fixture(scope="session")
def mni() -> dict[str, np.ndarray]:
    """The MNI152 T1 at 2 mm with its brain mask, in Slicer's (k, j, i) order."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2)
    return {
        "image": np.asarray(template.get_fdata(), dtype=np.float32).transpose(2, 1, 0).copy(),
        "brain": (np.asarray(brain.get_fdata()) > 0.5).transpose(2, 1, 0).copy(),
        "ijk_to_ras": np.asarray(template.affine, dtype=np.float64),
    }
