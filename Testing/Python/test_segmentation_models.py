"""Model files are untrusted: safe archive extraction, checksums in the store, format detection."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from DeepSegModuleLib.models import (
    ChecksumError,
    ModelCache,
    ModelFormat,
    ModelFormatError,
    ModelStore,
    UnsafeArchiveError,
    detect_format,
    load_model,
    safe_extract_zip,
    sha256_of_file,
)
from DeepSegModuleLib.segmentation import SegmentationOptions, segment
from segmentation_helpers import Thresholder, grid_center, oblique_grid, sphere_volume, write_torchscript_model


@pytest.mark.parametrize("entry", ["../evil.txt", "models/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_zip_with_path_traversal_is_refused_and_nothing_is_written(tmp_path, entry):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("configs/metadata.json", "{}")
        zf.writestr(entry, "owned")
    destination = tmp_path / "out" / "model"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract_zip(archive, destination)
    assert not destination.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_zip_with_a_symlink_is_refused(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "out")


def test_zip_bomb_is_refused(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("weights.bin", b"\0" * 2_000_000)
    with pytest.raises(UnsafeArchiveError, match="expand"):
        safe_extract_zip(archive, tmp_path / "out", max_unpacked_bytes=1_000_000)


def test_store_imports_verifies_and_detects_tampering(tmp_path):
    model_folder = tmp_path / "source"
    write_torchscript_model(model_folder, Thresholder())
    store = ModelStore(tmp_path / "store", include_bundled=False)
    stored = store.import_model(model_folder / "model.ts", model_id="sphere-1.0")
    assert store.list_ids() == ["sphere-1.0"]
    assert stored.files["model.ts"] == sha256_of_file(model_folder / "model.ts")
    assert set(stored.files) == {"model.ts", "deepseg.json"}
    store.verify("sphere-1.0")
    assert detect_format(stored.model_path) == ModelFormat.TORCHSCRIPT
    assert load_model(stored.model_path).description.labels[0].name == "Sphere"

    weights = stored.path / "model.ts"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ChecksumError, match="model.ts"):
        store.verify("sphere-1.0")
    with pytest.raises(FileExistsError):
        store.import_model(model_folder, model_id="sphere-1.0")
    store.import_model(model_folder, model_id="sphere-1.0", replace=True)
    store.verify("sphere-1.0")
    store.remove("sphere-1.0")
    assert store.list_ids() == []


def test_store_checks_an_expected_archive_checksum_and_runs_a_zipped_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEG_CACHE_DIR", str(tmp_path / "unpacked"))
    model_folder = tmp_path / "source" / "sphere"
    write_torchscript_model(model_folder, Thresholder())
    archive = tmp_path / "sphere.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in model_folder.iterdir():
            zf.write(path, f"sphere/{path.name}")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ChecksumError):
        store.import_model(archive, expected_sha256="f" * 64)
    stored = store.import_model(archive, expected_sha256=sha256_of_file(archive))
    assert stored.model_path.name == "sphere"

    grid = oblique_grid()
    volume, truth = sphere_volume(grid_center(grid), 8.0, grid)
    from_zip = segment(volume, archive, SegmentationOptions(device="cpu"), cache=ModelCache())
    from_store = segment(volume, stored.model_path, SegmentationOptions(device="cpu"), cache=ModelCache())
    np.testing.assert_array_equal(from_zip.labels, from_store.labels)
    assert (from_zip.labels == 1)[truth].mean() > 0.9


def test_unknown_folder_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="nnU-Net v2"):
        detect_format(tmp_path)


def test_store_rejects_ids_that_escape_its_folder(tmp_path):
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ValueError, match="model id"):
        store.import_model(Path(__file__), model_id="../outside")
