"""The registration engine's numerical building blocks against independent references: scaling and squaring against
MONAI's DVF2DDF, sampling against grid_sample, voxel centres, MIND descriptors, the Jacobian of a known field, the
thread setting and the imports a registration makes."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepSegModuleLib.registration import deformation_quality, jacobian_determinant, register
from DeepSegModuleLib.registration.geometry import (
    Grid,
    SliceStack,
    grid_points,
    integrate_velocity,
    kji_voxel_to_normalized,
    sample,
)
from DeepSegModuleLib.registration.similarity import mind_ssc
from scipy import ndimage
from registration_cases import (
    oblique_grid,
    voxel_centres_ras,
)


# ----------------------------------------------------------------------------------------------
# MIND descriptors


def test_mind_descriptors_ignore_scaled_shifted_and_negated_intensities(mni):
    """What makes MIND a multimodal measure: the same anatomy in another contrast gets the same descriptor."""
    image = torch.as_tensor(mni["image"][::2, ::2, ::2].copy())[None, None]
    descriptor = mind_ssc(image)
    assert descriptor.shape == (1, 12, *image.shape[2:])
    assert torch.allclose(mind_ssc(5.0 - 3.0 * image), descriptor, atol=1e-4)
    # ... while a different anatomy (the image shifted by two voxels) gets a different one.
    moved = torch.roll(image, 2, dims=2)
    brain = torch.as_tensor(mni["brain"][::2, ::2, ::2].copy())[None, None]
    assert float(((mind_ssc(moved) - descriptor) ** 2)[brain.expand_as(descriptor)].mean()) > 0.01


# ----------------------------------------------------------------------------------------------
# Numerical building blocks


def test_scaling_and_squaring_matches_monai_dvf2ddf():
    """exp(v) in grid_sample units is MONAI's DVF2DDF (voxel units, border padding), the documented model."""
    from monai.networks.blocks import DVF2DDF

    # A smooth field of a few voxels on a 9 x 12 x 10 grid, (k, j, i) voxel components.
    shape = (9, 12, 10)
    coarse = np.random.default_rng(0).normal(size=(3, 3, 4, 4))
    velocity_voxels = torch.as_tensor(
        np.stack(
            [
                ndimage.zoom(coarse[c], np.array(shape) / np.array(coarse.shape[1:]), order=1)[:9, :12, :10]
                for c in range(3)
            ]
        )
        * 2.0
    )[None].float()
    assert tuple(velocity_voxels.shape[2:]) == shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI notes that it falls back to torch's grid_sample
        expected = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(velocity_voxels)
    to_normalized = torch.as_tensor(kji_voxel_to_normalized(shape), dtype=torch.float32)
    velocity = torch.einsum("ab,nbdhw->nadhw", to_normalized, velocity_voxels)
    displacement = torch.einsum("ab,nbdhw->nadhw", torch.linalg.inv(to_normalized), integrate_velocity(velocity, 7))
    assert float(expected.abs().max()) > 1.0  # a displacement of voxels, not a trivial one
    np.testing.assert_allclose(displacement.numpy(), expected.numpy(), atol=1e-4)


def test_sampling_split_across_threads_matches_grid_sample():
    """With several threads the points are split into batch items; values and gradients stay grid_sample's."""
    # Too many slices for a slice stack: the 3D kernel, split across threads, samples it.
    volume = torch.rand(1, 2, 300, 120, 4)
    assert not SliceStack.suits(volume)
    points = (torch.rand(1, 30, 40, 41, 3) * 2.2 - 1.1).requires_grad_(True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = sample(volume, points)
        (split_gradient,) = torch.autograd.grad((split * split).sum(), points)
    finally:
        torch.set_num_threads(threads)
    expected = torch.nn.functional.grid_sample(
        volume, points, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    (expected_gradient,) = torch.autograd.grad((expected * expected).sum(), points)
    assert split.shape == expected.shape
    torch.testing.assert_close(split, expected)
    torch.testing.assert_close(split_gradient, expected_gradient)


@pytest.mark.parametrize("shape", [(11, 13, 12), (1, 7, 9), (6, 1, 5), (5, 4, 1)])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_slice_stack_samples_as_grid_sample(shape, padding_mode):
    """The 2D sampler on stacked slices gives grid_sample's trilinear values and point gradients, and its nearest values."""
    generator = torch.Generator().manual_seed(1)
    volume = torch.rand(1, 2, *shape, generator=generator, dtype=torch.float64)
    # Points well beyond every edge too, where zeros padding must not reach into a neighbouring slice.
    points = (torch.rand(1, 9, 10, 11, 3, generator=generator, dtype=torch.float64) * 3.0 - 1.5).requires_grad_(True)
    stack = SliceStack(volume)
    values = sample(stack, points, padding_mode=padding_mode)
    (gradient,) = torch.autograd.grad((values * values).sum(), points)
    expected = torch.nn.functional.grid_sample(volume, points, padding_mode=padding_mode, align_corners=True)
    (expected_gradient,) = torch.autograd.grad((expected * expected).sum(), points)
    assert values.shape == expected.shape
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(gradient, expected_gradient)

    labels = torch.randint(0, 4, (1, 1, *shape), generator=generator).double()
    with torch.no_grad():
        nearest = sample(SliceStack(labels), points, mode="nearest")
        expected_nearest = torch.nn.functional.grid_sample(labels, points, mode="nearest", align_corners=True)
    assert torch.equal(nearest, expected_nearest)


def test_grid_points_are_the_voxel_centres_in_the_frame():
    grid = Grid(
        (5, 6, 7), np.array([[0.9, 0.1, 0.0, 3.0], [0.0, 1.1, 0.2, -4.0], [0.1, 0.0, 2.0, 5.0], [0, 0, 0, 1.0]])
    )
    to_frame = np.diag([0.5, 2.0, 1.0, 1.0])
    to_frame[:3, 3] = [1.0, -2.0, 0.5]
    k, j, i = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")
    expected = (np.stack([i, j, k, np.ones_like(i)], axis=-1) @ (to_frame @ grid.ijk_to_ras).T)[..., :3]
    np.testing.assert_allclose(grid_points(grid, to_frame, torch.device("cpu")).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(
        grid_points(grid, to_frame, torch.device("cpu"), (2, 4)).numpy(), expected[2:4], atol=1e-5
    )


def test_small_optimisation_loops_run_on_one_thread_and_the_setting_comes_back(monkeypatch):
    """Loops over small tensors run single-threaded (thread wake-ups cost more than they save); the caller's count returns."""
    rng = np.random.default_rng(0)
    image = np.zeros((24, 24, 24), np.float32)
    image[6:18, 5:19, 7:17] = 1
    image += 0.1 * rng.random(image.shape).astype(np.float32)
    counts = []
    original = torch.set_num_threads
    threads = torch.get_num_threads()
    try:
        original(2)
        monkeypatch.setattr(torch, "set_num_threads", lambda n: (counts.append(n), original(n))[1])
        register(
            image,
            np.eye(4),
            np.roll(image, 1, axis=0),
            np.eye(4),
            "deformable fast",
            device="cpu",
            linear_iterations=(5, 5),
            deformable_iterations=(5, 5),
        )
        assert torch.get_num_threads() == 2
    finally:
        original(threads)
    # One thread for each linear stage and deformable level, two again after each.
    assert counts == [1, 2] * 4, counts  # rigid, affine and the two deformable levels


def test_a_registration_imports_neither_monai_nor_torch_dynamo():
    """Importing either takes seconds, longer than registering a 2 mm brain; NCC presets need neither."""
    script = (
        "import sys, numpy as np\n"
        "from DeepSegModuleLib.registration import register\n"
        "rng = np.random.default_rng(0)\n"
        "image = np.zeros((24, 24, 24), np.float32); image[6:18, 5:19, 7:17] = 1\n"
        "image += 0.1 * rng.random(image.shape).astype(np.float32)\n"
        "register(image, np.eye(4), np.roll(image, 1, axis=0), np.eye(4), 'deformable fast', device='cpu',\n"
        "         linear_iterations=(5, 5), deformable_iterations=(5, 5))\n"
        "print(sorted(m for m in ('monai', 'torch._dynamo') if m in sys.modules))\n"
    )
    library = Path(__file__).resolve().parents[2] / "DeepSegModule"
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=library,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.stdout.strip().splitlines()[-1] == "[]", completed.stdout + completed.stderr


def test_jacobian_of_a_known_field_on_an_oblique_grid():
    ijk_to_ras = oblique_grid((1.2, 1.0, 2.0), (20.0, -15.0, 30.0), (10, 12, 14), (0.0, 0.0, 0.0))
    points = voxel_centres_ras((10, 12, 14), ijk_to_ras)
    # d(p) = (G - I) p has the constant Jacobian G whatever the grid's orientation.
    stretch = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 1.1]])
    determinant = jacobian_determinant((points @ (stretch - np.eye(3)).T).astype(np.float32), ijk_to_ras)
    np.testing.assert_allclose(determinant, np.linalg.det(stretch), rtol=1e-4)
    mirrored = np.diag([-1.0, 1.0, 1.0])
    assert deformation_quality(points @ (mirrored - np.eye(3)).T, ijk_to_ras)["folding_percent"] == 100.0
