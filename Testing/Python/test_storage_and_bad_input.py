"""Scene bundles round-trip through Slicer's scene loader; bad input gets a clear error and changes nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from DeepSegModuleLib import nodes, segments, storage
from node_readers import transform_to_matrix
from DeepSegModuleLib.context import SceneContext
from DeepSegModuleLib.labels import LabelInfo

SHAPE = (6, 8, 10)


def build_scene(context, grid):
    rng = np.random.default_rng(3)
    ct = nodes.array_to_volume(context, rng.normal(size=SHAPE).astype(np.float32), grid, name="CT")
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:4, 2:6, 3:8] = 1
    labels[4:6, 0:2, 0:3] = 2
    segmentation = segments.labels_to_segmentation(
        context, labels, [LabelInfo(1, "brain", (0.9, 0.7, 0.6)), LabelInfo(2, "tumor", (0.2, 0.9, 0.2))], reference_volume=ct
    )
    affine = nodes.matrix_to_transform(context, np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4, k=3) * 2.0, name="affine")
    field = np.zeros((3, 4, 5, 3))
    field[..., 0] = 1.5
    grid_transform = nodes.displacement_to_grid_transform(context, field, grid, name="warp")
    return ct, segmentation, affine, grid_transform, labels


def test_mrb_round_trips_through_scene_load(context, oblique_grid, tmp_path):
    ct, segmentation, affine, grid_transform, labels = build_scene(context, oblique_grid)
    path = storage.save_scene_bundle(context, tmp_path / "case.mrb")
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["case.mrb"]  # no staging folder left behind

    other = SceneContext.headless()
    added = storage.load_scene_bundle(other, path)
    by_name = {node.GetName(): node for node in added if node.IsA("vtkMRMLStorableNode")}
    assert {"CT", "Segmentation", "affine", "warp"} <= set(by_name)

    array, grid = nodes.volume_to_array(by_name["CT"])
    original, _ = nodes.volume_to_array(ct)
    np.testing.assert_array_equal(array, original)
    assert np.abs(grid - oblique_grid).max() < 1e-5

    loaded_labels, loaded_grid, table = segments.segmentation_to_labels(other, by_name["Segmentation"], by_name["CT"])
    assert [info.name for info in table] == ["brain", "tumor"]
    assert table[1].color == pytest.approx((0.2, 0.9, 0.2), abs=1e-4)
    np.testing.assert_array_equal(loaded_labels, labels)

    np.testing.assert_allclose(transform_to_matrix(by_name["affine"]), transform_to_matrix(affine))
    point = (oblique_grid @ [1, 1, 1, 1.0])[:3]
    np.testing.assert_allclose(nodes.transform_points(by_name["warp"], point), [point + [1.5, 0, 0]], atol=1e-5)


def scene_state(context):
    """Everything a user would see change: node IDs, names, and voxel checksums of the volumes."""
    state = []
    for node_id in context.node_ids():
        node = context.scene.GetNodeByID(node_id)
        entry = [node_id, node.GetName()]
        if node.IsA("vtkMRMLScalarVolumeNode") and node.GetImageData() is not None:
            entry.append(float(nodes.volume_to_array(node)[0].sum()))
        if node.IsA("vtkMRMLSegmentationNode"):
            segments = node.GetSegmentation()
            entry.append(tuple(segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())))
        state.append(tuple(entry))
    return state


@pytest.fixture
def populated(context):
    from conftest import oblique_ijk_to_ras

    grid = oblique_ijk_to_ras()
    ct, segmentation, *_ = build_scene(context, grid)
    return context, ct, segmentation, grid


BAD_CALLS = {
    "2D array": (lambda c, ct, seg, g: nodes.array_to_volume(c, np.zeros((5, 5)), g), "3D array"),
    "4D array": (lambda c, ct, seg, g: nodes.array_to_volume(c, np.zeros((2, 5, 5, 5)), g), "one channel at a time"),
    "empty volume": (lambda c, ct, seg, g: nodes.array_to_volume(c, np.zeros((0, 5, 5)), g), "empty"),
    "NaN affine": (lambda c, ct, seg, g: nodes.array_to_volume(c, np.zeros(SHAPE), np.full((4, 4), np.nan)), "NaN"),
    "singular affine": (lambda c, ct, seg, g: nodes.array_to_volume(c, np.zeros(SHAPE), np.zeros((4, 4))), "last row|singular"),
    "NaN affine into existing node": (
        lambda c, ct, seg, g: nodes.array_to_volume(c, np.ones(SHAPE), np.full((4, 4), np.nan), node=ct),
        "NaN",
    ),
    "label shape mismatch": (
        lambda c, ct, seg, g: segments.labels_to_segmentation(c, np.ones((6, 8, 9), np.uint8), {1: "a"}, reference_volume=ct),
        "does not match reference volume",
    ),
    "label value missing from table": (
        lambda c, ct, seg, g: segments.labels_to_segmentation(
            c, np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3 == 0, 4, 1).astype(np.uint8), {1: "brain"},
            reference_volume=ct, segmentation_node=seg,
        ),
        r"value\(s\) \[4\]",
    ),
    "2D labels": (lambda c, ct, seg, g: segments.labels_to_segmentation(c, np.ones((8, 10), np.uint8), {1: "a"}, ijk_to_ras=g), "3D array"),
    "probabilities as labels": (
        lambda c, ct, seg, g: segments.labels_to_segmentation(c, np.full(SHAPE, 0.4), {1: "a"}, reference_volume=ct),
        "non-integer",
    ),
    "unknown label to keep": (
        lambda c, ct, seg, g: segments.labels_to_segmentation(c, np.ones(SHAPE, np.uint8), {1: "a"}, reference_volume=ct, keep_labels=["b"]),
        "unknown label name",
    ),
    "matrix with NaN": (lambda c, ct, seg, g: nodes.matrix_to_transform(c, np.full((4, 4), np.nan)), "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_clearly_and_leaves_the_scene_unchanged(populated, case):
    context, ct, segmentation, grid = populated
    call, message = BAD_CALLS[case]
    before = scene_state(context)
    with pytest.raises(ValueError, match=message):
        call(context, ct, segmentation, grid)
    assert scene_state(context) == before


def test_unreadable_files_are_refused_and_leave_the_scene_unchanged(populated, tmp_path):
    context, *_ = populated
    before = scene_state(context)
    not_an_image = tmp_path / "notes.nrrd"
    not_an_image.write_text("this is not an image\n")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))

    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.load_volume(context, tmp_path / "missing.nii.gz")
    for path in (not_an_image, truncated):
        with pytest.raises(storage.StorageError, match="not a NRRD file|truncated|not an image"):
            storage.load_volume(context, path)
    with pytest.raises(storage.StorageError, match="not a NRRD file"):
        storage.load_segmentation(context, not_an_image)
    with pytest.raises(storage.StorageError, match="not an ITK transform"):
        storage.load_transform(context, not_an_image)
    with pytest.raises(storage.StorageError, match="folder"):
        storage.load_volume(context, tmp_path)
    assert scene_state(context) == before


def test_failed_write_leaves_no_file_and_no_storage_node(populated, tmp_path):
    context, ct, segmentation, _ = populated
    before = scene_state(context)
    with pytest.raises(storage.StorageError, match="use one of"):
        storage.save_node(context, segmentation, tmp_path / "organs.h5")
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.save_node(context, ct, tmp_path / "missing-folder" / "ct.nrrd")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if not os.access(read_only, os.W_OK):  # root can write anywhere; the check only applies to users
            with pytest.raises(storage.StorageError, match="not writable"):
                storage.save_node(context, ct, read_only / "ct.nrrd")
    finally:
        read_only.chmod(0o700)
    assert scene_state(context) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read-only"]
    assert list(read_only.iterdir()) == []
