"""Label arrays become named, coloured segments that Slicer's own segmentation logic finds in the right place."""

from __future__ import annotations

import numpy as np
import pytest
import vtk
from DeepSegModuleLib import nodes, storage
from DeepSegModuleLib import segments as bridge
from DeepSegModuleLib.labels import CodedEntry, LabelInfo, Terminology

SHAPE = (9, 12, 14)

KIDNEY = Terminology(
    category=CodedEntry("SCT", "123037004", "Anatomical Structure"),
    type=CodedEntry("SCT", "64033007", "Kidney"),
    type_modifier=CodedEntry("SCT", "24028007", "Right"),
)
TABLE = [
    LabelInfo(
        1,
        "liver",
        (0.86, 0.55, 0.39),
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~~^^~^^",
    ),
    LabelInfo(2, "right kidney", (0.73, 0.30, 0.25), KIDNEY),
    LabelInfo(5, "spleen", (0.62, 0.42, 0.80)),
]


def sample_labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:5, 3:7, 4:9] = 1
    labels[6:8, 1:4, 1:3] = 2
    labels[1, 9:11, 10:13] = 5
    return labels


def reference_volume(context, grid):
    rng = np.random.default_rng(1)
    return nodes.array_to_volume(context, rng.normal(size=SHAPE).astype(np.float32), grid, name="CT")


def export_with_slicer(context, segmentation_node, reference=None):
    """Slicer's own export of every segment to a label map (segment order gives values 1..N)."""
    import slicer

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    context.scene.AddNode(labelmap)
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    assert context.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference)
    array, grid = nodes.volume_to_array(labelmap)
    return array, grid


def voxel_centres_ras(mask: np.ndarray, grid: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    return (grid @ np.c_[i, j, k, np.ones(len(i))].T).T[:, :3]


def test_segments_are_found_by_slicer_at_the_same_ras_positions(context, oblique_grid):
    labels = sample_labels()
    ct = reference_volume(context, oblique_grid)
    segmentation = bridge.labels_to_segmentation(context, labels, TABLE, reference_volume=ct)

    segments = segmentation.GetSegmentation()
    assert [segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())] == [
        "liver",
        "right kidney",
        "spleen",
    ]
    # With the CT as reference, Slicer's export lands on the same grid, voxel for voxel.
    exported, grid = export_with_slicer(context, segmentation, ct)
    np.testing.assert_allclose(grid, oblique_grid, atol=1e-6)
    for value_in_export, info in enumerate(TABLE, start=1):
        np.testing.assert_array_equal(exported == value_in_export, labels == info.value, err_msg=info.name)

    # Without a reference Slicer chooses its own extent; the RAS positions of each segment's voxels still agree.
    exported, grid = export_with_slicer(context, segmentation)
    for value_in_export, info in enumerate(TABLE, start=1):
        expected = voxel_centres_ras(labels == info.value, oblique_grid)
        found = voxel_centres_ras(exported == value_in_export, grid)
        assert len(found) == len(expected), info.name
        np.testing.assert_allclose(np.sort(found, axis=0), np.sort(expected, axis=0), atol=1e-4)


def test_names_colours_terminology_and_display(context, oblique_grid):
    ct = reference_volume(context, oblique_grid)
    segmentation = bridge.labels_to_segmentation(context, sample_labels(), TABLE, reference_volume=ct)
    segments = segmentation.GetSegmentation()
    kidney = segments.GetSegment(segments.GetSegmentIdBySegmentName("right kidney"))
    assert kidney.GetColor() == pytest.approx((0.73, 0.30, 0.25))
    assert Terminology.from_slicer_string(kidney.GetTerminology()) == KIDNEY
    # Shown in 2D and 3D: a display node, and the closed surface that the 3D view renders.
    assert segmentation.GetDisplayNode() is not None
    assert segments.ContainsRepresentation(nodes.CLOSED_SURFACE)
    polydata = kidney.GetRepresentation(nodes.CLOSED_SURFACE)
    assert polydata is not None and polydata.GetNumberOfPoints() > 0
    # The reference geometry is the source volume's, so the Segment Editor paints on the CT grid.
    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == ct.GetID()


def test_only_requested_labels_are_written(context, oblique_grid):
    ct = reference_volume(context, oblique_grid)
    segmentation = bridge.labels_to_segmentation(
        context, sample_labels(), TABLE, reference_volume=ct, keep_labels=["spleen"], show_3d=False
    )
    segments = segmentation.GetSegmentation()
    assert segments.GetNumberOfSegments() == 1
    exported, _ = export_with_slicer(context, segmentation, ct)
    np.testing.assert_array_equal(exported > 0, sample_labels() == 5)


def test_existing_segmentation_replaces_only_same_named_segments(context, oblique_grid):
    ct = reference_volume(context, oblique_grid)
    labels = sample_labels()
    segmentation = bridge.labels_to_segmentation(context, labels, TABLE, reference_volume=ct, show_3d=False)
    segments = segmentation.GetSegmentation()
    ids_before = [segments.GetNthSegmentID(n) for n in range(segments.GetNumberOfSegments())]
    kidney_before, _, _ = bridge.segmentation_to_labels(context, segmentation, ct, ["right kidney"])

    # A second run that produces a different liver and a new "tumour" label.
    rerun = np.zeros(SHAPE, dtype=np.uint8)
    rerun[0:2, 0:2, 0:3] = 1
    rerun[5, 5, 5] = 7
    table = [LabelInfo(1, "liver", (1.0, 1.0, 0.0)), LabelInfo(7, "tumour", (0.0, 1.0, 0.0))]
    same = bridge.labels_to_segmentation(context, rerun, table, reference_volume=ct, segmentation_node=segmentation)

    assert same is segmentation
    ids_after = [segments.GetNthSegmentID(n) for n in range(segments.GetNumberOfSegments())]
    assert ids_after[:3] == ids_before  # the liver kept its ID and its place
    assert len(ids_after) == 4 and segments.GetSegment(ids_after[3]).GetName() == "tumour"
    liver, _, _ = bridge.segmentation_to_labels(context, segmentation, ct, ["liver"])
    np.testing.assert_array_equal(liver > 0, rerun == 1)
    kidney_after, _, _ = bridge.segmentation_to_labels(context, segmentation, ct, ["right kidney"])
    np.testing.assert_array_equal(kidney_after, kidney_before)
    spleen, _, _ = bridge.segmentation_to_labels(context, segmentation, ct, ["spleen"])
    np.testing.assert_array_equal(spleen > 0, labels == 5)
    assert segments.GetSegment(ids_after[0]).GetColor() == pytest.approx((1.0, 1.0, 0.0))


def test_seg_nrrd_keeps_names_colours_and_terminology(context, oblique_grid, tmp_path):
    from DeepSegModuleLib.context import SceneContext

    ct = reference_volume(context, oblique_grid)
    segmentation = bridge.labels_to_segmentation(context, sample_labels(), TABLE, reference_volume=ct)
    path = storage.save_node(context, segmentation, tmp_path / "organs.seg.nrrd")

    other = SceneContext.headless()
    loaded = storage.load_segmentation(other, path)
    segments = loaded.GetSegmentation()
    assert segments.GetNumberOfSegments() == len(TABLE)
    for info in TABLE:
        segment = segments.GetSegment(segments.GetSegmentIdBySegmentName(info.name))
        assert segment is not None, info.name
        assert segment.GetColor() == pytest.approx(info.color, abs=1e-4)
        if info.terminology is not None:
            assert segment.GetTerminology() == info.terminology_string()
    labels, grid, _ = bridge.segmentation_to_labels(other, loaded, None, [info.name for info in TABLE])
    for value, info in enumerate(TABLE, start=1):
        expected = voxel_centres_ras(sample_labels() == info.value, oblique_grid)
        found = voxel_centres_ras(labels == value, grid)
        np.testing.assert_allclose(np.sort(found, axis=0), np.sort(expected, axis=0), atol=1e-4)


def test_terminology_string_round_trip():
    text = KIDNEY.to_slicer_string()
    assert text.split("~")[2] == "SCT^64033007^Kidney"
    assert Terminology.from_slicer_string(text) == KIDNEY
