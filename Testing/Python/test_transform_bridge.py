"""Transforms written into Slicer nodes and files move points exactly where the matrix or field says.

Checked with the transform node's own TransformPoint (Slicer's transform logic) and with SimpleITK reading
the written ``.h5`` file, never with our own inverse.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSegModuleLib import nodes, storage
from node_readers import grid_transform_to_displacement, transform_to_matrix
from DeepSegModuleLib.context import SceneContext

LPS = np.array([-1.0, -1.0, 1.0])
FIELD_SHAPE = (6, 7, 9)  # (k, j, i)


def smooth_displacement(grid: np.ndarray, shape=FIELD_SHAPE) -> np.ndarray:
    """A smooth field (up to ~6 mm) varying along every RAS axis, as (k, j, i, 3) RAS vectors."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = np.einsum("ab,bkji->kjia", grid[:3, :3], np.stack([i, j, k])) + grid[:3, 3]
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    return np.stack(
        [4.0 * np.sin(y / 9.0) + 1.0, 3.0 * np.cos(z / 7.0) - 0.5 * np.sin(x / 5.0), 2.0 * np.sin(x / 11.0 + z / 13.0)],
        axis=-1,
    )


def trilinear(field: np.ndarray, grid: np.ndarray, point_ras: np.ndarray) -> np.ndarray:
    """The field linearly interpolated at a RAS point (our own reference, independent of VTK)."""
    i, j, k = (np.linalg.inv(grid) @ np.r_[point_ras, 1.0])[:3]
    i0, j0, k0 = int(np.floor(i)), int(np.floor(j)), int(np.floor(k))
    fi, fj, fk = i - i0, j - j0, k - k0
    value = np.zeros(3)
    for dk in (0, 1):
        for dj in (0, 1):
            for di in (0, 1):
                weight = (fi if di else 1 - fi) * (fj if dj else 1 - fj) * (fk if dk else 1 - fk)
                value += weight * field[k0 + dk, j0 + dj, i0 + di]
    return value


def interior_points(grid: np.ndarray, count: int = 25) -> np.ndarray:
    rng = np.random.default_rng(7)
    k_size, j_size, i_size = FIELD_SHAPE
    ijk = rng.uniform([0.5, 0.5, 0.5], [i_size - 1.5, j_size - 1.5, k_size - 1.5], size=(count, 3))
    return (grid @ np.c_[ijk, np.ones(count)].T).T[:, :3]


def test_grid_transform_moves_voxel_centres_by_the_field(context, oblique_grid):
    field = smooth_displacement(oblique_grid)
    node = nodes.displacement_to_grid_transform(context, field, oblique_grid, name="deformation")

    for k, j, i in [(0, 0, 0), (5, 6, 8), (2, 3, 4), (4, 1, 7)]:
        p = (oblique_grid @ [i, j, k, 1.0])[:3]
        moved = nodes.transform_points(node, p)[0]
        np.testing.assert_allclose(moved, p + field[k, j, i], atol=1e-6)


def test_grid_transform_interpolates_linearly_between_voxels(context, oblique_grid):
    field = smooth_displacement(oblique_grid)
    node = nodes.displacement_to_grid_transform(context, field, oblique_grid)
    for p in interior_points(oblique_grid):
        np.testing.assert_allclose(nodes.transform_points(node, p)[0], p + trilinear(field, oblique_grid, p), atol=1e-5)


def test_grid_transform_h5_is_read_by_simpleitk_and_slicer_the_same_way(context, oblique_grid, tmp_path):
    field = smooth_displacement(oblique_grid)
    node = nodes.displacement_to_grid_transform(context, field, oblique_grid)
    path = storage.save_node(context, node, tmp_path / "deformation.h5")

    itk_transform = sitk.ReadTransform(str(path))
    other = SceneContext.headless()
    reloaded = storage.load_transform(other, path)
    assert reloaded.IsA("vtkMRMLGridTransformNode")
    # ITK interpolates a displacement field linearly, as the node we wrote does.
    for p in interior_points(oblique_grid, 15):
        expected = p + trilinear(field, oblique_grid, p)
        moved_lps = np.array(itk_transform.TransformPoint((p * LPS).tolist()))
        np.testing.assert_allclose(moved_lps * LPS, expected, atol=1e-4)
    # Slicer's reader switches the grid to cubic interpolation, which still passes through every grid point.
    for k, j, i in [(0, 0, 0), (5, 6, 8), (2, 3, 4), (4, 1, 7)]:
        p = (oblique_grid @ [i, j, k, 1.0])[:3]
        np.testing.assert_allclose(nodes.transform_points(reloaded, p)[0], p + field[k, j, i], atol=1e-4)

    back, back_grid = grid_transform_to_displacement(reloaded)
    np.testing.assert_allclose(back, field, atol=1e-5)
    np.testing.assert_allclose(back_grid, oblique_grid, atol=1e-5)


def test_linear_transform_node_and_h5(context, tmp_path):
    from conftest import rotation

    fixed_to_moving = np.eye(4)
    fixed_to_moving[:3, :3] = rotation("y", 12.0) @ np.diag([1.1, 0.95, 1.0])
    fixed_to_moving[:3, 3] = [4.0, -7.5, 2.25]
    node = nodes.matrix_to_transform(context, fixed_to_moving, name="affine")
    np.testing.assert_allclose(transform_to_matrix(node), fixed_to_moving)

    points = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 30.0], [-55.5, 12.0, 3.0]])
    expected = (fixed_to_moving @ np.c_[points, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(nodes.transform_points(node, points), expected, atol=1e-9)

    for suffix in (".h5", ".tfm"):
        path = storage.save_node(context, node, tmp_path / f"affine{suffix}")
        itk_transform = sitk.ReadTransform(str(path))
        for p, q in zip(points, expected):
            np.testing.assert_allclose(np.array(itk_transform.TransformPoint((p * LPS).tolist())) * LPS, q, atol=1e-6)
        reloaded = storage.load_transform(SceneContext.headless(), path)
        np.testing.assert_allclose(transform_to_matrix(reloaded), fixed_to_moving, atol=1e-9)


def test_moving_volume_under_the_transform_appears_where_the_fixed_anatomy_is(context):
    """Placing the moving volume under the resampling transform and hardening it aligns it with the fixed one."""
    spacing = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_to_moving = np.eye(4)
    fixed_to_moving[:3, 3] = [6.0, 0.0, 0.0]  # anatomy sits 6 mm further right in the moving image
    moving = nodes.array_to_volume(context, np.zeros((4, 4, 4), np.float32), spacing, name="moving")
    transform = nodes.matrix_to_transform(context, fixed_to_moving)
    moving.SetAndObserveTransformNodeID(transform.GetID())
    context.transforms_logic.hardenTransform(moving)
    _, hardened = nodes.volume_to_array(moving)
    # The moving voxel at RAS x = 6 now sits at x = 0, where the fixed image has that anatomy.
    np.testing.assert_allclose(hardened @ [3.0, 0, 0, 1], [0.0, 0.0, 0.0, 1.0], atol=1e-9)


@pytest.mark.parametrize(
    "bad_field, message",
    [
        (np.zeros((4, 4, 4)), "shape"),
        (np.full((3, 3, 3, 3), np.nan), "NaN"),
        (np.zeros((0, 3, 3, 3)), "empty"),
    ],
)
def test_bad_displacement_is_refused_and_scene_unchanged(context, bad_field, message):
    before = context.node_ids()
    with pytest.raises(ValueError, match=message):
        nodes.displacement_to_grid_transform(context, bad_field, np.eye(4))
    assert context.node_ids() == before


def test_sheared_grid_is_refused(context):
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal"):
        nodes.displacement_to_grid_transform(context, np.zeros((2, 2, 2, 3)), sheared)
