"""The registration engine end to end against known answers: an affine plus smooth deformation of a real MRI, rigid
motions, other contrasts, a brain-extracted template against a head, a cropped real T1, oblique anisotropic grids,
folding reported and the TorchScript initialiser used. Each case moves the MNI152 T1 through a known ``psi`` and
checks the engine's ``phi`` with scipy (see registration_cases.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepSegModuleLib.registration import RegistrationCancelled, deformation_quality, register
from scipy import ndimage
from registration_cases import (
    FIXED_SPACING_MM,
    apply_4x4,
    brain_centre,
    linear_about,
    make_known_case,
    oblique_grid,
    phantom,
    rotation_angle_degrees,
    rotation_xyz,
    sample_at_ras,
    voxel_centres_ras,
)


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
# Oblique, anisotropic grids: the RAS conventions


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


# ----------------------------------------------------------------------------------------------
# Two different people's heads with different fields of view (SynthSeg's real label maps, beside the repository)


@pytest.mark.slow
def test_two_heads_with_different_fields_of_view_are_not_squashed_onto_each_other():
    """Subject 10 (cropped at the chin) against subject 3 (with the neck), T1-like images synthesised from their
    label maps as the anatomy benchmark makes them (tuning subjects, not the held-out 17 to 20). Started from the
    centres of mass and comparing the air as well, the affine stage squashed one head onto the other (mean Dice
    over the brain's structures 0.044); the initial pose search and the fixed foreground give 0.55."""
    if not (SHARED_DATA / "brain_label_maps" / "training_seg_10.nii.gz").exists():
        pytest.skip("../shared/data/brain_label_maps is absent (shared sample data, not part of the repository)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_registration_anatomy import brain_structures, dice_scores, subject

    fixed, moving = subject(10, "t1"), subject(3, "t1")
    result = register(fixed[0], fixed[2], moving[0], moving[2], "affine", device="cpu")
    assert any("initial pose search" in note for note in result.quality.notes), result.quality.notes
    carried = result.resample(moving[1], interpolation="nearest")
    scores = dice_scores(fixed[1], carried, brain_structures())
    assert np.mean(list(scores.values())) > 0.5, scores
    # the scale of the affine stage stays that of a head (squashed, it was far below)
    assert 0.8 < abs(np.linalg.det(result.fixed_to_moving_ras[:3, :3])) ** (1 / 3) < 1.25
