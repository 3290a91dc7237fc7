"""The segmentation side of the node bridge: label arrays to segmentation nodes and back.

The conventions of :mod:`~DeepSegModuleLib.nodes` hold: arrays in ``(k, j, i)`` order, geometry as a 4x4
``ijk_to_ras``, every input validated before the scene is touched. Segments share one labelmap layer, take their
names, colours and terminology from the label table, and a run into an existing segmentation replaces only the
segments of the same names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .labels import DEFAULT_TERMINOLOGY, LabelInfo, as_label_table
from .nodes import (
    BINARY_LABELMAP,
    check_affine,
    check_volume_array,
    matrix_to_vtk,
    require_scalar_volume,
    volume_ijk_to_ras,
    volume_to_array,
)

if TYPE_CHECKING:  # pragma: no cover
    from .context import SceneContext


def _oriented_labelmap(labels: np.ndarray, ijk_to_ras: np.ndarray) -> Any:
    """A vtkOrientedImageData holding ``labels`` with its image-to-world (IJK->RAS) geometry."""
    import slicer
    from vtk.util import numpy_support

    oriented = slicer.vtkOrientedImageData()
    k_size, j_size, i_size = labels.shape
    oriented.SetDimensions(i_size, j_size, k_size)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(labels).reshape(-1), deep=True)
    oriented.GetPointData().SetScalars(scalars)
    oriented.SetImageToWorldMatrix(matrix_to_vtk(ijk_to_ras))
    return oriented


def _label_dtype(max_value: int) -> type:
    if max_value <= np.iinfo(np.uint8).max:
        return np.uint8
    if max_value <= np.iinfo(np.int16).max:
        return np.int16
    return np.int32


def labels_to_segmentation(
    context: SceneContext,
    labels: Any,
    label_table: Iterable[Any] | Mapping[int, Any],
    reference_volume: Any = None,
    ijk_to_ras: Any = None,
    segmentation_node: Any = None,
    name: str = "Segmentation",
    keep_labels: Sequence[str] | None = None,
    include_empty: bool = False,
    show_3d: bool = True,
) -> Any:
    """Writes a label array as segments: one segment per label, named and coloured from ``label_table``.

    Into a new segmentation node, or into ``segmentation_node`` where only segments whose names match the
    written labels are replaced (keeping their segment IDs and order) and every other segment is left as it
    was. The segmentation's reference geometry comes from ``reference_volume`` (or the label grid).

    Args:
        context: the scene context.
        labels: integer array (k, j, i); 0 is background.
        label_table: the meaning of each value (see :func:`DeepSegModuleLib.labels.as_label_table`).
        reference_volume: the volume the labels were computed on; gives the geometry and the reference.
        ijk_to_ras: the label grid's geometry when no ``reference_volume`` is given.
        segmentation_node: existing segmentation to update; None creates a new one.
        name: name for a new segmentation node.
        keep_labels: only these label names are written (others become background).
        include_empty: also create segments for table labels with no voxel.
        show_3d: create the closed-surface representation so segments show in 3D views.

    Returns:
        The segmentation node.

    Raises:
        ValueError: for a non-3D array, a shape that does not match the reference volume, a value in the
            array with no entry in the table, unknown ``keep_labels`` names, or a non-integer array.
            The scene is unchanged then.
    """
    labels = _integer_labels(check_volume_array(labels, "label array"))
    table = as_label_table(label_table)
    grid = _label_grid(labels, reference_volume, ijk_to_ras)
    written = _labels_to_write(labels, table, keep_labels, include_empty)
    if segmentation_node is not None and not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"segmentation_node is a {segmentation_node.GetClassName()}, not a segmentation node")

    # Everything is validated; from here on the scene is modified.
    kept_values = np.array([info.value for info in written], dtype=labels.dtype)
    written_labels = np.where(np.isin(labels, kept_values), labels, 0)
    written_labels = written_labels.astype(_label_dtype(max((info.value for info in written), default=0)))
    oriented = _oriented_labelmap(written_labels, grid)
    is_new = segmentation_node is None
    if is_new:
        import slicer

        segmentation_node = slicer.vtkMRMLSegmentationNode()
    _write_segments(segmentation_node, written, oriented, reference_volume, is_new)
    if is_new:
        context.add_node(segmentation_node, name)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    if reference_volume is not None and is_new:
        _place_in_subject_hierarchy_next_to(context, segmentation_node, reference_volume)
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()
    return segmentation_node


def _integer_labels(labels: np.ndarray) -> np.ndarray:
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    rounded = np.rint(labels)
    if not np.array_equal(rounded, labels):
        raise ValueError("label array has non-integer values: pass integer labels (argmax), not probabilities")
    return rounded.astype(np.int32)


def _label_grid(labels: np.ndarray, reference_volume: Any, ijk_to_ras: Any) -> np.ndarray:
    """The labels' IJK-to-RAS: the reference volume's (whose shape they must have), or the one given."""
    if reference_volume is not None:
        require_scalar_volume(reference_volume)
        reference_shape = tuple(reversed(reference_volume.GetImageData().GetDimensions()))
        if labels.shape != reference_shape:
            raise ValueError(
                f"label array shape {labels.shape} does not match reference volume "
                f"'{reference_volume.GetName()}' shape {reference_shape} (both in k, j, i order): "
                "resample the labels onto the reference grid first"
            )
        grid = volume_ijk_to_ras(reference_volume, world=False)
        if ijk_to_ras is not None and not np.allclose(check_affine(ijk_to_ras), grid, atol=1e-5):
            raise ValueError("ijk_to_ras differs from the reference volume's geometry: pass one or the other")
        return grid
    if ijk_to_ras is not None:
        return check_affine(ijk_to_ras)
    raise ValueError("give the label grid's geometry: a reference_volume or an ijk_to_ras matrix")


def _labels_to_write(
    labels: np.ndarray, table: list[LabelInfo], keep_labels: Sequence[str] | None, include_empty: bool
) -> list[LabelInfo]:
    """The table's labels to write as segments; every value in the array must be named."""
    present = {int(v) for v in np.unique(labels) if v != 0}
    by_value = {info.value: info for info in table}
    missing = sorted(present - set(by_value))
    if missing:
        raise ValueError(
            f"label array contains value(s) {missing} that the label table does not name: "
            "add them to the label table (value, name, colour) or zero them out"
        )
    if keep_labels is not None:
        names = {info.name for info in table}
        unknown = [n for n in keep_labels if n not in names]
        if unknown:
            raise ValueError(f"unknown label name(s) {unknown}; the model's labels are {sorted(names)}")
        table = [info for info in table if info.name in set(keep_labels)]
    return [info for info in table if include_empty or info.value in present]


def _write_segments(
    segmentation_node: Any, written: list[LabelInfo], oriented: Any, reference_volume: Any, is_new: bool
) -> None:
    """One segment per label on the shared labelmap layer ``oriented``; a segment of the same name is replaced in
    place (its ID and position kept), every other segment left as it was."""
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    disabled = segmentation_node.StartModify()
    try:
        if is_new or segmentation.GetNumberOfSegments() == 0:
            segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
        # An existing segmentation keeps its reference geometry: its other segments are defined on it.
        if reference_volume is not None and (is_new or not _has_reference_geometry(segmentation)):
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        elif is_new:
            geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(oriented)
            segmentation.SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry
            )
        for info in written:
            segment_id, insert_before = _take_out_segment_named(segmentation, info.name)
            segment = slicer.vtkSegment()
            segment.SetName(info.name)
            segment.SetColor(*[float(c) for c in info.rgb()])
            segment.SetLabelValue(int(info.value))
            segment.AddRepresentation(BINARY_LABELMAP, oriented)  # one shared layer for all written labels
            segment.SetTerminology(info.terminology_string() or DEFAULT_TERMINOLOGY.to_slicer_string())
            if not segment_id:
                segment_id = segmentation.GenerateUniqueSegmentID(info.name)
            segmentation.AddSegment(segment, segment_id, insert_before)
    finally:
        segmentation_node.EndModify(disabled)


def _has_reference_geometry(segmentation: Any) -> bool:
    import slicer

    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return bool(segmentation.GetConversionParameter(name))


def _take_out_segment_named(segmentation: Any, segment_name: str) -> tuple[str, str]:
    """Removes the segment called ``segment_name`` (if any); returns its ID and the ID that followed it."""
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        return "", ""
    ids = list(segmentation.GetSegmentIDs())
    position = ids.index(segment_id)
    insert_before = ids[position + 1] if position + 1 < len(ids) else ""
    segmentation.RemoveSegment(segment_id)
    return segment_id, insert_before


def _place_in_subject_hierarchy_next_to(context: SceneContext, node: Any, reference: Any) -> None:
    """Puts ``node`` in the same subject-hierarchy folder (study) as ``reference``, as Slicer's modules do."""
    hierarchy = context.subject_hierarchy()
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference)
    node_item = hierarchy.GetItemByDataNode(node)
    if reference_item and node_item:
        parent = hierarchy.GetItemParent(reference_item)
        if parent:
            hierarchy.SetItemParent(node_item, parent)


def segmentation_to_labels(
    context: SceneContext, segmentation_node: Any, reference_volume: Any = None, segment_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[LabelInfo]]:
    """Exports segments as one label array using Slicer's own segmentation logic.

    Label values are 1..N in segment order (or the order of ``segment_names``), on the reference volume's
    grid when given, else on the segmentation's reference geometry.

    Returns:
        ``(labels (k, j, i), ijk_to_ras, label_table)``.
    """
    import slicer
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    if segment_names is None:
        segment_ids = list(segmentation.GetSegmentIDs())
    else:
        segment_ids = []
        for segment_name in segment_names:
            segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
            if not segment_id:
                raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segment named '{segment_name}'")
            segment_ids.append(segment_id)
    if not segment_ids:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments to export")

    labelmap_node = slicer.vtkMRMLLabelMapVolumeNode()
    context.scene.AddNode(labelmap_node)
    try:
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        ok = context.segmentations_logic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap_node, reference_volume
        )
        if not ok:
            raise RuntimeError(f"Slicer could not export segmentation '{segmentation_node.GetName()}' to a label map")
        labels, ijk_to_ras = volume_to_array(labelmap_node)
    finally:
        context.scene.RemoveNode(labelmap_node)
    table = []
    for value, segment_id in enumerate(segment_ids, start=1):
        segment = segmentation.GetSegment(segment_id)
        table.append(
            LabelInfo(
                value=value,
                name=segment.GetName(),
                color=tuple(segment.GetColor()),
                terminology=segment.GetTerminology() or None,
            )
        )
    return labels, ijk_to_ras, table


