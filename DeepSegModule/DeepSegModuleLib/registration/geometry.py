"""Image grids in physical space, and the coordinate frames the optimiser works in.

Arrays are in Slicer's (k, j, i) order; a grid's ``ijk_to_ras`` maps homogeneous (i, j, k, 1) to
RAS mm. ``torch.nn.functional.grid_sample`` wants normalised (x, y, z) = (i, j, k) coordinates in
[-1, 1] (``align_corners=True``: -1 and 1 are the centres of the first and last voxels) for an
input of shape (N, C, D, H, W) = (N, C, k, j, i). Everything that converts between these lives here.

The optimiser works in a *normalised physical* frame ``u = (p - centre) / scale`` (RAS mm shifted
to the fixed image's centre and divided by its half extent), shared by fixed and moving images:
rotations stay rotations, translations are O(1) numbers, and rotations turn about the fixed image
centre, so rotation and translation parameters are decoupled and equally scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Grid:
    """A voxel grid placed in RAS space.

    Attributes:
        shape: Array shape in (k, j, i) order.
        ijk_to_ras: 4x4 float64 matrix from homogeneous (i, j, k, 1) to RAS mm.
    """

    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    @property
    def size_ijk(self) -> np.ndarray:
        """Voxel counts along i, j, k."""
        return np.array(self.shape[::-1], dtype=np.float64)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm (column norms of the direction-scaled matrix)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def center_ras(self) -> np.ndarray:
        """RAS position of the grid's geometric centre."""
        return (self.ijk_to_ras @ np.append((self.size_ijk - 1) / 2, 1.0))[:3]

    @property
    def half_extent_mm(self) -> float:
        """Half of the largest physical extent (corner-voxel centre to corner-voxel centre)."""
        return float(max(((self.size_ijk - 1) * self.spacing).max() / 2, 1.0))

    def ijk_to_normalized(self) -> np.ndarray:
        """4x4 matrix from (i, j, k, 1) to grid_sample's normalised (x, y, z, 1)."""
        denominators = np.maximum(self.size_ijk - 1, 1)
        matrix = np.eye(4)
        matrix[:3, :3] = np.diag(2.0 / denominators)
        matrix[:3, 3] = -1.0
        return matrix

    def ras_to_normalized(self) -> np.ndarray:
        """4x4 matrix from RAS mm to grid_sample's normalised (x, y, z)."""
        return self.ijk_to_normalized() @ np.linalg.inv(self.ijk_to_ras)

    def coarsened(self, target_spacing_mm: float, min_size: int = 8) -> tuple[Grid, np.ndarray]:
        """A grid over the same physical extent with voxels of about ``target_spacing_mm``.

        The first and last voxel centres stay where they are (the ``align_corners=True``
        convention), so ``F.interpolate(..., align_corners=True)`` moves an image between the
        two grids, and the orientation is kept. An axis never gets finer than it was.

        Args:
            target_spacing_mm: Wanted voxel size.
            min_size: Fewest voxels along an axis (unless the axis had fewer).

        Returns:
            The new grid and the per-axis (i, j, k) factor ``new spacing / old spacing``.
        """
        sizes = self.size_ijk
        spacing = self.spacing
        target = np.maximum(target_spacing_mm, spacing)
        new_sizes = np.maximum(np.round((sizes - 1) * spacing / target) + 1, np.minimum(sizes, min_size))
        factors = np.where(new_sizes > 1, (sizes - 1) / np.maximum(new_sizes - 1, 1), 1.0)
        matrix = self.ijk_to_ras.copy()
        matrix[:3, :3] = matrix[:3, :3] * factors[None, :]
        new_shape = tuple(int(n) for n in new_sizes[::-1])
        return Grid(new_shape, matrix), factors  # type: ignore[arg-type]


@dataclass(frozen=True)
class NormalizedFrame:
    """The optimiser's frame ``u = (p_ras - centre) / scale`` (see the module docstring)."""

    centre: np.ndarray
    scale: float

    def u_to_ras(self) -> np.ndarray:
        """4x4 matrix from u to RAS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] *= self.scale
        matrix[:3, 3] = self.centre
        return matrix

    def ras_to_u(self) -> np.ndarray:
        """4x4 matrix from RAS mm to u."""
        return np.linalg.inv(self.u_to_ras())

    def linear_to_ras(self, matrix_u: np.ndarray, translation_u: np.ndarray) -> np.ndarray:
        """The RAS 4x4 of ``u -> matrix_u @ u + translation_u``."""
        transform_u = np.eye(4)
        transform_u[:3, :3] = matrix_u
        transform_u[:3, 3] = translation_u
        return self.u_to_ras() @ transform_u @ self.ras_to_u()

    def linear_from_ras(self, matrix_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`linear_to_ras`: (matrix_u, translation_u)."""
        transform_u = self.ras_to_u() @ matrix_ras @ self.u_to_ras()
        return transform_u[:3, :3].copy(), transform_u[:3, 3].copy()


def grid_points(
    grid: Grid, to_frame: np.ndarray, device: torch.device, k_range: tuple[int, int] | None = None
) -> torch.Tensor:
    """Voxel centres of ``grid`` mapped by ``to_frame @ ijk_to_ras``.

    Args:
        grid: The voxel grid.
        to_frame: 4x4 matrix from RAS to the wanted frame (identity for RAS itself).
        device: Torch device.
        k_range: Optional slab ``(k_start, k_stop)``, to bound memory on large grids.

    Returns:
        ``(k, j, i, 3)`` float32 tensor of frame coordinates.
    """
    k_start, k_stop = k_range if k_range is not None else (0, grid.shape[0])
    matrix = torch.as_tensor(to_frame @ grid.ijk_to_ras, dtype=torch.float32, device=device)
    # Each point is i * column_i + j * column_j + k * column_k + offset: three broadcast sums (a
    # meshgrid and a (points, 3) x (3, 3) product took several times longer on CPU).
    i = torch.arange(grid.shape[2], device=device, dtype=torch.float32)[:, None] * matrix[:3, 0]
    j = torch.arange(grid.shape[1], device=device, dtype=torch.float32)[:, None] * matrix[:3, 1]
    k = torch.arange(k_start, k_stop, device=device, dtype=torch.float32)[:, None] * matrix[:3, 2]
    return (k + matrix[:3, 3])[:, None, None] + j[None, :, None] + i[None, None, :]


def gaussian_smooth(volume: torch.Tensor, sigma_kji: tuple[float, float, float] | np.ndarray) -> torch.Tensor:
    """Separable Gaussian smoothing of a ``(N, C, D, H, W)`` tensor, per-axis sigma in voxels.

    Written here rather than taken from MONAI's ``GaussianFilter`` because a zero sigma on one
    axis (an already-coarse slice direction) must simply skip that axis. Each axis is a weighted
    sum of shifted slices of the edge-padded volume: on CPU a one-dimensional kernel through
    ``conv3d`` takes the unvectorised ``slow_conv3d`` path and was three times slower.
    """
    result = volume
    for axis, sigma in enumerate(sigma_kji):
        sigma = float(sigma)
        dim = 2 + axis
        size = volume.shape[dim]
        if sigma <= 0.05 or size < 2:
            continue
        radius = max(math.ceil(3.0 * sigma), 1)
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        pad = [0, 0, 0, 0, 0, 0]
        # F.pad lists the last axis first.
        pad[2 * (2 - axis)] = radius
        pad[2 * (2 - axis) + 1] = radius
        padded = F.pad(result, pad, mode="replicate")
        result = padded.narrow(dim, 0, size) * float(kernel[0])
        for shift in range(1, 2 * radius + 1):
            result = result + padded.narrow(dim, shift, size) * float(kernel[shift])
    return result


# Fewest sampling points per thread before grid_sample is split across threads.
_POINTS_PER_THREAD = 4096
# Most rows of a slice stack (slices x (rows + 1)). The stack's row coordinate is a float32 number
# that grows with the stack: at 2**15 rows it is still exact to 0.002 voxel (see SliceStack).
_STACK_ROWS_LIMIT = 2**15


class SliceStack:
    """A ``(1, C, D, H, W)`` volume laid out so that PyTorch's 2D sampler does trilinear interpolation.

    On CPU, ``F.grid_sample`` of 3D volumes runs a scalar kernel (and its backward pass, the
    gradient with respect to the points that every iteration of the registration needs, is slower
    still), while the 2D kernel is vectorised and multithreaded: 5 to 7 times faster per point
    here. So the volume's slices are stacked into one 2D image of ``D * (H + 1)`` rows, each slice
    followed by a row of zeros, and a point ``(x, y, z)`` is sampled on the two slices around
    ``z`` by the 2D sampler and blended linearly along ``z``: the same trilinear value, with zeros
    outside the volume (the zero rows stand for the border between slices), and the same gradient
    with respect to the point (autograd through the blend and the 2D sampler). Build it once per
    volume and sample it many times.

    Args:
        volume: ``(1, C, D, H, W)`` tensor.
    """

    def __init__(self, volume: torch.Tensor) -> None:
        if volume.ndim != 5 or volume.shape[0] != 1:
            raise ValueError(f"a slice stack needs a (1, C, D, H, W) volume, got shape {tuple(volume.shape)}")
        self.shape = tuple(int(n) for n in volume.shape[2:])
        depth, height, width = self.shape
        self.channels = int(volume.shape[1])
        self.rows = depth * (height + 1)
        self.image = F.pad(volume, (0, 0, 0, 1)).reshape(1, self.channels, self.rows, width)

    @staticmethod
    def suits(volume: torch.Tensor) -> bool:
        """Whether the slice stack is the faster sampler for this volume (CPU, one volume, few enough rows)."""
        return (
            volume.device.type == "cpu"
            and volume.ndim == 5
            and volume.shape[0] == 1
            and volume.shape[2] * (volume.shape[3] + 1) <= _STACK_ROWS_LIMIT
        )

    def sample(self, grid: torch.Tensor, padding_mode: str = "zeros", mode: str = "bilinear") -> torch.Tensor:
        """Samples at normalised ``(1, ..., 3)`` points (``align_corners=True``), ``(1, C, ...)``.

        Args:
            grid: Normalised (x, y, z) points, e.g. ``(1, D', H', W', 3)``.
            padding_mode: ``"zeros"`` or ``"border"``, as ``F.grid_sample``'s.
            mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (the slice nearest to ``z``, then the
                2D sampler's nearest row and column).
        """
        depth, height, _ = self.shape
        spatial = tuple(grid.shape[1:-1])
        points = grid.reshape(-1, 3)
        x = points[:, 0]
        y = (points[:, 1] + 1.0) * (0.5 * (height - 1))
        z = (points[:, 2] + 1.0) * (0.5 * (depth - 1))
        if padding_mode == "border":
            x = x.clamp(-1.0, 1.0)
            y = y.clamp(0.0, height - 1.0)
            z = z.clamp(0.0, depth - 1.0)
        elif padding_mode == "zeros":
            # Beyond one voxel outside, a row would reach into the neighbouring slice; the zero row
            # (or the image edge) at -1 and ``height`` gives the right zero instead.
            y = y.clamp(-1.0, float(height))
        else:
            raise ValueError(f"padding_mode must be 'zeros' or 'border', got {padding_mode!r}")
        if mode == "nearest":
            nearest = z.detach().round()  # half to even, as grid_sample's nearest
            valid = ((nearest >= 0) & (nearest <= depth - 1)).to(z.dtype)
            rows = nearest.clamp(0, depth - 1) * (height + 1) + y
            plane_grid = torch.stack((x, rows * (2.0 / max(self.rows - 1, 1)) - 1.0), dim=-1)[None, None]
            values = F.grid_sample(self.image, plane_grid, mode="nearest", padding_mode="zeros", align_corners=True)
            return (values[:, :, 0] * valid).reshape(1, self.channels, *spatial)
        if mode != "bilinear":
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        lower = z.detach().floor()
        if padding_mode == "border" and depth > 1:
            lower = lower.clamp(max=depth - 2.0)
        fraction = z - lower
        upper = lower + 1.0
        weight_lower = (1.0 - fraction) * ((lower >= 0) & (lower <= depth - 1)).to(z.dtype)
        weight_upper = fraction * ((upper >= 0) & (upper <= depth - 1)).to(z.dtype)
        rows = torch.stack((lower.clamp(0, depth - 1) * (height + 1) + y, upper.clamp(0, depth - 1) * (height + 1) + y))
        rows_normalized = rows * (2.0 / max(self.rows - 1, 1)) - 1.0
        plane_grid = torch.stack((x.expand_as(rows_normalized), rows_normalized), dim=-1)[None]
        both = F.grid_sample(self.image, plane_grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        values = both[:, :, 0] * weight_lower + both[:, :, 1] * weight_upper
        return values.reshape(1, self.channels, *spatial)


def sample(
    volume: torch.Tensor | SliceStack, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """``F.grid_sample(volume, grid, mode, padding_mode, align_corners=True)`` for a single volume, fast on CPU.

    On CPU the sampling goes through a :class:`SliceStack` (pass one to reuse it). Otherwise
    PyTorch's 3D kernel is used; on CPU it runs one thread per batch item, so with one volume it
    runs on one core whatever ``torch.set_num_threads`` says: there the points are split into one
    batch item per thread (the volume is expanded, not copied) and put back together.

    Args:
        volume: ``(1, C, D, H, W)``, or a :class:`SliceStack` of one.
        grid: ``(1, ..., 3)`` normalised (x, y, z) points, e.g. ``(1, D', H', W', 3)``.
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"zeros"`` or ``"border"``.

    Returns:
        ``(1, C, ...)`` samples, the spatial shape of ``grid``.
    """
    if isinstance(volume, SliceStack):
        return volume.sample(grid, padding_mode, mode)
    if SliceStack.suits(volume):
        return SliceStack(volume).sample(grid, padding_mode, mode)
    threads = torch.get_num_threads()
    spatial = tuple(grid.shape[1:-1])
    points = math.prod(spatial)
    if volume.device.type != "cpu" or threads < 2 or points < 2 * _POINTS_PER_THREAD or volume.shape[0] != 1:
        grid_5d = grid if grid.ndim == 5 else grid.reshape(grid.shape[0], -1, 1, 1, 3)
        values = F.grid_sample(volume, grid_5d, mode=mode, padding_mode=padding_mode, align_corners=True)
        return values if grid.ndim == 5 else values.reshape(*values.shape[:2], *spatial)
    parts = min(threads, points // _POINTS_PER_THREAD)
    per_part = -(-points // parts)
    flat = grid.reshape(-1, 3)
    if per_part * parts != points:
        flat = F.pad(flat, (0, 0, 0, per_part * parts - points))
    values = F.grid_sample(
        volume.expand(parts, *volume.shape[1:]),
        flat.reshape(parts, per_part, 1, 1, 3),
        mode=mode,
        padding_mode=padding_mode,
        align_corners=True,
    )
    channels = volume.shape[1]
    # (parts, C, per_part, 1, 1) -> (1, C, points): free for one channel, a small copy otherwise.
    values = values.reshape(parts, channels, per_part).movedim(0, 1).reshape(1, channels, parts * per_part)
    return values[:, :, :points].reshape(1, channels, *spatial)


def identity_grid(shape_kji: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(1, D, H, W, 3)`` normalised (x, y, z) coordinates of a grid's own voxels (``align_corners=True``)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape_kji]
    k, j, i = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((i, j, k), dim=-1)[None]


def integrate_velocity(velocity: torch.Tensor, steps: int, identity: torch.Tensor | None = None) -> torch.Tensor:
    """exp(v) of a stationary velocity field by scaling and squaring.

    The same computation as MONAI's ``DVF2DDF`` with border padding, but in grid_sample's
    normalised units, so that no reference grid is rebuilt and rescaled at every squaring step
    (the integration runs at every iteration of the deformable stage).

    Args:
        velocity: ``(1, 3, D, H, W)`` with normalised (x, y, z) components (see :func:`identity_grid`).
        steps: Squaring steps; the field is divided by ``2 ** steps`` first.
        identity: The grid's :func:`identity_grid`, if already built.

    Returns:
        The displacement, same shape and units.
    """
    if identity is None:
        identity = identity_grid(tuple(velocity.shape[2:]), velocity.device)
    displacement = velocity / 2**steps
    for _ in range(steps):
        displacement = displacement + sample(displacement, identity + displacement.movedim(1, -1), "bilinear", "border")
    return displacement


def kji_voxel_to_normalized(shape_kji: tuple[int, ...]) -> np.ndarray:
    """3x3 matrix from (k, j, i) voxel components to normalised (x, y, z) = (i, j, k) components."""
    matrix = np.zeros((3, 3))
    for row, axis in enumerate((2, 1, 0)):
        matrix[row, axis] = 2.0 / max(shape_kji[axis] - 1, 1)
    return matrix


def gaussian_matrices(
    shape_kji: tuple[int, ...], sigma_kji: tuple[float, float, float], device: torch.device
) -> list[torch.Tensor | None]:
    """:func:`gaussian_smooth` of a grid of ``shape_kji`` as one ``(n, n)`` matrix per axis (``None``: axis skipped).

    For the small control grids smoothed at every iteration of the deformable stage, three matrix
    products (and three in the backward pass) replace dozens of shifted-slice operations whose
    fixed cost dominated on grids of a few thousand voxels.
    """
    matrices: list[torch.Tensor | None] = []
    for size, sigma in zip(shape_kji, sigma_kji):
        sigma = float(sigma)
        if sigma <= 0.05 or size < 2:
            matrices.append(None)
            continue
        radius = max(math.ceil(3.0 * sigma), 1)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        matrix = np.zeros((size, size))
        rows = np.arange(size)
        for offset, weight in zip(offsets, kernel):
            # Edge padding: taps beyond the grid read its first or last voxel.
            np.add.at(matrix, (rows, np.clip(rows + offset, 0, size - 1)), weight)
        matrices.append(torch.as_tensor(matrix, dtype=torch.float32, device=device))
    return matrices


def interpolation_matrices(
    source_shape_kji: tuple[int, ...], target_shape_kji: tuple[int, ...], target_box: tuple[slice, ...]
) -> list[torch.Tensor]:
    """Linear interpolation (``align_corners=True``) from one grid shape to a box of another, one matrix per axis.

    ``apply_along_axes(volume, matrices)`` equals
    ``F.interpolate(volume, size=target_shape_kji, mode="trilinear", align_corners=True)[..., *target_box]``
    but computes only the box, and as three dense matrix products it was three times faster on CPU
    than ``F.interpolate`` with its backward pass (the matrices are small: a control grid to an image box).
    """
    matrices = []
    for size_in, size_out, rows in zip(source_shape_kji, target_shape_kji, target_box):
        positions = np.arange(size_out)[rows] * ((size_in - 1) / max(size_out - 1, 1))
        lower = np.clip(np.floor(positions).astype(int), 0, max(size_in - 2, 0))
        fraction = positions - lower
        matrix = np.zeros((len(positions), size_in))
        matrix[np.arange(len(positions)), lower] = 1.0 - fraction
        if size_in > 1:
            matrix[np.arange(len(positions)), lower + 1] += fraction
        matrices.append(torch.as_tensor(matrix, dtype=torch.float32))
    return matrices


def apply_along_axes(volume: torch.Tensor, matrices: list[torch.Tensor | None]) -> torch.Tensor:
    """Multiply each spatial axis (k, j, i) of a ``(N, C, D, H, W)`` tensor by its matrix (``None``: unchanged)."""
    for axis, matrix in enumerate(matrices):
        if matrix is None:
            continue
        if axis == 2:
            volume = torch.matmul(volume, matrix.T)
        elif axis == 1:
            volume = torch.matmul(matrix, volume)
        else:
            volume = torch.matmul(matrix, volume.movedim(2, -2)).movedim(-2, 2)
    return volume


def resample_to_grid(
    volume: torch.Tensor, grid: Grid, target: Grid, factors: np.ndarray, smooth: bool = True
) -> torch.Tensor:
    """Move a ``(1, C, D, H, W)`` image from ``grid`` to its coarsened ``target`` grid.

    Smoothing with sigma = half the downsampling factor (in source voxels) before interpolation
    keeps coarse levels free of aliasing.
    """
    if tuple(volume.shape[2:]) == tuple(target.shape):
        return volume
    if smooth:
        sigma_kji = 0.5 * np.where(factors > 1, factors, 0.0)[::-1]
        volume = gaussian_smooth(volume, sigma_kji)
    return F.interpolate(volume, size=target.shape, mode="trilinear", align_corners=True)


def apply_matrix(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``points @ matrix[:3, :3].T + matrix[:3, 3]`` for (..., 3) points and a 4x4 (or 3x4) matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def rotation_matrix(rotation_vector: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of an axis-angle vector (radians), differentiable (Rodrigues' formula).

    ``R = I + a K + b K^2`` with ``a = sin(t)/t`` and ``b = (1 - cos(t))/t^2``; near ``t = 0`` their
    Taylor series keep value and gradient finite (the rigid stage starts at exactly zero).
    """
    zero = rotation_vector.new_zeros(())
    rx, ry, rz = rotation_vector
    skew = torch.stack(
        (
            torch.stack((zero, -rz, ry)),
            torch.stack((rz, zero, -rx)),
            torch.stack((-ry, rx, zero)),
        )
    )
    angle_squared = (rotation_vector * rotation_vector).sum()
    small = angle_squared < 1e-8
    safe_squared = torch.where(small, torch.ones_like(angle_squared), angle_squared)
    angle = safe_squared.sqrt()
    a = torch.where(small, 1.0 - angle_squared / 6.0, torch.sin(angle) / angle)
    b = torch.where(small, 0.5 - angle_squared / 24.0, (1.0 - torch.cos(angle)) / safe_squared)
    identity = torch.eye(3, dtype=rotation_vector.dtype, device=rotation_vector.device)
    return identity + a * skew + b * (skew @ skew)
