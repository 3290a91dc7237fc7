"""The registration engine against known answers, on a real MRI and on oblique anisotropic grids.

The MNI152 T1 template (shipped inside nilearn, no download) is the moving image; the fixed image is
that template sampled through a known mapping ``psi`` (fixed RAS point -> moving RAS point). The
engine's ``phi`` must then reproduce ``psi``: that is the error a user would measure. Everything is
checked with scipy's interpolation, independently of the engine's own warping code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepSegModuleLib.registration import (
    RegistrationCancelled,
    deformation_quality,
    get_preset,
    jacobian_determinant,
    register,
)
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

# One thread: the CI machine's two cores are shared, and OpenMP threads that spin-wait on a busy
# machine made these tests ten times slower with two threads than with one.
torch.set_num_threads(1)

FIXED_SPACING_MM = 3.0


# ----------------------------------------------------------------------------------------------
# Helpers (independent of the engine)


def rotation_xyz(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def voxel_centres_ras(shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """``(k, j, i, 3)`` RAS positions of a grid's voxel centres."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ ijk_to_ras.T)[..., :3]


def sample_at_ras(volume_kji: np.ndarray, ijk_to_ras: np.ndarray, points_ras: np.ndarray, order: int = 1) -> np.ndarray:
    """scipy interpolation of a (k, j, i) volume at RAS points (zero outside, like grid_sample's zeros)."""
    ijk = (points_ras - ijk_to_ras[:3, 3]) @ np.linalg.inv(ijk_to_ras[:3, :3]).T
    coordinates = np.stack([ijk[..., 2], ijk[..., 1], ijk[..., 0]])
    return ndimage.map_coordinates(volume_kji, coordinates, order=order, mode="grid-constant", cval=0.0)


def apply_4x4(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def rotation_angle_degrees(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))


@pytest.fixture(scope="module")
def mni() -> dict[str, np.ndarray]:
    """The MNI152 T1 at 2 mm with its brain mask, in Slicer's (k, j, i) order."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2)
    return {
        "image": np.asarray(template.get_fdata(), dtype=np.float32).transpose(2, 1, 0).copy(),
        "brain": (np.asarray(brain.get_fdata()) > 0.5).transpose(2, 1, 0).copy(),
        "ijk_to_ras": np.asarray(template.affine, dtype=np.float64),
    }


def fixed_grid_over(mni: dict[str, np.ndarray], spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned grid of ``spacing`` mm over the template's field of view."""
    extent = (np.array(mni["image"].shape[::-1]) - 1) * np.linalg.norm(mni["ijk_to_ras"][:3, :3], axis=0)
    sizes = (np.floor(extent / spacing) + 1).astype(int)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([spacing] * 3)
    ijk_to_ras[:3, 3] = mni["ijk_to_ras"][:3, 3]
    return tuple(int(n) for n in sizes[::-1]), ijk_to_ras  # type: ignore[return-value]


def make_known_case(mni: dict[str, np.ndarray], linear: np.ndarray, displacement_mm: float, seed: int) -> dict:
    """Fixed image = template sampled at ``psi(p) = linear @ (p + d_true(p))`` on a 3 mm grid."""
    shape, fixed_ijk_to_ras = fixed_grid_over(mni, FIXED_SPACING_MM)
    points = voxel_centres_ras(shape, fixed_ijk_to_ras)
    displacement = np.zeros(shape + (3,))
    if displacement_mm > 0:
        rng = np.random.default_rng(seed)
        coarse = rng.normal(size=(5, 5, 5, 3))
        zoom = np.array(shape) / 5.0
        displacement = np.stack(
            [ndimage.zoom(coarse[..., c], zoom, order=3)[: shape[0], : shape[1], : shape[2]] for c in range(3)],
            axis=-1,
        )
        displacement *= displacement_mm / np.linalg.norm(displacement, axis=-1).max()
    truth = apply_4x4(linear, points + displacement)
    fixed = sample_at_ras(mni["image"], mni["ijk_to_ras"], truth, order=3).astype(np.float32)
    fixed_brain = sample_at_ras(mni["brain"].astype(np.float32), mni["ijk_to_ras"], truth, order=0) > 0.5
    return {
        "fixed": fixed,
        "fixed_ijk_to_ras": fixed_ijk_to_ras,
        "points": points,
        "truth": truth,
        "brain": fixed_brain,
        "true_displacement": displacement,
    }


def brain_centre(mni: dict[str, np.ndarray]) -> np.ndarray:
    points = voxel_centres_ras(mni["brain"].shape, mni["ijk_to_ras"])
    return points[mni["brain"]].mean(axis=0)


def linear_about(centre: np.ndarray, matrix: np.ndarray, translation: np.ndarray) -> np.ndarray:
    transform = np.eye(4)
    transform[:3, :3] = matrix
    transform[:3, 3] = centre - matrix @ centre + translation
    return transform


# ----------------------------------------------------------------------------------------------
# Known answer on a real MRI: affine + smooth deformation


@pytest.fixture(scope="module")
def deformable_case(mni):
    centre = brain_centre(mni)
    linear = linear_about(
        centre, rotation_xyz((5.0, -4.0, 6.0)) @ np.diag([1.04, 0.97, 1.02]), np.array([4.0, -3.0, 5.0])
    )
    case = make_known_case(mni, linear, displacement_mm=8.0, seed=0)
    # Fiducials: 20 brain voxels of the fixed image and where they truly are in the moving image.
    rng = np.random.default_rng(1)
    chosen = rng.choice(np.count_nonzero(case["brain"]), size=20, replace=False)
    case["fixed_landmarks"] = case["points"][case["brain"]][chosen]
    case["moving_landmarks"] = case["truth"][case["brain"]][chosen]
    case["fixed_labels"] = case["brain"].astype(np.uint8)
    stages: list[str] = []
    case["result"] = register(
        case["fixed"],
        case["fixed_ijk_to_ras"],
        mni["image"],
        mni["ijk_to_ras"],
        "deformable fast",
        device="cpu",
        moving_labels=mni["brain"].astype(np.uint8),
        fixed_labels=case["fixed_labels"],
        fixed_landmarks_ras=case["fixed_landmarks"],
        moving_landmarks_ras=case["moving_landmarks"],
        progress=lambda stage, fraction: stages.append((stage, fraction)),
    )
    case["progress"] = stages
    return case


def test_affine_plus_smooth_deformation_of_a_real_mri_is_recovered_below_1mm(deformable_case):
    case, result = deformable_case, deformable_case["result"]
    brain = case["brain"]
    mapped = case["points"] + result.total_displacement_ras()
    error = np.linalg.norm(mapped - case["truth"], axis=-1)[brain]
    error_before = np.linalg.norm(case["points"] - case["truth"], axis=-1)[brain]
    linear_only = np.linalg.norm(apply_4x4(result.fixed_to_moving_ras, case["points"]) - case["truth"], axis=-1)[brain]
    assert np.median(error_before) > 5.0  # the task is not trivial
    assert np.median(linear_only) > 1.0  # the deformable stage has something to do
    assert np.median(error) < 1.0, f"median error {np.median(error):.2f} mm inside the brain"
    assert np.percentile(error, 95) < 2.0 * FIXED_SPACING_MM
    assert result.quality.folding_percent is not None and result.quality.folding_percent < 0.5
    assert result.quality.warnings == []


def test_documented_mapping_reproduces_the_resampled_image(deformable_case, mni):
    """phi(p) = A @ (p + d(p)); scipy sampling of the moving image there gives the engine's output."""
    case, result = deformable_case, deformable_case["result"]
    assert result.displacement_ras is not None
    assert result.displacement_ras.shape == case["fixed"].shape + (3,)
    assert result.displacement_ras.dtype == np.float32
    mapped = apply_4x4(result.fixed_to_moving_ras, case["points"] + result.displacement_ras)
    expected = sample_at_ras(mni["image"], mni["ijk_to_ras"], mapped, order=1)
    tolerance = 1e-3 * float(mni["image"].max())
    assert np.abs(expected - result.resampled_moving).max() < tolerance
    # The single-field form is the same mapping.
    np.testing.assert_allclose(case["points"] + result.total_displacement_ras(), mapped, atol=1e-3)
    # Point mapping (trilinear in the field) agrees at voxel centres and between them.
    some = case["points"][case["brain"]][::97]
    np.testing.assert_allclose(result.transform_points_ras(some), mapped[case["brain"]][::97], atol=1e-3)
    # Propagated labels are nearest-neighbour samples at the same points.
    expected_labels = sample_at_ras(mni["brain"].astype(np.float32), mni["ijk_to_ras"], mapped, order=0)
    assert np.mean(expected_labels.astype(np.uint8) != result.propagated_labels) < 1e-3


def test_inverse_from_negated_velocity_undoes_the_mapping(deformable_case):
    case, result = deformable_case, deformable_case["result"]
    brain = case["brain"]
    inverse_field = result.inverse_total_displacement_ras()
    assert inverse_field.shape == result.moving_shape + (3,)
    moving_points = apply_4x4(result.fixed_to_moving_ras, case["points"] + result.displacement_ras)[brain]
    back = moving_points + np.stack(
        [sample_at_ras(inverse_field[..., c], result.moving_ijk_to_ras, moving_points) for c in range(3)], axis=-1
    )
    round_trip = np.linalg.norm(back - case["points"][brain], axis=-1)
    assert np.median(round_trip) < 0.2 * FIXED_SPACING_MM
    assert np.percentile(round_trip, 99) < FIXED_SPACING_MM
    # The inverse of the deformable part alone composes to the identity as well.
    inverse_deformable = result.inverse_displacement_ras()
    assert inverse_deformable is not None and inverse_deformable.shape == result.displacement_ras.shape
    displaced = (case["points"] + result.displacement_ras)[brain]
    undone = displaced + np.stack(
        [sample_at_ras(inverse_deformable[..., c], result.fixed_ijk_to_ras, displaced) for c in range(3)], axis=-1
    )
    assert np.median(np.linalg.norm(undone - case["points"][brain], axis=-1)) < 0.2 * FIXED_SPACING_MM


def test_quality_report_has_dice_landmarks_runtime_and_memory(deformable_case, mni):
    case, result = deformable_case, deformable_case["result"]
    quality = result.quality
    # Dice of the brain propagated without registration (moving mask sampled at p itself) as the baseline.
    unregistered = sample_at_ras(mni["brain"].astype(np.float32), mni["ijk_to_ras"], case["points"], order=0) > 0.5
    baseline = 2 * np.sum(unregistered & case["brain"]) / (unregistered.sum() + case["brain"].sum())
    assert set(quality.dice) == {1}
    assert quality.dice[1] > 0.95 > baseline
    assert quality.landmark_error_mm["count"] == 20
    assert quality.landmark_error_mm["median"] < 1.5 < quality.landmark_error_mm["median_before"]
    assert quality.log_jacobian_std is not None and 0 < quality.log_jacobian_std < 0.5
    assert quality.quality_mask == "fixed foreground"
    assert quality.notes == []  # two brain-extracted images: no automatic mask
    determinant = result.jacobian_determinant()
    assert determinant.shape == case["fixed"].shape
    assert float(determinant.min()) <= quality.jacobian_min <= 1.0 <= quality.jacobian_max <= float(determinant.max())
    for stage in ("initial alignment", "rigid", "affine", "deformable", "resampling", "total"):
        assert quality.runtime_s[stage] >= 0
    # Levels end once converged: one count per pyramid level, none above its budget, fewer in all.
    config = result.config
    for stage, budget in (
        ("rigid", config.linear_iterations),
        ("affine", config.linear_iterations),
        ("deformable", config.deformable_iterations),
    ):
        assert len(quality.iterations[stage]) == len(budget)
        assert all(0 < ran <= allowed for ran, allowed in zip(quality.iterations[stage], budget))
        assert sum(quality.iterations[stage]) < sum(budget)
    assert quality.peak_memory_mb is not None and quality.peak_memory_mb > 0
    stages = [stage for stage, _ in case["progress"]]
    assert stages.index("rigid") < stages.index("affine") < stages.index("deformable")
    assert ("deformable", 1.0) in case["progress"]
    assert all(0.0 <= fraction <= 1.0 for _, fraction in case["progress"])


# ----------------------------------------------------------------------------------------------
# Rigid


@pytest.fixture(scope="module")
def rigid_case(mni):
    linear = linear_about(brain_centre(mni), rotation_xyz((6.0, -4.0, 5.0)), np.array([7.0, -5.0, 4.0]))
    case = make_known_case(mni, linear, displacement_mm=0.0, seed=0)
    case["linear"] = linear
    return case


def test_rigid_only_recovers_a_rigid_motion_within_half_a_mm_and_degree(rigid_case, mni):
    case = rigid_case
    result = register(case["fixed"], case["fixed_ijk_to_ras"], mni["image"], mni["ijk_to_ras"], "rigid", device="cpu")
    estimated = result.fixed_to_moving_ras
    assert result.displacement_ras is None
    error = np.linalg.norm(apply_4x4(estimated, case["points"]) - case["truth"], axis=-1)[case["brain"]]
    assert error.max() < 0.5, f"max error {error.max():.2f} mm in the brain"
    assert rotation_angle_degrees(estimated[:3, :3] @ case["linear"][:3, :3].T) < 0.5
    # A rigid result is a rotation: orthonormal, determinant +1.
    np.testing.assert_allclose(estimated[:3, :3] @ estimated[:3, :3].T, np.eye(3), atol=1e-5)


def test_multimodal_preset_registers_inverted_contrast_that_ncc_warns_about(rigid_case, mni):
    case = rigid_case
    # A "T2-like" moving image: contrast inverted inside the head, background kept dark.
    head = mni["image"] > 0.1 * mni["image"].max()
    inverted = np.where(head, mni["image"].max() - mni["image"], 0.0).astype(np.float32)
    calls = []

    def cancel_after_alignment() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.warns(UserWarning, match="multimodal"), pytest.raises(RegistrationCancelled):
        register(
            case["fixed"],
            case["fixed_ijk_to_ras"],
            inverted,
            mni["ijk_to_ras"],
            "rigid",
            device="cpu",
            cancel=cancel_after_alignment,
        )
    result = register(
        case["fixed"],
        case["fixed_ijk_to_ras"],
        inverted,
        mni["ijk_to_ras"],
        "multimodal",
        stages=("rigid",),
        device="cpu",
    )
    assert not any("modalit" in message for message in result.quality.warnings)
    error = np.linalg.norm(apply_4x4(result.fixed_to_moving_ras, case["points"]) - case["truth"], axis=-1)[
        case["brain"]
    ]
    assert np.median(error) < 1.0, f"median error {np.median(error):.2f} mm with mutual information"


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


def test_multimodal_preset_recovers_a_deformation_against_another_contrast(deformable_case, mni):
    """The known affine + 8 mm deformation, with the template in an inverted, non-linear contrast."""
    case = deformable_case
    head = mni["image"] > 0.1 * mni["image"].max()
    peak = float(mni["image"].max())
    other_contrast = np.where(head, (peak - mni["image"]) ** 1.5 / peak**0.5, 0.0).astype(np.float32)
    result = register(
        case["fixed"], case["fixed_ijk_to_ras"], other_contrast, mni["ijk_to_ras"], "multimodal", device="cpu"
    )
    brain = case["brain"]
    error = np.linalg.norm(case["points"] + result.total_displacement_ras() - case["truth"], axis=-1)[brain]
    linear_only = np.linalg.norm(apply_4x4(result.fixed_to_moving_ras, case["points"]) - case["truth"], axis=-1)[brain]
    assert np.median(linear_only) > 1.5  # the deformable stage has something to do
    assert np.median(error) < 1.0, f"median error {np.median(error):.2f} mm (linear {np.median(linear_only):.2f})"
    assert result.quality.folding_percent is not None and result.quality.folding_percent < 0.5


# ----------------------------------------------------------------------------------------------
# A brain-extracted template against a head with skull and scalp


@pytest.fixture(scope="module")
def head_case(mni):
    """The template's brain, moved by a known affine, inside a dark skull (5 mm) and bright scalp (7 mm).

    Zero outside the scalp, as many scanners and anonymisers leave the air: the head's signal is
    half as large again as the template's, which is empty outside the brain.
    """
    linear = linear_about(
        brain_centre(mni), rotation_xyz((4.0, -3.0, 5.0)) @ np.diag([1.05, 0.97, 1.03]), np.array([5.0, -4.0, 3.0])
    )
    case = make_known_case(mni, linear, displacement_mm=0.0, seed=0)
    outside = ndimage.distance_transform_edt(~case["brain"], sampling=FIXED_SPACING_MM)
    peak = float(mni["image"].max())
    head = np.where(case["brain"], case["fixed"], 0.0)
    head = np.where((outside > 0) & (outside <= 5), 0.05 * peak, head)
    case["head"] = np.where((outside > 5) & (outside <= 12), 0.8 * peak, head).astype(np.float32)
    return case


def test_a_brain_extracted_template_registers_to_a_head_with_skull(head_case, mni):
    """Only the template's signal is compared: the skull and scalp no longer pull its brain outwards."""
    case = head_case
    arguments = (case["head"], case["fixed_ijk_to_ras"], mni["image"], mni["ijk_to_ras"], "deformable fast")
    labels = {"moving_labels": mni["brain"].astype(np.uint8), "fixed_labels": case["brain"].astype(np.uint8)}
    result = register(*arguments, device="cpu", **labels)
    assert len(result.quality.notes) == 1 and "automatic moving mask" in result.quality.notes[0]
    assert result.quality.dice[1] > 0.93, result.quality.dice
    error = np.linalg.norm(apply_4x4(result.fixed_to_moving_ras, case["points"]) - case["truth"], axis=-1)
    assert np.median(error[case["brain"]]) < 1.5
    # What the mask prevents: unmasked, the brain is stretched over the scalp.
    unmasked = register(*arguments, device="cpu", automatic_masks=False, **labels)
    assert unmasked.quality.notes == []
    assert unmasked.quality.dice[1] < result.quality.dice[1] - 0.1
    # A mask of the user's own is used as given.
    given = register(*arguments, device="cpu", moving_mask=mni["image"] > 0.2 * mni["image"].max(), stages=("rigid",))
    assert given.quality.notes == []


def test_a_head_registers_to_a_brain_extracted_template_with_an_automatic_fixed_mask(head_case, mni):
    case = head_case
    result = register(
        mni["image"],
        mni["ijk_to_ras"],
        case["head"],
        case["fixed_ijk_to_ras"],
        "deformable fast",
        device="cpu",
        moving_labels=case["brain"].astype(np.uint8),
        fixed_labels=mni["brain"].astype(np.uint8),
    )
    assert len(result.quality.notes) == 1 and "automatic fixed mask" in result.quality.notes[0]
    assert result.quality.quality_mask == "fixed mask"
    # The head's brain comes from a 3 mm grid (0.82 without the mask).
    assert result.quality.dice[1] > 0.9, result.quality.dice


# ----------------------------------------------------------------------------------------------
# The template against a real head with skull (shared sample data, beside the repository)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def real_head() -> dict[str, np.ndarray]:
    """mr_brain_seg3d: a T1 head at 1 x 0.9 x 0.9 mm cropped close to the skull, and its brain mask.

    Its brain is smaller than the template's (a linear scale of about 0.9), which is what makes a
    sample set chosen through the transform pay: the template shrinks further onto the head's
    interior. Brain.nrrd orders its voxels differently from MR.nii.gz, so it is resampled onto the
    head in physical space.
    """
    folder = SHARED_DATA / "mr_brain_seg3d"
    if not (folder / "MR.nii.gz").exists():
        pytest.skip(f"{folder} is absent (shared sample data, not part of the repository)")
    import SimpleITK as sitk

    head = sitk.ReadImage(str(folder / "MR.nii.gz"))
    brain = sitk.Resample(
        sitk.ReadImage(str(folder / "Brain.nrrd")), head, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    direction = np.asarray(head.GetDirection()).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(head.GetSpacing())
    ijk_to_ras[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(head.GetOrigin())
    return {
        "image": sitk.GetArrayFromImage(head).astype(np.float32),
        "brain": sitk.GetArrayFromImage(brain) > 0,
        "ijk_to_ras": ijk_to_ras,
    }


def _template_to_head_affine(real_head, mni, **masks):
    """The affine preset from the template to the head; returns the result and the brain's Dice."""
    result = register(
        real_head["image"],
        real_head["ijk_to_ras"],
        mni["image"],
        mni["ijk_to_ras"],
        "affine",
        device="cpu",
        moving_labels=mni["brain"].astype(np.uint8),
        **masks,
    )
    propagated = result.propagated_labels > 0
    dice = 2 * (propagated & real_head["brain"]).sum() / (propagated.sum() + real_head["brain"].sum())
    return result, float(dice)


@pytest.mark.parametrize("mask", ["automatic", "template's brain mask"])
def test_the_affine_stage_maps_a_brain_extracted_template_onto_a_real_head(real_head, mni, mask):
    """With a mask on the template only, the linear stages sample the template inside it.

    Sampled on the head instead, the mask decides which head voxels count, and the affine shrank
    the template to about a third of its volume onto the head's interior (Dice 0.47 to 0.52).
    The two masks are different definitions of the brain (the template's includes the CSF up to
    the skull), so even a perfect alignment stays under Dice 1; ANTs' affine reaches 0.89 here.
    """
    result, dice = _template_to_head_affine(real_head, mni, moving_mask=mni["brain"] if mask != "automatic" else None)
    assert ("automatic moving mask" in " ".join(result.quality.notes)) == (mask == "automatic")
    assert dice > 0.88
    # The template's brain (1.88 l) becomes one of the head's size (Brain.nrrd: 1.47 l without CSF).
    volume_l = mni["brain"].sum() * 8e-6 / abs(np.linalg.det(result.fixed_to_moving_ras[:3, :3]))
    assert 1.2 < volume_l < 1.6, f"{volume_l:.2f} l"


def test_a_head_brain_mask_and_the_automatic_template_mask_are_compared_both_ways(real_head, mni):
    """The user's (generous) mask of the head's brain and the template's automatic mask: each mask
    would pick the other side's samples, so both directions count (0.72 with the head's mask alone)."""
    fixed_mask = ndimage.binary_dilation(real_head["brain"], iterations=3)
    result, dice = _template_to_head_affine(real_head, mni, fixed_mask=fixed_mask)
    assert len(result.quality.notes) == 1 and "automatic moving mask" in result.quality.notes[0]
    assert dice > 0.86


# ----------------------------------------------------------------------------------------------
# A small real T1 with a cropped field of view


@pytest.fixture(scope="module")
def small_t1() -> dict[str, np.ndarray]:
    """nibabel's test subject: a 33 x 41 x 25 T1 at 2 mm covering part of the brain, roughly in MNI space."""
    nibabel = pytest.importorskip("nibabel")
    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    image = nibabel.load(str(path))
    return {
        "image": np.asarray(image.get_fdata(), dtype=np.float32).transpose(2, 1, 0).copy(),
        "ijk_to_ras": np.asarray(image.affine, dtype=np.float64),
    }


def test_a_small_t1_registers_to_the_template_in_few_iterations_without_a_modality_warning(small_t1, mni):
    """Two T1 images whose centres of mass are 2 cm apart (a cropped field of view) are one modality.

    The rigid and affine levels stop once converged instead of running their budgets (an affine
    registration of this small volume once took half a minute), and the result matches the
    template better than the header alignment does.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = register(small_t1["image"], small_t1["ijk_to_ras"], mni["image"], mni["ijk_to_ras"], "affine")
    assert not [str(w.message) for w in caught if "modalit" in str(w.message)]
    assert result.quality.warnings == []
    config = result.config
    for stage in ("rigid", "affine"):
        ran = result.quality.iterations[stage]
        assert ran[0] <= config.linear_iterations[0] // 2, (stage, ran)
        assert sum(ran) <= 0.7 * sum(config.linear_iterations), (stage, ran)
    header_aligned = register(
        small_t1["image"],
        small_t1["ijk_to_ras"],
        mni["image"],
        mni["ijk_to_ras"],
        "rigid",
        initial_alignment="none",
        linear_iterations=(0, 0, 0),
    )
    subject = small_t1["image"]
    foreground = subject > 0.1 * subject.max()

    def correlation(resampled: np.ndarray) -> float:
        return float(np.corrcoef(subject[foreground], resampled[foreground])[0, 1])

    assert correlation(result.resampled_moving) > correlation(header_aligned.resampled_moving) + 0.03


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
            deformable_iterations=(5,),
        )
        assert torch.get_num_threads() == 2
    finally:
        original(threads)
    # One thread for each linear stage and deformable level, two again after each.
    assert counts == [1, 2] * 3, counts


def test_a_registration_imports_neither_monai_nor_torch_dynamo():
    """Importing either takes seconds, longer than registering a 2 mm brain; NCC presets need neither."""
    script = (
        "import sys, numpy as np\n"
        "from DeepSegModuleLib.registration import register\n"
        "rng = np.random.default_rng(0)\n"
        "image = np.zeros((24, 24, 24), np.float32); image[6:18, 5:19, 7:17] = 1\n"
        "image += 0.1 * rng.random(image.shape).astype(np.float32)\n"
        "register(image, np.eye(4), np.roll(image, 1, axis=0), np.eye(4), 'deformable fast', device='cpu',\n"
        "         linear_iterations=(5, 5), deformable_iterations=(5,))\n"
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


# ----------------------------------------------------------------------------------------------
# Oblique, anisotropic grids: the RAS conventions


def phantom(points_ras: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric object defined in RAS mm (so any grid can sample it exactly)."""
    blobs = [
        ((0.0, 0.0, 0.0), (14.0, 10.0, 8.0), 1.0),
        ((9.0, 6.0, -4.0), (4.0, 5.0, 3.0), 0.8),
        ((-8.0, 4.0, 6.0), (3.0, 3.0, 6.0), -0.6),
        ((2.0, -9.0, 3.0), (5.0, 2.5, 3.0), 0.7),
    ]
    value = np.zeros(points_ras.shape[:-1])
    for centre, widths, weight in blobs:
        offsets = (points_ras - np.array(centre)) / np.array(widths)
        value += weight * np.exp(-0.5 * np.sum(offsets**2, axis=-1))
    return value.astype(np.float32)


def oblique_grid(spacing, degrees, shape_kji, centre_ras) -> np.ndarray:
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation_xyz(degrees) @ np.diag(spacing)
    middle = (np.array(shape_kji[::-1]) - 1) / 2
    ijk_to_ras[:3, 3] = np.array(centre_ras) - ijk_to_ras[:3, :3] @ middle
    return ijk_to_ras


def test_translation_in_ras_mm_is_recovered_on_oblique_anisotropic_grids():
    translation = np.array([3.0, -2.0, 4.5])
    fixed_shape = (26, 52, 44)
    fixed_ijk_to_ras = oblique_grid((1.2, 1.0, 2.0), (20.0, -15.0, 30.0), fixed_shape, (30.0, -20.0, 10.0))
    moving_shape = (36, 40, 34)
    moving_ijk_to_ras = oblique_grid((1.5, 1.4, 1.6), (-10.0, 25.0, 5.0), moving_shape, (34.0, -22.0, 14.0))
    # The object sits at (30, -20, 10) in the fixed image and ``translation`` further in the moving one.
    fixed = phantom(voxel_centres_ras(fixed_shape, fixed_ijk_to_ras) - np.array([30.0, -20.0, 10.0]))
    moving = phantom(voxel_centres_ras(moving_shape, moving_ijk_to_ras) - np.array([30.0, -20.0, 10.0]) - translation)
    progress: list[tuple[str, float]] = []
    result = register(
        fixed,
        fixed_ijk_to_ras,
        moving,
        moving_ijk_to_ras,
        "rigid",
        device="cpu",
        initial_alignment="none",
        linear_spacings_mm=(4.0, 2.0, 1.0),
        progress=lambda s, f: progress.append((s, f)),
    )
    estimated = result.fixed_to_moving_ras
    np.testing.assert_allclose(estimated[:3, 3], translation, atol=0.1)
    assert rotation_angle_degrees(estimated[:3, :3]) < 0.2
    assert ("rigid", 1.0) in progress
    # The resampled moving image lies on the fixed grid and matches the fixed image.
    assert result.resampled_moving.shape == fixed_shape
    inside = fixed > 0.2
    difference = np.abs(result.resampled_moving - fixed)[inside]
    assert difference.mean() < 0.01 and difference.max() < 0.1


def test_masks_choose_which_object_drives_the_registration():
    """Two objects move differently; a fixed or moving mask around one of them recovers that object's motion."""
    centre_a, centre_b = np.array([-22.0, 0.0, 0.0]), np.array([22.0, 0.0, 0.0])
    shift_a, shift_b = np.array([2.0, 3.0, -1.5]), np.array([-3.0, -1.0, 2.5])

    def scene(points, offset_a, offset_b):
        # Shrunk so that the two objects' tails do not overlap.
        return phantom((points - centre_a - offset_a) / 0.6) + phantom((points - centre_b - offset_b)[..., ::-1] / 0.6)

    shape = (24, 30, 46)
    grid = oblique_grid((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), shape, (0.0, 0.0, 0.0))
    points = voxel_centres_ras(shape, grid)
    fixed = scene(points, 0.0, 0.0)
    moving = scene(points, shift_a, shift_b)
    near_a = np.linalg.norm(points - centre_a, axis=-1) < 18.0
    near_b_in_moving = np.linalg.norm(points - centre_b - shift_b, axis=-1) < 18.0
    common = {
        "device": "cpu",
        "initial_alignment": "none",
        "linear_spacings_mm": (4.0, 2.0),
        "linear_iterations": (150, 100),
    }
    by_fixed_mask = register(fixed, grid, moving, grid, "rigid", fixed_mask=near_a, **common)
    by_moving_mask = register(fixed, grid, moving, grid, "rigid", moving_mask=near_b_in_moving, **common)
    # Judge each result where its object is: the points of that object must move with it.
    object_a = points[np.linalg.norm(points - centre_a, axis=-1) < 10.0]
    object_b = points[np.linalg.norm(points - centre_b, axis=-1) < 10.0]
    error_a = np.linalg.norm(by_fixed_mask.transform_points_ras(object_a) - (object_a + shift_a), axis=-1)
    error_b = np.linalg.norm(by_moving_mask.transform_points_ras(object_b) - (object_b + shift_b), axis=-1)
    assert error_a.max() < 0.4 and error_b.max() < 0.4, (error_a.max(), error_b.max())
    # Without a mask neither object's motion is followed.
    unmasked = register(fixed, grid, moving, grid, "rigid", **common)
    assert np.linalg.norm(unmasked.transform_points_ras(object_a) - (object_a + shift_a), axis=-1).max() > 1.0


# ----------------------------------------------------------------------------------------------
# Folding is reported, not hidden; the TorchScript initialiser is used


class _FoldingInitializer(torch.nn.Module):
    """Returns a displacement that swings back and forth faster than the grid allows: it folds."""

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        depth = fixed.shape[2]
        k = torch.arange(depth, dtype=fixed.dtype).reshape(1, 1, depth, 1, 1)
        along_k = torch.zeros_like(fixed) + 4.0 * torch.sin(k * 3.14159265 / 4.0)
        return torch.cat([along_k, torch.zeros_like(along_k), torch.zeros_like(along_k)], dim=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script: users still ship TorchScript
def test_heavy_folding_is_reported_with_a_warning(rigid_case, mni):
    """A large velocity integrated in one step folds; the report says so. With scaling and squaring it does not."""
    case = rigid_case
    initializer = torch.jit.script(_FoldingInitializer())
    settings = {
        "initial_fixed_to_moving_ras": case["linear"],
        "stages": ("deformable",),
        "deformable_spacings_mm": (6.0,),
        "deformable_iterations": (0,),
        "velocity_grid_factor": 1.0,
        "velocity_smoothing_vox": 0.0,
        "initializer": initializer,
    }
    fixed, fixed_ijk_to_ras = case["fixed"], case["fixed_ijk_to_ras"]
    with pytest.warns(UserWarning, match="folds"):
        folded = register(
            fixed,
            fixed_ijk_to_ras,
            mni["image"],
            mni["ijk_to_ras"],
            "deformable fast",
            device="cpu",
            integration_steps=1,
            **settings,
        )
    assert folded.quality.folding_percent > 5.0
    assert folded.quality.jacobian_min < 0
    assert any("folds" in message for message in folded.quality.warnings)
    # Same number from the public function, on the returned field.
    direct = deformation_quality(folded.displacement_ras, folded.fixed_ijk_to_ras, fixed > 0.1 * fixed.max())
    assert direct["folding_percent"] > 5.0
    # The same velocity, integrated by scaling and squaring, stays invertible.
    diffeomorphic = register(
        fixed, fixed_ijk_to_ras, mni["image"], mni["ijk_to_ras"], "deformable fast", device="cpu", **settings
    )
    assert diffeomorphic.quality.folding_percent < 0.5


def test_jacobian_of_a_known_field_on_an_oblique_grid():
    ijk_to_ras = oblique_grid((1.2, 1.0, 2.0), (20.0, -15.0, 30.0), (10, 12, 14), (0.0, 0.0, 0.0))
    points = voxel_centres_ras((10, 12, 14), ijk_to_ras)
    # d(p) = (G - I) p has the constant Jacobian G whatever the grid's orientation.
    stretch = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 1.1]])
    determinant = jacobian_determinant((points @ (stretch - np.eye(3)).T).astype(np.float32), ijk_to_ras)
    np.testing.assert_allclose(determinant, np.linalg.det(stretch), rtol=1e-4)
    mirrored = np.diag([-1.0, 1.0, 1.0])
    assert deformation_quality(points @ (mirrored - np.eye(3)).T, ijk_to_ras)["folding_percent"] == 100.0


# ----------------------------------------------------------------------------------------------
# Bad input


def small_volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((16, 16, 16)).astype(np.float32)


def test_2d_input_is_refused_with_advice():
    with pytest.raises(ValueError, match="3D volume"):
        register(np.ones((64, 64), np.float32), np.eye(4), small_volume(), np.eye(4), "rigid")
    with pytest.raises(ValueError, match="3D volume"):
        register(np.ones((1, 64, 64), np.float32), np.eye(4), small_volume(), np.eye(4), "rigid")


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match="fixed_mask is empty"):
        register(small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", fixed_mask=np.zeros((16, 16, 16)))
    with pytest.raises(ValueError, match="moving_mask is empty"):
        register(
            small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", moving_mask=np.zeros((16, 16, 16), bool)
        )


def test_images_that_do_not_overlap_are_refused_unless_aligned_first():
    far_away = np.eye(4)
    far_away[:3, 3] = (500.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="do not overlap"):
        register(small_volume(), np.eye(4), small_volume(1), far_away, "rigid", initial_alignment="none")


def test_unknown_preset_and_parameter_are_refused():
    with pytest.raises(ValueError, match="unknown registration preset"):
        get_preset("syn")
    with pytest.raises(ValueError, match="unknown registration parameter"):
        get_preset("rigid", learning_rate=1.0)
    with pytest.raises(ValueError, match="stages"):
        get_preset("rigid", stages=("deformable", "rigid"))
    assert get_preset("Deformable_Fast", regularization_weight=3.0).regularization_weight == 3.0


def test_unusable_device_and_initial_transform_are_refused():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            register(small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", device="cuda")
    with pytest.raises(ValueError, match="invertible 4x4"):
        register(
            small_volume(), np.eye(4), small_volume(1), np.eye(4), "rigid", initial_fixed_to_moving_ras=np.zeros((4, 4))
        )
    with pytest.raises(ValueError, match="corresponding"):
        register(
            small_volume(),
            np.eye(4),
            small_volume(1),
            np.eye(4),
            "rigid",
            fixed_landmarks_ras=np.zeros((3, 3)),
            moving_landmarks_ras=np.zeros((4, 3)),
        )
