"""Hostile and damaged image files: refused from their headers, in one line, before anything is allocated."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from DeepSegModuleLib import cli, storage
from DeepSegModuleLib.context import SceneContext
from DeepSegModuleLib.image_checks import ImageFileError, check_finite, check_image_file
from DeepSegModuleLib.limits import LimitExceeded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture
def secret(tmp_path) -> Path:
    folder = tmp_path / "private"
    folder.mkdir()
    path = folder / "passwords.txt"
    path.write_bytes(b"hunter2 " * 512)
    return path


def _nhdr(path: Path, data_file: str, sizes: str = "8 8 8", kind: str = "uchar") -> Path:
    path.write_text(f"NRRD0004\ntype: {kind}\ndimension: 3\nspace: left-posterior-superior\nsizes: {sizes}\nencoding: raw\nendian: little\n"
                    f"space directions: (1,0,0) (0,1,0) (0,0,1)\ndata file: {data_file}\n")  # fmt: skip
    return path


@pytest.mark.parametrize("how", ["relative", "absolute", "list", "format"])
def test_detached_nrrd_cannot_read_outside_its_folder(how, tmp_path, secret):
    scans = tmp_path / "scans"
    scans.mkdir()
    data_file = {
        "relative": "../private/passwords.txt",
        "absolute": str(secret),
        "list": "LIST\n../private/passwords.txt",
        "format": "../private/passwords%01d.txt 0 0 1",
    }[how]
    if how == "format":
        secret.rename(secret.with_name("passwords0.txt"))
    header = _nhdr(scans / "scan.nhdr", data_file)
    with pytest.raises(ImageFileError, match="outside the header's folder"):
        check_image_file(header)
    context = SceneContext.headless()
    with pytest.raises(storage.StorageError):
        storage.load_volume(context, header)


def test_detached_nrrd_beside_its_header_is_read(tmp_path):
    (tmp_path / "scan.raw").write_bytes(bytes(range(256)) * 2)
    header = _nhdr(tmp_path / "scan.nhdr", "scan.raw")
    volume = storage.load_volume(SceneContext.headless(), header)
    assert volume.GetImageData().GetDimensions() == (8, 8, 8)


def test_a_1kb_header_cannot_ask_for_terabytes(tmp_path):
    header = tmp_path / "huge.nrrd"
    header.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n"
                       b"endian: little\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n\n" + b"\0" * 64)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match="DEEPSEG_MAX_VOXELS"):
        check_image_file(header)
    assert time.monotonic() - started < 2


def test_huge_spacing_cannot_make_a_huge_resampled_grid():
    from DeepSegModuleLib.segmentation.grid import ModelGrid

    ijk_to_ras = np.diag([1000.0, 1000.0, 1000.0, 1.0])
    with pytest.raises(LimitExceeded, match="resampled"):
        ModelGrid.plan((20, 20, 20), ijk_to_ras, "RAS", (1.5, 1.5, 1.5))


def test_seg_nrrd_with_thousands_of_segments_is_refused_before_reading(tmp_path, monkeypatch):
    lines = [f"Segment{i}_ID:=s{i}\nSegment{i}_LabelValue:={i + 1}\nSegment{i}_Layer:=0" for i in range(5000)]
    path = tmp_path / "many.seg.nrrd"
    path.write_bytes(("NRRD0004\ntype: uchar\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 4 4\nencoding: raw\nendian: little\n"
                      "space directions: (1,0,0) (0,1,0) (0,0,1)\n" + "\n".join(lines) + "\n\n").encode()
                     + b"\0" * 64)  # fmt: skip
    with pytest.raises(LimitExceeded, match="DEEPSEG_MAX_SEGMENTS"):
        storage.load_segmentation(SceneContext.headless(), path)
    monkeypatch.setenv("DEEPSEG_MAX_SEGMENTS", "10000")
    check_image_file(path)  # raised limits are honoured


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_truncated_files_are_a_clear_error_not_half_a_volume(suffix, tmp_path, capsys):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((32, 32, 32)).astype(np.float32))
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(image, str(full), useCompression=suffix == ".nrrd")
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    check_image_file(full)
    with pytest.raises(ImageFileError, match="truncated"):
        check_image_file(cut)
    code = cli.main(["segment", "--input", str(cut), "--output", str(tmp_path / "x.seg.nrrd")])
    from test_cli import error_lines

    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "truncated" in err[0]


def test_a_gzip_bomb_is_not_inflated(tmp_path):
    """A .nii.gz whose header declares a small image but whose stream inflates to gigabytes is read only as far
    as the header says."""
    header = nibabel.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)).header
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + np.zeros((16, 16, 16), np.float32).tobytes()
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(raw)
        for _ in range(256):
            stream.write(b"\0" * (1 << 20))
    started = time.monotonic()
    check_image_file(path)
    assert time.monotonic() - started < 2


def test_a_picture_is_a_2d_image(tmp_path, capsys):
    picture = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.uint8)), str(picture))
    code = cli.main(["segment", "--input", str(picture), "--output", str(tmp_path / "x.seg.nrrd")])
    err = capsys.readouterr().err
    from test_cli import error_lines

    assert code == 1 and "2D" in err and "ERR" not in err and len(error_lines(err)) == 1
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.float32)), str(flat))
    with pytest.raises(ImageFileError, match="2D image"):
        check_image_file(flat)


def test_a_text_file_named_like_an_image_gives_one_line_and_no_vtk_dump(tmp_path, capfd):
    fake = tmp_path / "notes.nii.gz"
    fake.write_text("not an image at all")
    code = cli.main(["segment", "--input", str(fake), "--output", str(tmp_path / "x.seg.nrrd"), "--json"])
    captured = capfd.readouterr()
    assert code == 1 and "ERR|" not in captured.err and "vtk" not in captured.err.lower()


def test_nan_and_infinite_voxels_are_refused(tmp_path, capsys):
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    volume[3, 4, 5] = np.nan
    volume[1, 1, 1] = np.inf
    with pytest.raises(ImageFileError, match="2 NaN or infinite voxels"):
        check_finite(volume, "input")
    path = tmp_path / "nan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(path))
    code = cli.main(["segment", "--input", str(path), "--output", str(tmp_path / "x.seg.nrrd")])
    err = capsys.readouterr().err
    assert code == 1 and "NaN" in err and not (tmp_path / "x.seg.nrrd").exists()
    raw = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(raw), useCompression=True)
    with pytest.raises(ImageFileError, match="2 NaN or infinite"):
        check_image_file(raw)


_FIELDS = ["type: uchar", "type: float", "type: nonsense", "dimension: 3", "dimension: 2", "dimension: 99",
           "sizes: 4 4 4", "sizes: -1 4 4", "sizes: 99999999999 2 2", "sizes: a b c", "encoding: raw",
           "encoding: gzip", "encoding: bzip2", "data file: ../x.raw", "data file: LIST", "data file: /etc/passwd",
           "data file: %d.raw 0 99999999 1", "data file: %s 1 2 1", "endian: big", "space: left-posterior-superior",
           "space directions: (1,0,0) (0,1,0) (0,0,1)", "space directions: none (0,1,0)", "Segment0_ID:=a",
           "byte skip: -1", "line skip: 3", "kinds: domain domain domain", "content: ../../"]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.sampled_from(_FIELDS), max_size=9), payload=st.binary(max_size=256),
       detached=st.booleans())  # fmt: skip
def test_fuzzed_nrrd_headers_raise_only_deepseg_errors_and_read_nothing_outside(tmp_path, fields, payload, detached):
    work = tmp_path / "fuzz"
    work.mkdir(exist_ok=True)
    header = work / ("x.nhdr" if detached else "x.nrrd")
    header.write_bytes(("NRRD0004\n" + "\n".join(fields) + "\n\n").encode() + payload)
    try:
        check_image_file(header)
        storage.load_volume(SceneContext.headless(), header)
    except (ImageFileError, LimitExceeded, storage.StorageError, FileNotFoundError):
        pass
    finally:
        for path in work.iterdir():
            path.unlink()
    assert os.listdir(tmp_path) == ["fuzz"]
