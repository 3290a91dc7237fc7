"""DICOM in and DICOM SEG out, as a user runs them: a series folder (or a study) in, a SEG that references the very
images it segments out, read back with highdicom; geometry checked against SimpleITK's reader and against the
positions the images were written at."""

from __future__ import annotations

import json
import shutil

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_helpers import (
    ENHANCED_CT_IMAGE_STORAGE,
    REAL_SERIES,
    ball_field,
    linear_field,
    read_pixels,
    rotation,
    voxel_points_lps,
    write_series,
)
from segmentation_helpers import Thresholder, dice, write_torchscript_model

from DeepSegModuleLib import cli, dicom_series, nodes, storage
from DeepSegModuleLib.context import SceneContext
from DeepSegModuleLib.dicom_series import AmbiguousSeries, DicomError, SeriesChoice

THRESHOLD = 300.0
needs_real_series = pytest.mark.skipif(not REAL_SERIES.is_dir(), reason="../shared/data/ct_dicom_series is absent")


def run(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bone_model(tmp_path_factory):
    """Labels voxels over 300 HU as "Bone" on the input's own grid (no resampling), so that every SEG frame can be
    compared with the threshold of the image it references."""
    card = {"name": "Bone threshold", "version": "2.1", "spacing": None, "patch_size": [64, 64, 16],
            "labels": [{"value": 1, "name": "Bone", "color": [0.95, 0.9, 0.8],
                        "terminology": {"category": "SCT^123037004^Anatomical Structure",
                                        "type": "SCT^272673000^Bone"}}]}  # fmt: skip
    return write_torchscript_model(tmp_path_factory.mktemp("bone") / "bone", Thresholder(THRESHOLD), card).parent


def frames_by_source(seg) -> dict[str, np.ndarray]:
    """SEG frame pixels by the SOP Instance UID of the image each references (segment numbers for LABELMAP, or
    the segment number where a BINARY frame is set)."""
    pixels = seg.pixel_array
    frames: dict[str, np.ndarray] = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        if seg.SegmentationType == "LABELMAP":
            frames[uid] = pixels[index]
        else:  # with one segment, highdicom puts its number in the shared functional groups
            where = item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
            number = int(where.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            frames.setdefault(uid, np.zeros(pixels.shape[1:], np.uint8))
            frames[uid][pixels[index] > 0] = number
    return frames


# ------------------------------------------------------------------------------------------------ the real series


@needs_real_series
def test_the_real_series_reads_voxel_for_voxel_as_simpleitk_reads_it():
    series = dicom_series.read(dicom_series.find_series(REAL_SERIES))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(REAL_SERIES)))
    reference, reference_grid = nodes.sitk_to_array(reader.Execute())
    assert series.array.shape == (20, 512, 512) and not series.notes
    np.testing.assert_array_equal(series.array, reference)
    np.testing.assert_allclose(series.ijk_to_ras, reference_grid, atol=1e-4)


@needs_real_series
@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["labelmap", "binary"])
def test_a_seg_of_the_real_series_references_each_image_and_reads_back_with_highdicom(
    tmp_path, capsys, bone_model, encoding
):
    # The real series is anonymised (empty Study, Series and SOP Instance UIDs in the datasets).
    output = tmp_path / "bone.dcm"
    code, out, err = run(capsys, "segment", "-m", bone_model, "-i", REAL_SERIES, "-o", output, "--device", "cpu",
                         "--seg-encoding", encoding, "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["dicom_series"][0]["images"] == 20

    seg = hd.seg.segread(output)
    assert seg.SegmentationType == encoding.upper()
    frames = frames_by_source(seg)
    sources = {pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID: path for path in REAL_SERIES.iterdir()}
    assert set(frames) <= set(sources)
    if encoding == "labelmap":
        assert set(frames) == set(sources)  # one frame per image, empty ones included
    for uid, path in sources.items():
        expected = (read_pixels(path) > THRESHOLD).astype(np.uint8)
        np.testing.assert_array_equal(frames.get(uid, np.zeros_like(expected)), expected, err_msg=path.name)

    segment = seg.get_segment_description(1)
    assert segment.segment_label == "Bone"
    assert (segment.segmented_property_type.value, segment.segmented_property_type.scheme_designator) == ("272673000", "SCT")
    assert segment.segmented_property_category.value == "123037004"
    algorithm = segment.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("Bone threshold", "2.1")
    red, green, blue = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
    np.testing.assert_allclose([red, green, blue], [0.95 * 255, 0.9 * 255, 0.8 * 255], atol=2)
    # Stable derived UIDs: the same study on every run, and the SEG's own series is new.
    again = tmp_path / "again.dcm"
    assert run(capsys, "segment", "-m", bone_model, "-i", REAL_SERIES, "-o", again, "--device", "cpu")[0] == 0
    second = hd.seg.segread(again)
    assert second.StudyInstanceUID == seg.StudyInstanceUID and seg.StudyInstanceUID.startswith("2.25.")
    assert second.SeriesInstanceUID != seg.SeriesInstanceUID

    # highdicom's volume geometry of the SEG is the series' own.
    series = dicom_series.read(dicom_series.find_series(REAL_SERIES))
    volume = seg.get_volume(combine_segments=encoding == "labelmap")
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ series.ijk_to_ras
    assert volume.spatial_shape == (20, 512, 512)
    # highdicom orders the slices from the top down, DeepSeg (as ITK) from the bottom up: the same grid of points.
    corners = [np.array([i, j, k, 1.0]) for i in (0, 511) for j in (0, 511) for k in (0, 19)]
    theirs = sorted(tuple(np.round(volume.affine @ c[[2, 1, 0, 3]], 3)) for c in corners)
    ours = sorted(tuple(np.round(ijk_to_lps @ c, 3)) for c in corners)
    np.testing.assert_allclose(theirs, ours, atol=2e-3)


# ------------------------------------------------------------------------------------------------ geometry


def test_an_oblique_series_reads_as_simpleitk_reads_it(tmp_path):
    turn = rotation(2, 20.0) @ rotation(0, 15.0)
    write_series(tmp_path / "oblique", linear_field(), row_direction=turn[:, 0], column_direction=turn[:, 1],
                 slice_step=tuple(2.0 * turn[:, 2]))  # fmt: skip
    series = dicom_series.read(dicom_series.find_series(tmp_path / "oblique"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "oblique")))
    reference, grid = nodes.sitk_to_array(reader.Execute())
    assert not series.notes
    np.testing.assert_array_equal(series.array, reference)
    np.testing.assert_allclose(series.ijk_to_ras, grid, atol=1e-4)
    # and each voxel holds the value of the field where the voxel is
    expected = linear_field()(voxel_points_lps(series.ijk_to_ras, series.array.shape).reshape(-1, 3))
    np.testing.assert_allclose(series.array.reshape(-1), expected, atol=1.0)


def test_a_gantry_tilted_series_is_resampled_onto_a_regular_grid_and_says_so(tmp_path):
    tilt = np.radians(15.0)
    step = (0.0, 2.0 * np.tan(tilt), 2.0)  # each image 2 mm further along S and shifted along P: a 15 degree tilt
    files = write_series(tmp_path / "tilted", linear_field(), slice_step=step)
    series = dicom_series.read(dicom_series.find_series(tmp_path / "tilted"))
    assert any("tilted (15.0 degrees" in note for note in series.notes)
    directions = series.ijk_to_ras[:3, :3] / np.linalg.norm(series.ijk_to_ras[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-9)  # a regular, orthogonal grid
    points = voxel_points_lps(series.ijk_to_ras, series.array.shape)
    expected = linear_field()(points.reshape(-1, 3)).reshape(series.array.shape)
    # Inside the part every image covers, the linear field is reproduced within 1 HU.
    shift_rows = int(np.ceil(len(files) * 2.0 * np.tan(tilt) / 1.5)) + 1
    inside = (slice(None), slice(shift_rows, 40), slice(None))  # images move towards P, rows j along P
    assert np.abs(series.array[inside] - expected[inside]).max() <= 1.0

    # Labels on the regular grid go back onto each tilted image where the image really is.
    ball = ball_field((0.0, 0.0, 0.0), 8.0)
    labels = (ball(points.reshape(-1, 3)).reshape(series.array.shape) > 0).astype(np.uint8)
    frames = series.on_source_images(labels)
    for frame, path in zip(frames, files, strict=True):
        dataset = pydicom.dcmread(path)
        j, i = np.mgrid[0:40, 0:48]
        origin = np.array(dataset.ImagePositionPatient, float)
        where = origin + i[..., None] * 1.25 * np.array([1, 0, 0]) + j[..., None] * 1.5 * np.array([0, 1, 0])
        truth = ball(where.reshape(-1, 3)).reshape(40, 48) > 0
        # nearest-neighbour labels move by at most half a voxel: only the rim may differ
        if truth.sum() >= 20:
            assert dice(frame.astype(bool), truth) > 0.8, path.name
            np.testing.assert_allclose(np.argwhere(frame).mean(axis=0), np.argwhere(truth).mean(axis=0), atol=0.75)
        else:
            assert frame.sum() <= truth.sum() + 12


def test_a_missing_image_is_interpolated_on_a_regular_grid_and_said(tmp_path):
    positions = [np.array([-30.0, -25.0, -20.0 + 2.0 * k]) for k in range(20) if k != 9]
    write_series(tmp_path / "gap", linear_field(), positions=positions)
    series = dicom_series.read(dicom_series.find_series(tmp_path / "gap"))
    assert series.array.shape[0] == 20 and any("uneven slice spacing" in note for note in series.notes)
    assert np.linalg.norm(series.ijk_to_ras[:3, 2]) == pytest.approx(2.0)
    expected = linear_field()(voxel_points_lps(series.ijk_to_ras, series.array.shape).reshape(-1, 3))
    assert np.abs(series.array.reshape(-1) - expected).max() <= 1.0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("shared positions", "share a position"),
        ("mixed orientations", "mixes image orientations"),
        ("one image", "has one image"),
        ("multi-frame", "multi-frame"),
        ("colour", "colour"),
        ("big gap", "images are missing"),
    ],
)
def test_an_ambiguous_series_is_refused_with_the_reason(tmp_path, case, message):
    folder = tmp_path / "series"
    field = linear_field()
    if case == "shared positions":  # two phases of one scan in one series
        positions = [np.array([0.0, 0.0, 2.0 * k]) for k in range(6)] * 2
        write_series(folder, field, positions=positions)
    elif case == "mixed orientations":
        write_series(folder, field, slices=5)
        turn = rotation(2, 30.0)
        write_series(folder / "more", field, slices=5, row_direction=turn[:, 0], column_direction=turn[:, 1],
                     series_uid=pydicom.dcmread(next(folder.glob("IM*"))).SeriesInstanceUID)  # fmt: skip
    elif case == "one image":
        write_series(folder, field, slices=1)
    elif case == "multi-frame":
        write_series(folder, field, slices=3, sop_class=ENHANCED_CT_IMAGE_STORAGE,
                     extra=lambda dataset, k: setattr(dataset, "NumberOfFrames", 1))  # fmt: skip
    elif case == "colour":
        write_series(folder, field, slices=3, extra=lambda dataset, k: setattr(dataset, "SamplesPerPixel", 3))
    else:
        write_series(folder, field, positions=[np.array([0.0, 0.0, z]) for z in (0, 2, 4, 6, 30, 32)])
    with pytest.raises(DicomError, match=message):
        dicom_series.read(dicom_series.find_series(folder))


def test_files_that_are_not_dicom_are_skipped_and_links_are_not_followed(tmp_path):
    folder = tmp_path / "series"
    write_series(folder, linear_field(), slices=4)
    (folder / "notes.txt").write_text("not an image")
    (folder / "DICOMDIR").write_bytes(b"\0" * 200)
    elsewhere = tmp_path / "elsewhere"
    write_series(elsewhere, linear_field(), slices=4, description="another")
    (folder / "link").symlink_to(next(elsewhere.glob("IM*")))
    found = dicom_series.scan(folder)
    assert [len(s.files) for s in found.series] == [4] and found.skipped == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(DicomError, match="holds no DICOM image series"):
        dicom_series.scan(empty)


def test_a_scan_opens_no_more_files_than_the_limit(tmp_path, monkeypatch):
    write_series(tmp_path / "series", linear_field(), slices=8)
    monkeypatch.setenv("DEEPSEG_MAX_DICOM_FILES", "5")
    with pytest.raises(ValueError, match="DEEPSEG_MAX_DICOM_FILES"):
        dicom_series.scan(tmp_path / "series")


# ------------------------------------------------------------------------------------------------ a study


@pytest.fixture
def study(tmp_path):
    """A study folder with two CT series (different descriptions) and a bone ball in both."""
    ball = ball_field((0.0, 4.0, -2.0), 9.0, inside=600.0, outside=0.0)
    uids = []
    for name in ("arterial", "venous"):
        files = write_series(tmp_path / "study" / name, ball, slices=16, origin=(-30.0, -25.0, -16.0),
                             description=f"CT {name}", study_uid="1.2.3.4")  # fmt: skip
        uids.append(str(pydicom.dcmread(files[0]).SeriesInstanceUID))
    return tmp_path / "study", uids


def test_a_study_with_two_series_is_listed_and_one_is_chosen(tmp_path, capsys, study, bone_model):
    folder, (arterial, venous) = study
    out_file = tmp_path / "bone.dcm"
    code, out, err = run(capsys, "segment", "-m", bone_model, "-i", folder, "-o", out_file, "--device", "cpu")
    assert code == 1 and not out_file.exists()
    lines = err.strip().splitlines()
    assert lines[0].startswith("deepseg: error:") and "holds 2 series" in lines[0] and "--series" in lines[0]
    assert any(arterial in line and "CT arterial" in line for line in lines[1:])
    assert any(venous in line and "16 images" in line for line in lines[1:])

    code, out, _ = run(capsys, "segment", "-m", bone_model, "-i", folder, "-o", out_file, "--json")
    choices = json.loads(out)["choices"]
    assert {c["series_uid"] for c in choices} == {arterial, venous} and all(c["images"] == 16 for c in choices)

    code, out, err = run(capsys, "segment", "-m", bone_model, "-i", folder, "-o", out_file, "--device", "cpu",
                         "--series", venous, "--json")  # fmt: skip
    assert code == 0, err
    seg = hd.seg.segread(out_file)
    referenced = {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSeriesInstanceUID
                  if "ReferencedSeriesInstanceUID" in item.DerivationImageSequence[0].SourceImageSequence[0] else None
                  for item in seg.PerFrameFunctionalGroupsSequence}  # fmt: skip
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == venous, referenced
    assert json.loads(out)["segments_ml"]["Bone"] == pytest.approx(4 / 3 * np.pi * 9.0**3 / 1000, rel=0.2)

    assert dicom_series.find_series(folder, SeriesChoice(description="arterial")).uid == arterial
    with pytest.raises(AmbiguousSeries):
        dicom_series.find_series(folder, SeriesChoice(modality="CT"))
    with pytest.raises(DicomError, match="no series .* matches"):
        dicom_series.find_series(folder, SeriesChoice(modality="MR"))


def test_a_label_map_and_a_seg_nrrd_of_a_series_are_on_its_grid_with_terminology(tmp_path, capsys, study, bone_model):
    folder, (arterial, _) = study
    code, _, err = run(capsys, "segment", "-m", bone_model, "-i", folder / "arterial", "-o", tmp_path / "bone.nii.gz",
                       "--device", "cpu")  # fmt: skip
    assert code == 0, err
    series = dicom_series.read(dicom_series.find_series(folder / "arterial"))
    written = nibabel.load(str(tmp_path / "bone.nii.gz"))
    labels = np.asarray(written.dataobj).transpose(2, 1, 0)
    np.testing.assert_allclose(written.affine, series.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(labels, (series.array > THRESHOLD).astype(np.uint8))

    # The segmentation node carries what Slicer's own DICOM SEG export needs: terminology and the reference grid.
    code, _, err = run(capsys, "segment", "-m", bone_model, "-i", folder / "arterial", "-o", tmp_path / "b.seg.nrrd",
                       "--device", "cpu")  # fmt: skip
    assert code == 0, err
    context = SceneContext.headless()
    node = storage.load_segmentation(context, tmp_path / "b.seg.nrrd")
    segmentation = node.GetSegmentation()
    segment = segmentation.GetNthSegment(0)
    assert "SCT^272673000^Bone" in segment.GetTerminology()
    import slicer

    geometry = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    assert geometry and len(geometry.split(";")) >= 16


def test_probabilities_go_to_a_fractional_seg(tmp_path, capsys, study, bone_model):
    folder, _ = study
    code, out, err = run(capsys, "segment", "-m", bone_model, "-i", folder / "venous", "-o", tmp_path / "l.dcm",
                         "--probabilities", tmp_path / "p.dcm", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    seg = hd.seg.segread(tmp_path / "p.dcm")
    assert seg.SegmentationType == "FRACTIONAL"
    series = dicom_series.read(dicom_series.find_series(folder / "venous"))
    probability = 1.0 / (1.0 + np.exp(-2 * (series.array.astype(float) - THRESHOLD) / 50.0))  # the model's softmax
    frames = frames_by_source_fractional(seg)
    for image, expected in zip(series.images, probability, strict=True):
        uid = image.header.SOPInstanceUID
        np.testing.assert_allclose(frames.get(uid, np.zeros_like(expected)), expected, atol=1.5 / 255)


def frames_by_source_fractional(seg) -> dict[str, np.ndarray]:
    pixels = seg.pixel_array.astype(float) / float(seg.MaximumFractionalValue)
    return {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: pixels[index]
            for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence)}  # fmt: skip


def test_a_seg_needs_a_dicom_input_and_a_folder_needs_a_series(tmp_path, capsys, bone_model):
    image = tmp_path / "ct.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(image))
    code, _, err = run(capsys, "segment", "-m", bone_model, "-i", image, "-o", tmp_path / "x.dcm")
    assert code == 1 and "must be a DICOM series folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "a.txt").write_text("hello")
    code, _, err = run(capsys, "segment", "-m", bone_model, "-i", tmp_path / "notdicom", "-o", tmp_path / "x.nrrd")
    assert code == 1 and "holds no DICOM image series" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_register_takes_a_dicom_fixed_image(tmp_path, capsys):
    # A ball in a DICOM series, and the same ball 4 mm further along L in a NIfTI: rigid registration finds the 4 mm.
    centre = np.array([0.0, 0.0, 0.0])
    smooth = lambda points: 500.0 * np.exp(-np.sum((points - centre) ** 2, axis=1) / (2 * 7.0**2))  # noqa: E731
    write_series(tmp_path / "fixed", smooth, rows=32, columns=32, pixel_spacing=(2.0, 2.0), slices=24,
                 origin=(-31.0, -31.0, -23.0))  # fmt: skip
    series = dicom_series.read(dicom_series.find_series(tmp_path / "fixed"))
    moved_centre = centre + [4.0, 0.0, 0.0]  # LPS
    points = voxel_points_lps(series.ijk_to_ras, series.array.shape).reshape(-1, 3)
    moving = 500.0 * np.exp(-np.sum((points - moved_centre) ** 2, axis=1) / (2 * 7.0**2))
    sitk.WriteImage(nodes.array_to_sitk(moving.reshape(series.array.shape).astype(np.float32), series.ijk_to_ras),
                    str(tmp_path / "moving.nii.gz"))  # fmt: skip
    code, out, err = run(capsys, "register", "--fixed", tmp_path / "fixed", "--moving", tmp_path / "moving.nii.gz",
                         "--preset", "rigid", "--device", "cpu", "--output-transform", tmp_path / "t.h5", "--json")  # fmt: skip
    assert code == 0, err
    points = json.loads(out)["check_points"]
    shift_ras = np.array(points["moving_ras"][0]) - points["fixed_ras"][0]
    np.testing.assert_allclose(shift_ras, [-4.0, 0.0, 0.0], atol=0.5)  # 4 mm towards L is -4 in R


@pytest.mark.slow
def test_a_batch_takes_dicom_folders_as_cases(tmp_path, capsys, study, bone_model):
    folder, _ = study
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("arterial", "venous"):
        shutil.copytree(folder / name, cases / f"patient-{name}")
    (cases / "readme.txt").write_text("not a case")
    code, out, err = run(capsys, "batch", "segment", "-m", bone_model, "--cases", cases, "--output-dir",
                         tmp_path / "out", "--format", "dicom-seg", "--device", "cpu", "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert [case["name"] for case in summary["cases"]] == ["patient-arterial", "patient-venous"]
    for name in ("arterial", "venous"):
        seg = hd.seg.segread(tmp_path / "out" / f"patient-{name}.dcm")
        assert seg.SegmentationType == "LABELMAP" and seg.get_segment_description(1).segment_label == "Bone"
    on_disk = json.loads((tmp_path / "out" / "deepseg-summary.json").read_text())
    assert [case["status"] for case in on_disk["cases"]] == ["done", "done"]
    assert isinstance(on_disk["cases"][0]["summary"]["Bone ml"], float)


def test_stored_values_past_the_signed_range_come_out_in_modality_units(tmp_path):
    # Unsigned 16-bit pixels with an intercept of -32768 (as some MR and PET exporters write): values are exact.
    write_series(tmp_path / "wide", linear_field(offset=-200.0), slices=6, intercept=-32768.0)
    series = dicom_series.read(dicom_series.find_series(tmp_path / "wide"))
    expected = linear_field(offset=-200.0)(voxel_points_lps(series.ijk_to_ras, series.array.shape).reshape(-1, 3))
    assert series.array.dtype == np.int16
    np.testing.assert_allclose(series.array.reshape(-1), expected, atol=1.0)
