"""The deformable stage: a stationary velocity field on a coarse control grid, integrated by scaling and squaring
(diffeomorphic), optimised by Adam level by level in the spirit of ConvexAdam, each level ending once its loss
settles (see :class:`~DeepSegModuleLib.registration.optimizers.Schedule`).

The velocity's components are in the u frame (see :class:`~DeepSegModuleLib.registration.geometry.NormalizedFrame`),
so it survives changes of level unchanged; for integration they are converted to the control grid's normalised
units, and for the regulariser to control-grid voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import (
    Grid,
    apply_along_axes,
    apply_matrix,
    gaussian_matrices,
    grid_points,
    identity_grid,
    integrate_velocity,
    interpolation_matrices,
    kji_voxel_to_normalized,
)
from .optimizers import Adam, Schedule
from .presets import RegistrationConfig
from .pyramid import Level, Pyramid, foreground_box, threads_for
from .similarity import (
    WeightedLocalNCCLoss,
    WeightedMutualInformationLoss,
    bending_energy,
    diffusion_energy,
    mind_ssc,
    weighted_descriptor_ssd,
)

# Iterations per convergence window, and the relative improvement per window below which a deformable level
# settles and ends (see Schedule).
_DEFORMABLE_WINDOW = 5
_DEFORMABLE_TOLERANCE = 5e-3


def optimise_deformable(
    pyramid: Pyramid, matrix_u: np.ndarray, translation_u: np.ndarray
) -> tuple[torch.Tensor, Grid, float]:
    """Stationary velocity field over the deformable pyramid, after the linear part ``u -> matrix_u u + translation_u``.

    The velocity lives on a *control grid* ``velocity_grid_factor`` times coarser than the level's image grid
    (integration is the costly part and the field is smooth anyway); the displacement is interpolated to the
    image grid to warp the moving image.

    Returns:
        The smoothed velocity (u-frame components) on the finest control grid, that grid, and the final similarity.
    """
    config = pyramid.config
    linear = torch.as_tensor(np.c_[matrix_u, translation_u], dtype=torch.float32, device=pyramid.device)
    progress = _Progress(pyramid, max(sum(config.deformable_iterations), 1))
    velocity: torch.Tensor | None = None
    loss_value = float("nan")
    pyramid.iterations["deformable"] = []
    for spacing, iterations in zip(config.deformable_spacings_mm, config.deformable_iterations):
        level = _LevelSetup.build(pyramid, pyramid.level(spacing), spacing, linear)
        if velocity is None:
            velocity = torch.zeros((1, 3, *level.control_grid.shape), device=pyramid.device)
            if config.initializer is not None:
                velocity = _initial_velocity(
                    pyramid, level.level, linear, level.to_normalized, level.points, level.control_grid
                )
        else:
            velocity = F.interpolate(
                velocity.detach(), size=level.control_grid.shape, mode="trilinear", align_corners=True
            )
        velocity.requires_grad_(True)
        ran, loss_value = _optimise_level(pyramid, level, velocity, iterations, progress)
        progress.done += iterations - ran
        pyramid.iterations["deformable"].append(ran)
    assert velocity is not None
    pyramid.report_progress("deformable", 1.0)
    with torch.no_grad():
        smoothed = apply_along_axes(velocity.detach(), level.smoothing)
    return smoothed, level.control_grid, loss_value


@dataclass
class _Progress:
    """Iterations done of the deformable stage's budget, for its progress fraction."""

    pyramid: Pyramid
    total: int
    done: int = 0

    def step(self, iteration: int) -> None:
        self.done += 1
        if iteration % 5 == 0:
            self.pyramid.report_progress("deformable", self.done / self.total)


@dataclass
class _LevelSetup:
    """What one deformable level computes once before its iterations: the control grid and the matrices between
    it, the u frame and the moving image, the box of the fixed image compared, and the samplers of the field."""

    level: Level
    control_grid: Grid
    to_normalized: torch.Tensor
    points: torch.Tensor
    u_to_voxel: torch.Tensor
    u_to_control: torch.Tensor
    control_to_moving: torch.Tensor
    identity: torch.Tensor
    fixed_box: torch.Tensor
    weight_box: torch.Tensor
    linear_box: torch.Tensor
    box_share: float
    upsample: list[torch.Tensor]
    half_sizes: torch.Tensor
    smoothing: list[torch.Tensor]

    @classmethod
    def build(cls, pyramid: Pyramid, level: Level, spacing: float, linear: torch.Tensor) -> _LevelSetup:
        config, device = pyramid.config, pyramid.device
        control_grid, _ = level.fixed_grid.coarsened(spacing * config.velocity_grid_factor, min_size=4)
        u_to_voxel, voxel_to_u = velocity_conversions(control_grid, pyramid.frame.scale, device)
        voxel_to_control = torch.as_tensor(kji_voxel_to_normalized(control_grid.shape), dtype=torch.float32, device=device)
        to_normalized = pyramid.u_to_normalized(level.moving_grid)
        # One matrix from displaced fixed points (u) to the moving image's sampling coordinates.
        linear_to_normalized = to_normalized[:3, :3] @ linear
        linear_to_normalized[:, 3] += to_normalized[:3, 3]
        with torch.no_grad():
            points = grid_points(level.fixed_grid, pyramid.frame.ras_to_u(), device)[None]
            # Where the linear part alone samples the moving image; the displacement adds to it.
            linear_normalized = apply_matrix(points, linear_to_normalized).contiguous()
        # Local NCC is zero where the fixed image is empty, and MIND constant: only the box around
        # its foreground (plus the window) is compared. Mutual information keeps the background,
        # which shapes its joint histogram.
        box = (
            foreground_box(level, config.lncc_kernel_size // 2 + 2)
            if config.deformable_similarity != "mi"
            else (slice(None),) * 3
        )
        descriptors = config.deformable_similarity == "mind"
        if descriptors and level.fixed_descriptor is None:
            with torch.no_grad():
                level.fixed_descriptor, level.moving_descriptor = mind_ssc(level.fixed), mind_ssc(level.moving)
        weight_box = level.fixed_weight[(Ellipsis, *box)]
        return cls(
            level=level,
            control_grid=control_grid,
            to_normalized=to_normalized,
            points=points,
            u_to_voxel=u_to_voxel,
            u_to_control=voxel_to_control @ u_to_voxel,
            # Control-grid normalised displacement -> moving sampling coordinates (the linear part's matrix).
            control_to_moving=linear_to_normalized[:, :3] @ voxel_to_u @ torch.linalg.inv(voxel_to_control),
            identity=identity_grid(control_grid.shape, device),
            fixed_box=(level.fixed_descriptor if descriptors else level.fixed)[(Ellipsis, *box)],
            weight_box=weight_box,
            linear_box=linear_normalized[(slice(None), *box)],
            # The mean over the box, rescaled to the mean over the whole grid (whose background adds
            # zeros): the balance with the regulariser stays what regularization_weight says.
            box_share=float(weight_box.sum() / level.fixed_weight.sum().clamp_min(1e-6)),
            upsample=[m.to(device) for m in interpolation_matrices(control_grid.shape, level.fixed_grid.shape, box)],
            half_sizes=torch.tensor([(n - 1) / 2 for n in control_grid.shape[::-1]], device=device).reshape(1, 3, 1, 1, 1),
            smoothing=gaussian_matrices(control_grid.shape, (config.velocity_smoothing_vox,) * 3, device),
        )


def _similarity(config: RegistrationConfig):
    if config.deformable_similarity == "mi":
        return WeightedMutualInformationLoss(config.mi_bins)
    if config.deformable_similarity == "mind":
        return weighted_descriptor_ssd
    return WeightedLocalNCCLoss(config.lncc_kernel_size)


def _optimise_level(
    pyramid: Pyramid, setup: _LevelSetup, velocity: torch.Tensor, iterations: int, progress: _Progress
) -> tuple[int, float]:
    """Adam on ``velocity`` (in place) for at most ``iterations``; returns the iterations run and the last
    similarity."""
    config = pyramid.config
    regularizer = bending_energy if config.regularization == "bending" else diffusion_energy
    similarity = _similarity(config)
    descriptors = config.deformable_similarity == "mind"
    base_rate = config.deformable_learning_rate_mm / pyramid.frame.scale
    schedule = Schedule(base_rate, iterations, 0.1, _DEFORMABLE_WINDOW, _DEFORMABLE_TOLERANCE)
    optimizer = Adam([velocity], lr=base_rate)
    ran, loss_value = 0, float("nan")
    # Per-iteration work of a few hundred thousand voxels: see threads_for.
    with threads_for(pyramid.device, setup.fixed_box.numel()):
        for iteration in range(iterations):
            optimizer.lr = schedule.rate(iteration)
            optimizer.zero_grad()
            smoothed = apply_along_axes(velocity, setup.smoothing)
            velocity_control = change_components(smoothed, setup.u_to_control)
            with torch.no_grad():
                displacement = integrate_velocity(
                    velocity_control, _squaring_steps(velocity_control, setup.half_sizes, config), setup.identity
                )
            # The derivative of exp(v) is taken as the identity, as log-domain demons do: the squaring steps
            # run without autograd (their backward pass cost as much as the rest of an iteration); docs/
            # registration.md has what that costs in accuracy.
            displacement = velocity_control + (displacement - velocity_control.detach())
            # Control and image grids share their corner voxel centres: linear interpolation
            # (align_corners) is exact in space.
            displacement = apply_along_axes(change_components(displacement, setup.control_to_moving), setup.upsample)
            normalized = setup.linear_box + displacement.movedim(1, -1)
            moving_values, inside = pyramid.sample_image(
                setup.level, "moving", normalized, "moving_descriptor" if descriptors else None
            )
            loss_similarity = setup.box_share * similarity(setup.fixed_box, moving_values, setup.weight_box * inside)
            loss = loss_similarity + config.regularization_weight * regularizer(
                change_components(smoothed, setup.u_to_voxel)
            )
            loss.backward()
            optimizer.step()
            loss_value = float(loss_similarity.detach())
            ran += 1
            progress.step(iteration)
            if schedule.converged(iteration, float(loss.detach())):
                break
    return ran, loss_value


def _initial_velocity(
    pyramid: Pyramid,
    level: Level,
    linear: torch.Tensor,
    to_normalized: torch.Tensor,
    points: torch.Tensor,
    control_grid: Grid,
) -> torch.Tensor:
    """Velocity seeded by the TorchScript initialiser (first order: exp(v) ~ id + v for small v)."""
    config = pyramid.config
    network = config.initializer
    if isinstance(network, (str, Path)):
        from DeepSegModuleLib.models.torchscript_check import load_checked_torchscript

        network = load_checked_torchscript(network, map_location=pyramid.device)
    network.eval()
    with torch.no_grad():
        moving_on_fixed, _ = pyramid.sample_image(level, "moving", apply_matrix(apply_matrix(points, linear), to_normalized))
        fixed_input, moving_input = level.fixed, moving_on_fixed
        if config.initializer_input_shape is not None:
            target = tuple(int(n) for n in config.initializer_input_shape)
            fixed_input = F.interpolate(fixed_input, size=target, mode="trilinear", align_corners=True)
            moving_input = F.interpolate(moving_input, size=target, mode="trilinear", align_corners=True)
        displacement = network(fixed_input, moving_input)
        if not isinstance(displacement, torch.Tensor) or displacement.ndim != 5 or displacement.shape[:2] != (1, 3):
            raise ValueError(
                "the initializer network must return a (1, 3, D, H, W) displacement tensor in voxels "
                f"(k, j, i channel order), got {getattr(displacement, 'shape', type(displacement))}"
            )
        # The network's voxels span the level grid's extent; express its output on the control grid.
        displacement = displacement.float().to(pyramid.device)
        network_shape = tuple(displacement.shape[2:])
        shape = tuple(control_grid.shape)
        if network_shape != shape:
            # Voxel units change with the grid: rescale each component by its axis' size ratio.
            ratio = torch.tensor(
                [(n - 1) / max(m - 1, 1) for n, m in zip(shape, network_shape)], device=pyramid.device
            ).reshape(1, 3, 1, 1, 1)
            displacement = F.interpolate(displacement.float(), size=shape, mode="trilinear", align_corners=True)
            displacement = displacement * ratio
        _, voxel_to_u = velocity_conversions(control_grid, pyramid.frame.scale, pyramid.device)
        return change_components(displacement, voxel_to_u)


def velocity_conversions(grid: Grid, frame_scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 matrices from u-frame components to voxel components in (k, j, i) order, and back."""
    ras_to_ijk = np.linalg.inv(grid.ijk_to_ras[:3, :3])
    u_to_kji = (ras_to_ijk * frame_scale)[::-1].copy()  # rows i, j, k -> k, j, i
    return (
        torch.as_tensor(u_to_kji, dtype=torch.float32, device=device),
        torch.as_tensor(np.linalg.inv(u_to_kji), dtype=torch.float32, device=device),
    )


def change_components(field: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the vector channel of a ``(N, 3, D, H, W)`` field."""
    # One (3, 3) x (3, voxels) product per batch item: einsum permuted and copied the field.
    return torch.matmul(matrix, field.reshape(field.shape[0], 3, -1)).reshape(field.shape)


def integrate_velocity_ras(velocity_ras: torch.Tensor, grid: Grid, steps: int) -> torch.Tensor:
    """exp(v) by scaling and squaring for a ``(1, 3, D, H, W)`` RAS-mm velocity; returns RAS-mm displacement."""
    ras_to_voxel, voxel_to_ras = velocity_conversions(grid, 1.0, velocity_ras.device)
    voxel_to_normalized = torch.as_tensor(
        kji_voxel_to_normalized(grid.shape), dtype=torch.float32, device=velocity_ras.device
    )
    with torch.no_grad():
        velocity = change_components(velocity_ras.float(), voxel_to_normalized @ ras_to_voxel)
        displacement = integrate_velocity(velocity, steps)
        return change_components(displacement, voxel_to_ras @ torch.linalg.inv(voxel_to_normalized))


def _squaring_steps(velocity: torch.Tensor, half_sizes: torch.Tensor, config: RegistrationConfig) -> int:
    """Squaring steps while optimising: enough that each scaled velocity stays under 1/8 control voxel.

    Adaptive scaling and squaring (Arsigny et al. 2006): a field that moves by a fraction of a
    voxel needs fewer squarings than ``config.integration_steps``, which the result itself uses; the
    two integrations agree to a small fraction of a millimetre (docs/registration.md), and small
    fields (the first iterations) cost one or two grid samplings instead of seven.
    """
    with torch.no_grad():
        in_voxels = velocity * half_sizes
        peak_voxels = math.sqrt(float((in_voxels * in_voxels).sum(dim=1).max()))
    needed = math.ceil(math.log2(max(peak_voxels * 8.0, 1.0)))
    return int(min(max(needed, 1), config.integration_steps))
