"""Reading back what DeepSeg wrote into a transform node, the way Slicer stores it (VTK calls only), so tests can
check the written node against the engine's own numbers."""

from __future__ import annotations

from typing import Any

import numpy as np


def _matrix(vtk_matrix: Any) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def transform_to_matrix(node: Any) -> np.ndarray:
    """The linear transform node's resampling matrix (fixed -> moving, its "from parent" matrix)."""
    import vtk

    if node is None or not node.IsLinear():
        raise ValueError("expected a linear transform node")
    matrix = vtk.vtkMatrix4x4()
    node.GetMatrixTransformFromParent(matrix)
    return _matrix(matrix)



def grid_transform_to_displacement(node: Any) -> tuple[np.ndarray, np.ndarray]:
    """The (k, j, i, 3) displacement field and its IJK->RAS grid of a grid transform node (from parent)."""
    from vtk.util import numpy_support

    transform = node.GetTransformFromParent()
    grid_transform = _find_grid_transform(transform)
    if grid_transform is None:
        raise ValueError(f"transform '{node.GetName()}' holds no displacement grid")
    if grid_transform.GetInverseFlag():
        raise ValueError(f"transform '{node.GetName()}' stores its grid as the inverse; invert the node first")
    image = grid_transform.GetDisplacementGrid()
    i_size, j_size, k_size = image.GetDimensions()
    field = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k_size, j_size, i_size, 3)
    scale, shift = grid_transform.GetDisplacementScale(), grid_transform.GetDisplacementShift()
    field = field.astype(np.float64) * scale + shift
    directions = _matrix(grid_transform.GetGridDirectionMatrix())[:3, :3] if grid_transform.GetGridDirectionMatrix() else np.eye(3)
    grid = np.eye(4)
    grid[:3, :3] = directions * np.array(image.GetSpacing())
    grid[:3, 3] = image.GetOrigin()
    return field, grid


def _find_grid_transform(transform: Any) -> Any:
    import slicer

    if transform is None:
        return None
    if transform.IsA("vtkOrientedGridTransform"):
        return slicer.vtkOrientedGridTransform.SafeDownCast(transform)
    if transform.IsA("vtkGeneralTransform"):
        for index in range(transform.GetNumberOfConcatenatedTransforms()):
            found = _find_grid_transform(transform.GetConcatenatedTransform(index))
            if found is not None:
                return found
    return None

