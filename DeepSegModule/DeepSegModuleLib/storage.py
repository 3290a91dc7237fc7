"""Reading and writing files through Slicer's own MRML storage nodes.

What Slicer writes, Slicer reads back: volumes (``.nrrd``, ``.nii``/``.nii.gz``, ``.mha``/``.mhd``),
segmentations (``.seg.nrrd``), transforms (``.h5``, ``.tfm``, displacement fields as ``.nrrd``/``.nii.gz``)
and whole scenes as ``.mrb`` bundles. A failed read leaves the scene as it was; a failed write leaves no
partial file behind where there was none.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .context import SceneContext

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".hdr", ".img", ".img.gz")
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".seg.nhdr", ".seg.nii.gz")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


logger = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A file could not be read or written; the message says which and what to do."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(VOLUME_SUFFIXES + SEGMENTATION_SUFFIXES + TRANSFORM_SUFFIXES + (".mrb",), key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise StorageError(f"{path} is a folder, not a file: pass the image file itself")
    return path


def _default_name(path: Path) -> str:
    return path.name[: -len(_suffix(path))] if _suffix(path) else path.stem


@contextmanager
def vtk_messages_to_log():
    """Keeps VTK's and MRML's messages (object dumps in red ``ERR|`` lines) off the terminal while a file is read;
    they go to this module's log, and the caller reports one line of its own."""
    import vtk

    previous = vtk.vtkOutputWindow.GetInstance()
    window = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(window)
    try:
        yield window
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
        text = window.GetOutput().strip()
        if text:
            logger.debug("VTK said while reading: %s", text[:4000])


def _read_into_new_node(context: SceneContext, node: Any, storage: Any, path: Path, name: str, what: str) -> Any:
    """Adds ``node`` with ``storage`` to the scene and reads ``path``; on failure removes both again."""
    storage.SetFileName(str(path))
    context.scene.AddNode(storage)
    node.SetName(context.scene.GenerateUniqueName(name))
    context.scene.AddNode(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    with vtk_messages_to_log():
        ok = storage.ReadData(node)
    if not ok:
        context.scene.RemoveNode(node)
        context.scene.RemoveNode(storage)
        raise StorageError(f"could not read {path} as {what}: the file is damaged or not in a format Slicer reads")
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def load_volume(context: SceneContext, path: str | os.PathLike, name: str | None = None, labelmap: bool = False) -> Any:
    """Reads an image file (NRRD, NIfTI, MetaImage, Analyze) into a new scalar (or label map) volume node.

    Raises:
        FileNotFoundError: the file does not exist.
        StorageError: the file is not a readable 3D image (the scene is left unchanged).
    """
    import slicer

    from .image_checks import check_image_file

    path = _existing_file(path)
    check_image_file(path, "image")
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetSingleFile(True)  # never pick up neighbouring files as a series
    node = _read_into_new_node(context, node, storage, path, name or _default_name(path), "a volume")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        _remove_with_storage(context, node)
        raise StorageError(f"{path} contains no voxels")
    return node


def load_segmentation(context: SceneContext, path: str | os.PathLike, name: str | None = None) -> Any:
    """Reads a ``.seg.nrrd`` (or any label image, one segment per label) into a new segmentation node."""
    import slicer

    from .image_checks import check_image_file

    path = _existing_file(path)
    check_image_file(path, "segmentation")
    node = slicer.vtkMRMLSegmentationNode()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    return _read_into_new_node(context, node, storage, path, name or _default_name(path), "a segmentation")


def load_transform(context: SceneContext, path: str | os.PathLike, name: str | None = None) -> Any:
    """Reads an ITK transform file (``.h5``, ``.tfm``, ``.mat``) into a new transform node.

    Linear transforms come back as linear transform nodes, displacement fields as grid transform nodes.
    """
    import slicer

    path = _existing_file(path)
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    # Reading into a general transform node first tells us the kind, then the matching node type is used.
    probe = slicer.vtkMRMLTransformNode()
    if not storage.ReadData(probe):
        raise StorageError(f"could not read {path} as a transform: not an ITK transform file (.h5, .tfm, .mat)")
    transform = probe.GetTransformFromParent() or probe.GetTransformToParent()
    if probe.IsLinear():
        node = slicer.vtkMRMLLinearTransformNode()
    elif transform is not None and transform.IsA("vtkBSplineTransform"):
        node = slicer.vtkMRMLBSplineTransformNode()
    elif transform is not None and (transform.IsA("vtkOrientedGridTransform") or transform.IsA("vtkGridTransform")):
        node = slicer.vtkMRMLGridTransformNode()
    else:
        node = slicer.vtkMRMLTransformNode()
    storage = slicer.vtkMRMLTransformStorageNode()
    return _read_into_new_node(context, node, storage, path, name or _default_name(path), "a transform")


def _remove_with_storage(context: SceneContext, node: Any) -> None:
    storage = node.GetStorageNode()
    context.scene.RemoveNode(node)
    if storage is not None:
        context.scene.RemoveNode(storage)


def save_node(context: SceneContext, node: Any, path: str | os.PathLike, compress: bool = True) -> Path:
    """Writes a volume, segmentation or transform node with Slicer's storage node for it.

    The file type follows the suffix: ``.nrrd``/``.nii.gz``/``.mha`` for volumes, ``.seg.nrrd`` for
    segmentations, ``.h5``/``.tfm`` for transforms. The file is written next to its destination and moved
    into place only once complete, so a failed write leaves no partial file.

    Raises:
        StorageError: unwritable folder, a suffix the node type cannot be written as, or a failed write.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise StorageError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise StorageError(f"cannot write {path}: folder {folder} is not writable (choose another output folder)")

    suffix = _suffix(path)
    allowed = _writable_suffixes(node)
    if suffix not in allowed:
        raise StorageError(
            f"cannot write a {node.GetClassName()} as '{suffix}': use one of {', '.join(allowed)}"
        )

    storage = node.GetStorageNode()
    created = storage is None
    if created:
        storage = node.CreateDefaultStorageNode()
        if storage is None:
            raise StorageError(f"{node.GetClassName()} '{node.GetName()}' cannot be written to a file")
        context.scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    previous_name = storage.GetFileName()

    def write(temporary: str) -> bool:
        storage.SetFileName(temporary)
        if hasattr(storage, "SetUseCompression"):
            storage.SetUseCompression(1 if compress else 0)
        return bool(storage.WriteData(node))

    try:
        _write_atomically(path, write, f"'{node.GetName()}'")
    except BaseException:
        storage.SetFileName(previous_name)
        if created:
            node.SetAndObserveStorageNodeID(None)
            context.scene.RemoveNode(storage)
        raise
    storage.SetFileName(str(path))
    return path


def _write_atomically(path: Path, write: Callable[[str], Any], what: str) -> Path:
    """Calls ``write(temporary)`` for a file with ``path``'s name in a hidden folder beside it (writers pick the
    format from the name), then moves it into place: a failed write leaves nothing at the destination."""
    folder = path.parent if str(path.parent) else Path(".")
    staging = tempfile.mkdtemp(prefix=".deepseg-", dir=folder)
    temporary = os.path.join(staging, path.name)
    try:
        if write(temporary) is False or not os.path.exists(temporary) or os.path.getsize(temporary) == 0:
            raise StorageError(f"could not write {what} to {path}")
        os.replace(temporary, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _writable_suffixes(node: Any) -> tuple[str, ...]:
    if node.IsA("vtkMRMLSegmentationNode"):
        return SEGMENTATION_SUFFIXES
    if node.IsA("vtkMRMLVolumeNode"):
        return (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
    if node.IsA("vtkMRMLTransformNode"):
        return (".h5", ".hdf5", ".tfm", ".txt", ".mat") if node.IsLinear() else (".h5", ".hdf5", ".tfm")
    return ()


def save_scene_bundle(context: SceneContext, path: str | os.PathLike) -> Path:
    """Writes the whole scene with its data as a ``.mrb`` bundle that Slicer opens (File > Open Data).

    Nodes that have never been saved are given default storage nodes so their data goes into the bundle.
    """
    path = Path(path)
    if _suffix(path) != ".mrb":
        raise StorageError(f"a scene bundle must end in .mrb, got {path.name}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise StorageError(f"cannot write {path}: folder {folder} does not exist or is not writable")
    _ensure_storage_nodes(context)
    return _write_atomically(path, lambda temporary: bool(context.scene.WriteToMRB(temporary)), "the scene bundle")


def _ensure_storage_nodes(context: SceneContext) -> None:
    scene = context.scene
    storable = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.IsA("vtkMRMLStorableNode") and node.GetSaveWithScene() and not node.GetHideFromEditors():
            storable.append(node)
    for node in storable:
        if node.GetStorageNode() is None:
            storage = node.CreateDefaultStorageNode()
            if storage is None:
                continue
            scene.AddNode(storage)
            node.SetAndObserveStorageNodeID(storage.GetID())
        storage = node.GetStorageNode()
        if not storage.GetFileName():
            storage.SetFileName(f"{_safe_file_name(node.GetName())}.{storage.GetDefaultWriteFileExtension()}")


def _safe_file_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_ " else "_" for c in name).strip()
    return cleaned or "node"


def load_scene_bundle(context: SceneContext, path: str | os.PathLike, clear: bool = False) -> list[Any]:
    """Reads a ``.mrb`` bundle into the scene; returns the data nodes it added."""
    path = _existing_file(path)
    before = set(context.node_ids())
    if not context.scene.ReadFromMRB(str(path), clear):
        raise StorageError(f"could not read scene bundle {path}: not a Slicer .mrb file or damaged")
    return [context.scene.GetNodeByID(node_id) for node_id in context.node_ids() if node_id not in before]


def save_array_like_file(path: str | os.PathLike, array: Any, ijk_to_ras: Any, like: str | os.PathLike | None) -> Path:
    """Writes ``array`` (on a volume node's grid) with the voxel layout of the image file ``like``.

    A label map for an input file should line up with that file voxel for voxel in any tool, also where
    Slicer's reader flipped the slice axis of a left-handed image. ``like`` None writes the array on its own grid.
    Written with SimpleITK (the file's own writer), then moved into place.
    """
    import SimpleITK as sitk

    from . import nodes

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise StorageError(f"cannot write {path}: folder {folder} does not exist or is not writable")
    if like is None:  # no image file to follow (a DICOM series): the array's own grid
        laid_out, grid = array, ijk_to_ras
    else:
        shape, grid = nodes.file_grid(str(like))
        laid_out = nodes.reorder_to_grid(array, ijk_to_ras, shape, grid)
    return _write_atomically(
        path, lambda temporary: sitk.WriteImage(nodes.array_to_sitk(laid_out, grid), temporary, True), "the label map"
    )
