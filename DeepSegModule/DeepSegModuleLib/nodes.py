"""The node bridge: the one place where MRML nodes meet arrays.

Conventions (see DESIGN.md):

* Arrays are in Slicer's ``(k, j, i)`` axis order, as ``slicer.util.arrayFromVolume`` returns them.
* Geometry is a 4x4 ``ijk_to_ras`` matrix mapping homogeneous ``(i, j, k, 1)`` to RAS millimetres.
* SimpleITK images are LPS; conversion flips the first two physical axes.
* Transforms are written in the *resampling* direction: a linear or grid transform node's "from parent"
  transform maps a fixed (world) point to the moving point that is sampled, which is what ITK writes to
  ``.h5``/``.tfm`` files. Applying the node to the moving volume then shows it aligned with the fixed one.

Every writer validates all of its input before it touches the scene, so a bad call leaves the scene as it
was; new nodes are added to the scene only once they are complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from .context import SceneContext

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


# ----------------------------------------------------------------------------------------------- validation


def check_volume_array(array: Any, what: str = "volume") -> np.ndarray:
    """Returns ``array`` as a numpy array after checking it is a non-empty 3D scalar volume.

    Raises:
        ValueError: for a 2D or 4D array, or an empty one, with what to do about it.
    """
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 3:
        hint = ""
        if array.ndim == 4:
            hint = " (for multi-channel data pass one channel at a time, e.g. array[c])"
        elif array.ndim == 2:
            hint = " (add a slice axis: array[np.newaxis])"
        raise ValueError(f"{what} must be a 3D array in (k, j, i) order, got shape {array.shape}{hint}")
    if array.size == 0:
        raise ValueError(f"{what} is empty (shape {array.shape}): every axis needs at least one voxel")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    elif not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{what} has unsupported voxel type {array.dtype}: use an integer or float array")
    return array


def check_affine(ijk_to_ras: Any, what: str = "ijk_to_ras") -> np.ndarray:
    """Returns ``ijk_to_ras`` as a float64 4x4 matrix after checking it is a finite, invertible affine.

    Raises:
        ValueError: for a wrong shape, NaN/inf entries, a singular matrix or a projective last row.
    """
    if hasattr(ijk_to_ras, "GetElement"):  # vtkMatrix4x4
        ijk_to_ras = matrix_from_vtk(ijk_to_ras)
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"{what} must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{what} contains NaN or infinite values: check the image header's spacing and direction")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{what} must have [0, 0, 0, 1] as its last row, got {matrix[3].tolist()}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError(f"{what} is singular (zero spacing or degenerate directions): {matrix[:3, :3].tolist()}")
    return matrix


# ----------------------------------------------------------------------------------------------- matrices


def matrix_from_vtk(vtk_matrix: Any) -> np.ndarray:
    """A vtkMatrix4x4 as a float64 numpy array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def matrix_to_vtk(matrix: np.ndarray) -> Any:
    """A 4x4 numpy array as a new vtkMatrix4x4."""
    import vtk

    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, float(matrix[r, c]))
    return vtk_matrix


def spacing_and_directions(ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits an IJK->RAS matrix into (origin, spacing, direction columns) as Slicer's volume nodes store it."""
    linear = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    directions = linear / spacing
    return ijk_to_ras[:3, 3].copy(), spacing, directions


# ----------------------------------------------------------------------------------------------- volumes


def check_volume_node(node: Any) -> None:
    """Checks that ``node`` is a usable 3D scalar volume: voxels, one component, a finite invertible geometry.

    Raises:
        ValueError: saying what makes the node unusable and what to do.
    """
    require_scalar_volume(node)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    check_affine(matrix, f"the geometry (IJK to RAS) of volume '{node.GetName()}'")


def require_scalar_volume(node: Any) -> None:
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = node.GetClassName() if node is not None else "None"
        raise ValueError(f"expected a scalar volume node (vtkMRMLScalarVolumeNode or label map), got {kind}")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise ValueError(f"volume '{node.GetName()}' has no voxels: load or compute an image into it first")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
            "a single-component scalar volume is required (convert vector volumes first)"
        )


def volume_ijk_to_ras(node: Any, world: bool = False) -> np.ndarray:
    """The node's IJK->RAS matrix; with ``world=True`` including its (linear) parent transforms.

    Raises:
        ValueError: with ``world=True`` when a parent transform is not linear (harden it first).
    """
    import vtk

    vtk_matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vtk_matrix)
    ijk_to_ras = matrix_from_vtk(vtk_matrix)
    parent = node.GetParentTransformNode()
    if world and parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(
                f"volume '{node.GetName()}' is under a non-linear transform '{parent.GetName()}': "
                "harden the transform on the volume first (Data module: right-click > Harden transform)"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = matrix_from_vtk(to_world) @ ijk_to_ras
    return ijk_to_ras


def volume_to_array(node: Any, world: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Copies a scalar volume node's voxels out as ``(array (k, j, i), ijk_to_ras)``.

    Args:
        node: a ``vtkMRMLScalarVolumeNode`` (label maps included).
        world: include linear parent transforms in the returned matrix (the position the user sees).
    """
    from vtk.util import numpy_support

    require_scalar_volume(node)
    image = node.GetImageData()
    i_size, j_size, k_size = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = scalars.reshape(k_size, j_size, i_size).copy()
    return array, volume_ijk_to_ras(node, world=world)


def _image_data_from_array(array: np.ndarray) -> Any:
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    k_size, j_size, i_size = array.shape
    image.SetDimensions(i_size, j_size, k_size)
    flat = np.ascontiguousarray(array).reshape(-1)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def array_to_volume(
    context: SceneContext,
    array: Any,
    ijk_to_ras: Any,
    name: str = "Volume",
    node: Any = None,
    labelmap: bool = False,
) -> Any:
    """Writes ``array`` (k, j, i) with geometry ``ijk_to_ras`` into a new or an existing volume node.

    Args:
        context: the scene context.
        array: 3D numpy array or torch tensor in (k, j, i) order.
        ijk_to_ras: 4x4 IJK->RAS matrix (numpy or vtkMatrix4x4).
        name: name for a new node (made unique in the scene).
        node: an existing scalar volume node to update instead of creating one.
        labelmap: create a ``vtkMRMLLabelMapVolumeNode`` instead of a scalar volume.

    Returns:
        The volume node, in the scene, with display nodes.

    Raises:
        ValueError: for a non-3D or empty array or an invalid matrix; nothing is changed then.
    """
    array = check_volume_array(array)
    ijk_to_ras = check_affine(ijk_to_ras)
    if node is not None and not node.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError(f"cannot write voxels into a {node.GetClassName()}: pass a scalar volume node")
    image = _image_data_from_array(array)

    import slicer

    is_new = node is None
    if is_new:
        node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    disabled = node.StartModify()
    node.SetIJKToRASMatrix(matrix_to_vtk(ijk_to_ras))
    node.SetAndObserveImageData(image)
    node.EndModify(disabled)
    if is_new:
        context.add_node(node, name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None and not labelmap and display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        display.AutoWindowLevelOn()
    return node


def probability_to_volume(
    context: SceneContext,
    probability: Any,
    ijk_to_ras: Any,
    name: str = "Probability",
    node: Any = None,
) -> Any:
    """Writes a probability map (values in 0..1) as a float32 scalar volume with a 0..1 window.

    Raises:
        ValueError: for values outside 0..1 (pass probabilities, not logits) or a bad array/matrix.
    """
    probability = check_volume_array(probability, "probability map").astype(np.float32, copy=False)
    if probability.size and (np.nanmin(probability) < -1e-6 or np.nanmax(probability) > 1 + 1e-6):
        raise ValueError("probability map has values outside 0..1: apply softmax/sigmoid to the logits first")
    node = array_to_volume(context, probability, ijk_to_ras, name=name, node=node)
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
    return node


# ----------------------------------------------------------------------------------------------- SimpleITK


def sitk_geometry_to_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """IJK->RAS of a SimpleITK image (whose origin and direction are LPS)."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D SimpleITK image, got {image.GetDimension()}D")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * spacing
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ ijk_to_lps


def ijk_to_ras_to_sitk_geometry(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in SimpleITK's LPS terms for an IJK->RAS matrix."""
    ijk_to_lps = LPS_TO_RAS @ check_affine(ijk_to_ras)
    origin, spacing, directions = spacing_and_directions(ijk_to_lps)
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(directions.reshape(-1).tolist())


def array_to_sitk(array: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image from a (k, j, i) array and its IJK->RAS matrix."""
    import SimpleITK as sitk

    array = check_volume_array(array)
    origin, spacing, direction = ijk_to_ras_to_sitk_geometry(ijk_to_ras)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def sitk_to_array(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(array (k, j, i), ijk_to_ras)`` from a 3D scalar SimpleITK image."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a scalar SimpleITK image; split vector images into components first")
    ijk_to_ras = sitk_geometry_to_ijk_to_ras(image)
    return sitk.GetArrayFromImage(image), ijk_to_ras


# ----------------------------------------------------------------------------------------------- transforms


def matrix_to_transform(context: SceneContext, fixed_to_moving_ras: Any, name: str = "Transform", node: Any = None) -> Any:
    """Writes a 4x4 RAS resampling matrix (fixed point -> moving point) into a linear transform node.

    The matrix becomes the node's "from parent" transform, so placing the moving volume under the node
    shows it aligned with the fixed volume, and the node writes to ``.h5``/``.tfm`` as ITK expects.
    """
    import slicer

    matrix = check_affine(fixed_to_moving_ras, "transform matrix")
    if node is not None and not node.IsA("vtkMRMLLinearTransformNode"):
        raise ValueError(f"cannot write a matrix into a {node.GetClassName()}: pass a linear transform node")
    is_new = node is None
    if is_new:
        node = slicer.vtkMRMLLinearTransformNode()
    node.SetMatrixTransformFromParent(matrix_to_vtk(matrix))
    if is_new:
        context.add_node(node, name)
    return node


def check_displacement(displacement_ras: Any, ijk_to_ras: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates a displacement field (k, j, i, 3) and its grid geometry."""
    if hasattr(displacement_ras, "detach"):
        displacement_ras = displacement_ras.detach().cpu().numpy()
    field = np.asarray(displacement_ras)
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f"displacement field must have shape (k, j, i, 3), got {field.shape}")
    if field.size == 0:
        raise ValueError("displacement field is empty")
    if not np.all(np.isfinite(field)):
        raise ValueError("displacement field contains NaN or infinite vectors: the registration diverged")
    grid = check_affine(ijk_to_ras)
    _, _, directions = spacing_and_directions(grid)
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-6):
        raise ValueError("the displacement grid's axes must be orthogonal (no shear) to be a Slicer grid transform")
    return field.astype(np.float64), grid


def displacement_to_grid_transform(
    context: SceneContext,
    displacement_ras: Any,
    ijk_to_ras: Any,
    name: str = "Displacement",
    node: Any = None,
) -> Any:
    """Writes a displacement field as a grid transform node in Slicer's resampling convention.

    Args:
        displacement_ras: (k, j, i, 3) RAS vectors in mm on the grid ``ijk_to_ras``: the fixed point ``p``
            at a voxel maps to the moving point ``p + d(p)``; between voxels Slicer interpolates linearly.
        ijk_to_ras: the grid geometry (orthogonal axes, any spacing and orientation).
        node: an existing grid transform node to update.

    Returns:
        A ``vtkMRMLGridTransformNode`` whose "from parent" transform is the field.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    field, grid = check_displacement(displacement_ras, ijk_to_ras)
    if node is not None and not node.IsA("vtkMRMLGridTransformNode"):
        raise ValueError(f"cannot write a displacement field into a {node.GetClassName()}: pass a grid transform node")
    origin, spacing, directions = spacing_and_directions(grid)

    k_size, j_size, i_size, _ = field.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i_size, j_size, k_size)
    image.SetOrigin(*origin)
    image.SetSpacing(*spacing)
    vectors = numpy_support.numpy_to_vtk(np.ascontiguousarray(field).reshape(-1, 3), deep=True)
    image.GetPointData().SetScalars(vectors)

    direction_matrix = np.eye(4)
    direction_matrix[:3, :3] = directions
    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(image)
    grid_transform.SetGridDirectionMatrix(matrix_to_vtk(direction_matrix))
    grid_transform.SetInterpolationModeToLinear()

    is_new = node is None
    if is_new:
        node = slicer.vtkMRMLGridTransformNode()
    node.SetAndObserveTransformFromParent(grid_transform)
    if is_new:
        context.add_node(node, name)
    return node


def transform_points(node: Any, points_ras: Any) -> np.ndarray:
    """Maps fixed-space RAS points through the node's resampling ("from parent") transform, as Slicer does."""
    transform = node.GetTransformFromParent()
    points = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
    return np.array([transform.TransformPoint(*p) for p in points])


# ----------------------------------------------------------------------------------------------- file layouts


def file_grid(path: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape (k, j, i), ijk_to_ras)`` of an image file as stored (SimpleITK's reading, header only).

    Slicer's reader flips the slice axis of left-handed images, so a volume node can hold the same voxels in
    a different order than its file; this gives the file's own layout.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"{path} is a {reader.GetDimension()}D image; a 3D image is required")
    header = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    header.SetOrigin(reader.GetOrigin())
    header.SetSpacing(reader.GetSpacing())
    header.SetDirection(reader.GetDirection())
    return tuple(int(n) for n in reversed(reader.GetSize())), sitk_geometry_to_ijk_to_ras(header)


def reorder_to_grid(
    array: np.ndarray, ijk_to_ras: np.ndarray, target_shape: Sequence[int], target_ijk_to_ras: np.ndarray, atol: float = 1e-3
) -> np.ndarray:
    """The same voxels laid out on ``target`` grid, when the two grids differ only by axis flips and permutations.

    Raises:
        ValueError: when the grids are not the same set of voxel centres.
    """
    index_map = np.linalg.inv(check_affine(ijk_to_ras)) @ check_affine(target_ijk_to_ras)
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    rounded = np.rint(linear)
    if not np.allclose(linear, rounded, atol=atol) or sorted(np.abs(rounded).sum(axis=0)) != [1, 1, 1] or \
            sorted(np.abs(rounded).sum(axis=1)) != [1, 1, 1]:
        raise ValueError("the grids differ by more than axis flips and permutations: resample instead")
    source_axis = [int(np.argmax(np.abs(rounded[:, axis]))) for axis in range(3)]  # per target i, j, k
    volume_ijk = np.transpose(np.asarray(array), (2, 1, 0))
    reordered = np.transpose(volume_ijk, source_axis)
    target_size = list(reversed(list(target_shape)))
    for axis in range(3):
        sign = rounded[source_axis[axis], axis]
        expected_offset = 0 if sign > 0 else reordered.shape[axis] - 1
        if abs(offset[source_axis[axis]] - expected_offset) > atol or reordered.shape[axis] != target_size[axis]:
            raise ValueError("the grids do not cover the same voxels: resample instead")
        if sign < 0:
            reordered = np.flip(reordered, axis)
    return np.ascontiguousarray(np.transpose(reordered, (2, 1, 0)))
