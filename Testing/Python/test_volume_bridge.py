"""Volumes cross between arrays, tensors, SimpleITK, files and MRML nodes without moving a voxel.

Every check uses an oblique, anisotropic grid (0.7 x 0.9 x 2.5 mm, rotated 20 degrees about two axes), in both
RAS- and LPS-oriented variants, and compares with what nibabel and SimpleITK read from the same files.
"""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepSegModuleLib import nodes, storage

LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (7, 11, 13)  # (k, j, i): deliberately unequal so any axis mix-up changes the shape


def sample_array(dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(42)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-1000, 3000, size=SHAPE).astype(dtype)
    return rng.normal(50.0, 20.0, size=SHAPE).astype(dtype)


def physical_points_ras(ijk_to_ras: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Voxel indices (i, j, k) of a few corners and interior voxels, and their RAS positions."""
    k_size, j_size, i_size = shape
    indices = np.array(
        [[0, 0, 0], [i_size - 1, 0, 0], [0, j_size - 1, 0], [0, 0, k_size - 1], [i_size - 1, j_size - 1, k_size - 1], [3, 5, 2]],
        dtype=float,
    )
    ras = (ijk_to_ras @ np.c_[indices, np.ones(len(indices))].T).T[:, :3]
    return indices, ras


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_array_round_trip_is_exact(context, oblique_grid, dtype):
    array = sample_array(dtype) if dtype != np.uint8 else (sample_array(np.int16) % 200).astype(np.uint8)
    node = nodes.array_to_volume(context, array, oblique_grid, name="oblique")

    back, ijk_to_ras = nodes.volume_to_array(node)

    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(ijk_to_ras, oblique_grid, atol=1e-12)
    # Slicer's own accessor sees the same voxels in the same (k, j, i) order.
    import slicer.util

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)


def test_update_existing_volume_keeps_node_identity(context, oblique_grid):
    node = nodes.array_to_volume(context, sample_array(), oblique_grid, name="v")
    node_id = node.GetID()
    count = context.scene.GetNumberOfNodes()
    new_grid = oblique_grid.copy()
    new_grid[:3, 3] += [1.0, 2.0, 3.0]
    updated = nodes.array_to_volume(context, sample_array() * 2, new_grid, node=node)
    assert updated.GetID() == node_id
    assert context.scene.GetNumberOfNodes() == count
    back, ijk_to_ras = nodes.volume_to_array(updated)
    np.testing.assert_array_equal(back, sample_array() * 2)
    np.testing.assert_allclose(ijk_to_ras, new_grid)


def test_tensor_round_trip(context, oblique_grid):
    tensor = torch.from_numpy(sample_array())
    node = nodes.array_to_volume(context, tensor, oblique_grid)
    back, ijk_to_ras = nodes.volume_to_array(node)
    assert torch.equal(torch.from_numpy(back), tensor)
    np.testing.assert_allclose(ijk_to_ras, oblique_grid)


def test_world_geometry_includes_parent_transform(context, oblique_grid):
    node = nodes.array_to_volume(context, sample_array(), oblique_grid)
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -3.0, 2.0]
    # A parent linear transform's "to parent" moves the volume; from_parent is its inverse.
    transform = nodes.matrix_to_transform(context, np.linalg.inv(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    _, local = nodes.volume_to_array(node)
    _, world = nodes.volume_to_array(node, world=True)
    np.testing.assert_allclose(local, oblique_grid)
    np.testing.assert_allclose(world, shift @ oblique_grid, atol=1e-9)


def test_simpleitk_round_trip_is_lossless(context, oblique_grid):
    array = sample_array()
    node = nodes.array_to_volume(context, array, oblique_grid)

    image = nodes.array_to_sitk(*nodes.volume_to_array(node))
    # SimpleITK's own index -> physical mapping (LPS) agrees with Slicer's IJK->RAS, point by point.
    indices, ras = physical_points_ras(oblique_grid, array.shape)
    for index, expected_ras in zip(indices, ras):
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        np.testing.assert_allclose(LPS_FLIP[:3, :3] @ lps, expected_ras, atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), [0.7, 0.9, 2.5], atol=1e-12)

    back = nodes.array_to_volume(context, *nodes.sitk_to_array(image), name="from sitk")
    back_array, back_grid = nodes.volume_to_array(back)
    np.testing.assert_array_equal(back_array, array)
    np.testing.assert_allclose(back_grid, oblique_grid, atol=1e-12)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_written_file_agrees_with_simpleitk_and_nibabel(context, oblique_grid, tmp_path, suffix):
    array = sample_array()
    node = nodes.array_to_volume(context, array, oblique_grid, name="oblique")
    path = storage.save_node(context, node, tmp_path / f"oblique{suffix}")

    # SimpleITK's reading of the file: same voxels, same physical points (LPS -> RAS) to 1e-5 mm.
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    indices, ras = physical_points_ras(oblique_grid, array.shape)
    for index, expected_ras in zip(indices, ras):
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        assert np.abs(LPS_FLIP[:3, :3] @ lps - expected_ras).max() < 1e-5

    # nibabel's reading (RAS affine, (i, j, k) data order) where nibabel reads the format.
    if suffix == ".nii.gz":
        nifti = nibabel.load(str(path))
        assert np.abs(nifti.affine - oblique_grid).max() < 1e-5
        np.testing.assert_array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), array)

    # And Slicer's own reader gives back the node we wrote.
    loaded = storage.load_volume(context, path)
    loaded_array, loaded_grid = nodes.volume_to_array(loaded)
    np.testing.assert_array_equal(loaded_array, array)
    assert np.abs(loaded_grid - oblique_grid).max() < 1e-5


def test_reads_files_written_by_other_tools_in_lps_and_ras(context, tmp_path):
    """A NIfTI written by nibabel (RAS) and a NRRD/MHA written by SimpleITK (LPS) land at the same place."""
    from conftest import oblique_ijk_to_ras

    array = sample_array()
    grid = oblique_ijk_to_ras(source="LPS")

    nifti_path = tmp_path / "nibabel.nii.gz"
    nibabel.save(nibabel.Nifti1Image(array.transpose(2, 1, 0), grid), str(nifti_path))
    sitk_path = tmp_path / "simpleitk.mha"
    sitk.WriteImage(nodes.array_to_sitk(array, grid), str(sitk_path))
    nrrd_path = tmp_path / "simpleitk.nrrd"
    sitk.WriteImage(nodes.array_to_sitk(array, grid), str(nrrd_path))

    for path in (nifti_path, sitk_path, nrrd_path):
        loaded = storage.load_volume(context, path)
        loaded_array, loaded_grid = nodes.volume_to_array(loaded)
        np.testing.assert_array_equal(loaded_array, array, err_msg=str(path))
        assert np.abs(loaded_grid - grid).max() < 1e-5, path


def test_probability_map_becomes_float_volume_with_unit_window(context, oblique_grid):
    probability = np.clip(sample_array() / 100.0, 0, 1).astype(np.float64)
    node = nodes.probability_to_volume(context, probability, oblique_grid, name="p(liver)")
    back, _ = nodes.volume_to_array(node)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, probability.astype(np.float32))
    display = node.GetDisplayNode()
    assert display.GetWindow() == pytest.approx(1.0)
    assert display.GetLevel() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="softmax"):
        nodes.probability_to_volume(context, probability * 5.0, oblique_grid)


def test_left_handed_file_lands_at_the_same_physical_place_and_writes_back_in_its_own_layout(context, tmp_path):
    """Slicer's reader flips the slice axis of left-handed images; every voxel keeps its RAS position, and
    reorder_to_grid / save_array_like_file give the file's own voxel layout back."""
    from conftest import oblique_ijk_to_ras

    grid = oblique_ijk_to_ras() @ np.diag([1.0, 1.0, -1.0, 1.0])  # k runs inferior: a left-handed grid
    array = sample_array()
    path = tmp_path / "left-handed.nii.gz"
    nibabel.save(nibabel.Nifti1Image(array.transpose(2, 1, 0), grid), str(path))

    node = storage.load_volume(context, path)
    loaded, loaded_grid = nodes.volume_to_array(node)
    for k, j, i in [(0, 0, 0), (6, 10, 12), (3, 4, 5)]:
        ras = (grid @ [i, j, k, 1.0])[:3]
        i2, j2, k2 = np.rint(np.linalg.inv(loaded_grid) @ np.r_[ras, 1.0])[:3].astype(int)
        assert loaded[k2, j2, i2] == array[k, j, i]

    shape, file_grid = nodes.file_grid(str(path))
    assert shape == array.shape and np.abs(file_grid - grid).max() < 1e-5
    np.testing.assert_array_equal(nodes.reorder_to_grid(loaded, loaded_grid, shape, file_grid), array)
    written = storage.save_array_like_file(tmp_path / "copy.nii.gz", loaded, loaded_grid, like=path)
    again = nibabel.load(str(written))
    np.testing.assert_array_equal(np.asarray(again.dataobj).transpose(2, 1, 0), array)
    assert np.abs(again.affine - grid).max() < 1e-5

    rotated = grid.copy()
    rotated[:3, :3] = rotated[:3, :3] @ np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="resample"):
        nodes.reorder_to_grid(loaded, loaded_grid, shape, rotated)
