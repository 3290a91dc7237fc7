"""The `deepseg` command as a user runs it: files in, Slicer files out, one-line errors, nothing half-written."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import shutil
import threading
import zipfile

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from DeepSegModuleLib import cli, nodes, segments, storage
from DeepSegModuleLib.context import SceneContext
from segmentation_helpers import Thresholder, dice, grid_center, oblique_grid, sphere_volume, write_torchscript_model

LPS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture
def model_store(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("DEEPSEG_MODEL_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def sphere_model(tmp_path_factory):
    return write_torchscript_model(tmp_path_factory.mktemp("model") / "sphere", Thresholder())


@pytest.fixture(scope="module")
def sphere_image(tmp_path_factory):
    """An oblique NIfTI (written by nibabel) with a bright sphere, and the true mask."""
    grid = oblique_grid()
    volume, truth = sphere_volume(grid_center(grid) + [2.0, 1.0, -3.0], 9.0, grid)
    path = tmp_path_factory.mktemp("images") / "ct.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.array.transpose(2, 1, 0), volume.ijk_to_ras), str(path))
    return path, truth, volume.ijk_to_ras


def run(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_a_seg_nrrd_and_a_label_map_on_the_input_grid(tmp_path, capsys, sphere_model, sphere_image):
    image, truth, grid = sphere_image
    code, out, err = run(capsys, "segment", "--model", sphere_model.parent, "--input", image,
                         "--output", tmp_path / "sphere.seg.nrrd", "--device", "cpu", "--json",
                         "--probabilities", tmp_path / "p", "--preview", tmp_path / "sphere.png")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ok"] and set(summary["segments_ml"]) == {"Sphere"}
    assert summary["segments_ml"]["Sphere"] == pytest.approx(4 / 3 * np.pi * 9.0**3 / 1000, rel=0.15)

    # The grid is left-handed, so Slicer's reader flips its slice axis: compare in physical space.
    context = SceneContext.headless()
    segmentation = storage.load_segmentation(context, tmp_path / "sphere.seg.nrrd")
    reference = storage.load_volume(context, image)
    labels, reference_grid, table = segments.segmentation_to_labels(context, segmentation, reference)
    assert [info.name for info in table] == ["Sphere"]
    assert dice(nodes.reorder_to_grid(labels, reference_grid, truth.shape, grid) == 1, truth) > 0.9
    assert (tmp_path / "p" / "Sphere.nii.gz").exists() and (tmp_path / "sphere.png").stat().st_size > 1000

    code, _, err = run(capsys, "segment", "-m", sphere_model.parent, "-i", image, "-o", tmp_path / "sphere.nii.gz",
                       "--precision", "fp32")
    assert code == 0, err
    code, _, err = run(capsys, "segment", "-m", sphere_model.parent, "-i", image, "-o", tmp_path / "x.nii.gz",
                       "--precision", "fp64")
    assert code == 1 and "--precision must be" in err and not (tmp_path / "x.nii.gz").exists()
    written = nibabel.load(str(tmp_path / "sphere.nii.gz"))
    assert np.abs(written.affine - grid).max() < 1e-4  # the input's grid, as nibabel reads it
    label_map = np.asarray(written.dataobj).transpose(2, 1, 0)
    assert set(np.unique(label_map)) == {0, 1}  # the model's own label values
    assert dice(label_map == 1, truth) > 0.9


def test_models_import_list_info_remove_and_segment_by_name(tmp_path, capsys, model_store, sphere_model, sphere_image):
    image, truth, _ = sphere_image
    code, out, err = run(capsys, "models", "import", sphere_model.parent, "--name", "sphere")
    assert code == 0, err and "imported sphere" in out
    code, out, _ = run(capsys, "models", "list", "--json")
    listed = {entry["id"]: entry for entry in json.loads(out)["models"]}
    assert set(listed) == {"sphere", "deepseg-brain"}  # the user's model and the one DeepSeg ships
    assert not listed["sphere"]["bundled"] and listed["deepseg-brain"]["bundled"]
    code, out, _ = run(capsys, "models", "info", "sphere", "--json")
    info = json.loads(out)
    assert info["checksums"] == "ok" and info["format"] == "torchscript"

    code, _, err = run(capsys, "segment", "-m", "sphere", "-i", image, "-o", tmp_path / "by-name.seg.nrrd")
    assert code == 0, err

    # A stored file that changed is found before the model is used.
    stored_weights = next(model_store.rglob("model.ts"))
    stored_weights.write_bytes(stored_weights.read_bytes() + b"tampered")
    code, _, err = run(capsys, "segment", "-m", "sphere", "-i", image, "-o", tmp_path / "tampered.seg.nrrd")
    assert code == 1 and "sha256" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tampered.seg.nrrd").exists()

    code, out, _ = run(capsys, "models", "remove", "sphere")
    assert code == 0 and not (model_store / "sphere").exists()


@pytest.fixture
def file_server(tmp_path):
    """A file server on 127.0.0.1 for the download path (no network beyond this machine)."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the server's request log out of the command's stderr
            pass

    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_models_import_from_a_url_checks_the_sha256(tmp_path, capsys, model_store, sphere_model, file_server):
    served, base = file_server
    archive = served / "sphere.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sphere_model.parent.iterdir():
            bundle.write(path, f"sphere/{path.name}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()

    code, _, err = run(capsys, "models", "import", f"{base}/sphere.zip", "--sha256", "0" * 64, "--name", "bad")
    assert code == 1 and "sha256" in err
    assert not (model_store / "bad").exists()

    code, _, err = run(capsys, "models", "import", f"{base}/missing.zip")
    assert code == 1 and "404" in err and len(err.strip().splitlines()) == 1

    code, out, err = run(capsys, "models", "import", f"{base}/sphere.zip", "--sha256", digest, "--name", "web", "--json")
    assert code == 0, err
    assert json.loads(out)["id"] == "web" and "downloading" not in err  # --json: standard error stays quiet
    code, out, _ = run(capsys, "models", "info", "web", "--json")
    assert json.loads(out)["format"] == "torchscript"

    file_url = (tmp_path / "copy.zip").as_uri()
    shutil.copy(archive, tmp_path / "copy.zip")
    code, out, err = run(capsys, "models", "import", file_url, "--name", "from-file")
    assert code == 0, err
    # Progress names the file and its size (one line per stage when standard error is not a terminal).
    size = archive.stat().st_size
    assert f"downloading copy.zip, {size / 1000:.0f} kB" in err or f"downloading copy.zip, {size} B" in err, err
    assert "downloaded " in out
    code, out, err = run(capsys, "models", "import", file_url, "--name", "quietly", "-q")
    assert code == 0 and "downloading" not in err


def write_sphere_pair(folder, shift):
    """fixed.nrrd and moving.nrrd in ``folder``: a smooth 10 mm ball on a 2 mm grid, in the moving image moved by
    ``shift`` mm; returns the 2 mm grid, the fixed volume (before smoothing) and the two balls' true masks."""
    spacing = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = ((32, 32, 32), spacing)
    centre = np.array([31.0, 31.0, 31.0])
    fixed, fixed_truth = sphere_volume(centre, 10.0, grid)
    moving, moving_truth = sphere_volume(centre + shift, 10.0, grid)
    for name, volume in (("fixed", fixed), ("moving", moving)):
        sitk.WriteImage(nodes.array_to_sitk(gaussian_filter(volume.array, 1.5), spacing), str(folder / f"{name}.nrrd"))
    return spacing, fixed, fixed_truth, moving_truth


def test_register_writes_transform_volume_and_label_map_that_keeps_its_values(tmp_path, capsys):
    shift = np.array([4.0, -3.0, 2.0])
    spacing, fixed, _, moving_truth = write_sphere_pair(tmp_path, shift)
    sitk.WriteImage(nodes.array_to_sitk(moving_truth.astype(np.uint8) * 7, spacing), str(tmp_path / "moving-labels.nii.gz"))

    code, out, err = run(
        capsys, "register", "--fixed", tmp_path / "fixed.nrrd", "--moving", tmp_path / "moving.nrrd",
        "--preset", "rigid", "--device", "cpu", "--output-transform", tmp_path / "t.h5",
        "--output-volume", tmp_path / "registered.nrrd", "--moving-segmentation", tmp_path / "moving-labels.nii.gz",
        "--output-segmentation", tmp_path / "labels-on-fixed.nii.gz", "--report", tmp_path / "report.json", "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["check_points"] == summary["check_points"]

    # SimpleITK's reading of the .h5 moves the points as the report says (RAS in the report, LPS in ITK).
    transform = sitk.ReadTransform(str(tmp_path / "t.h5"))
    for fixed_point, moving_point in zip(report["check_points"]["fixed_ras"], report["check_points"]["moving_ras"]):
        moved = np.array(transform.TransformPoint((np.array(fixed_point) * LPS).tolist())) * LPS
        np.testing.assert_allclose(moved, moving_point, atol=1e-4)
    np.testing.assert_allclose(np.array(report["check_points"]["moving_ras"][0]) - report["check_points"]["fixed_ras"][0], shift, atol=0.6)

    labels_on_fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels-on-fixed.nii.gz")))
    assert set(np.unique(labels_on_fixed)) == {0, 7}
    assert dice(labels_on_fixed == 7, fixed.array > 150) > 0.85
    assert (tmp_path / "registered.nrrd").exists()


def error_lines(err: str) -> list[str]:
    """Standard error without the progress lines a pipe gets (one ``  <stage> ...`` per stage), which must be all
    the rest: what is left is what went wrong."""
    lines = [line for line in err.splitlines() if line.strip()]
    progress = [line for line in lines if re.fullmatch(r"  [a-z][\w ,.-]* \.\.\.", line)]
    assert all(line in progress for line in lines[: len(progress)]), err  # progress first, then the error
    return lines[len(progress):]


def test_bad_input_is_one_line_non_zero_and_leaves_no_output(tmp_path, capsys, sphere_model, sphere_image, model_store):
    image, _, _ = sphere_image
    not_an_image = tmp_path / "notes.nii.gz"
    not_an_image.write_text("not an image")
    cases = [
        (["segment", "-m", sphere_model.parent, "-i", tmp_path / "missing.nii.gz", "-o", tmp_path / "a.seg.nrrd"], "does not exist"),
        (["segment", "-m", sphere_model.parent, "-i", not_an_image, "-o", tmp_path / "b.seg.nrrd"], "is not an image DeepSeg can read"),
        (["segment", "-m", "no-such-model", "-i", image, "-o", tmp_path / "c.seg.nrrd"], "deepseg models import"),
        (["segment", "-m", sphere_model.parent, "-i", image, "-o", tmp_path / "no-folder" / "d.seg.nrrd"], "does not exist"),
        (["segment", "-m", sphere_model.parent, "-i", image, "-o", tmp_path / "e.vtk"], "must end in"),
        (["register", "--fixed", image, "--moving", image, "--output-transform", tmp_path / "t.h5", "--preset", "magic"], "unknown preset"),
        (["models", "info", "nothing-here"], "no model"),
    ]
    before = sorted(path.name for path in tmp_path.iterdir())
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        lines = error_lines(err)
        assert code == 1, (argv, out, err)
        assert len(lines) == 1 and message in lines[0], (argv, err)
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_batch_segment_is_resumable_and_survives_a_bad_case(tmp_path, capsys, sphere_model, sphere_image):
    image, truth, _ = sphere_image
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("case-a", "case-b"):
        shutil.copy(image, scans / f"{name}.nii.gz")
    (scans / "case-c.nii.gz").write_text("damaged")
    results = tmp_path / "results"

    code, out, err = run(capsys, "batch", "segment", "--model", sphere_model.parent, "--cases", scans,
                         "--output-dir", results, "--format", "nii.gz", "--device", "cpu", "--json")
    assert code == 1  # one case failed ...
    summary = json.loads(out)
    status = {case["name"]: case["status"] for case in summary["cases"]}
    assert status == {"case-a": "done", "case-b": "done", "case-c": "failed"}  # ... and did not stop the others
    assert summary["failed"] == ["case-c"]
    assert not (results / "case-c.nii.gz").exists()
    volumes = {case["name"]: case["summary"].get("Sphere ml") for case in summary["cases"]}
    assert isinstance(volumes["case-a"], float) and volumes["case-a"] > 0  # a number, not "47.85 ml"
    import csv

    with open(summary["summary_csv"], newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert rows["case-c"]["status"] == "failed" and rows["case-c"]["error"]
    assert float(rows["case-a"]["Sphere ml"]) == pytest.approx(volumes["case-a"])
    written = nibabel.load(str(results / "case-a.nii.gz"))
    assert dice(np.asarray(written.dataobj).transpose(2, 1, 0) == 1, truth) > 0.9

    shutil.copy(image, scans / "case-c.nii.gz")  # the user fixes the damaged file and runs again
    code, out, err = run(capsys, "batch", "segment", "--model", sphere_model.parent, "--cases", scans,
                         "--output-dir", results, "--format", "nii.gz", "--device", "cpu", "--json")
    assert code == 0, err
    status = {case["name"]: case["status"] for case in json.loads(out)["cases"]}
    assert status == {"case-a": "skipped", "case-b": "skipped", "case-c": "done"}

    code, out, err = run(capsys, "batch", "segment", "--model", sphere_model.parent, "--cases", scans,
                         "--output-dir", results, "--format", "nii.gz")
    assert code == 0 and "case-c" in out and "skipped" in out  # the summary table
    assert [line.split(":")[0].strip() for line in err.splitlines() if line.startswith("  [")] == [
        "[1/3] case-a", "[2/3] case-b", "[3/3] case-c"]  # a line per case, counted
    (results / "case-b.nii.gz").unlink()  # one case to redo: its line has its time and none left
    code, out, err = run(capsys, "batch", "segment", "--model", sphere_model.parent, "--cases", scans,
                         "--output-dir", results, "--format", "nii.gz", "--device", "cpu")
    assert code == 0 and re.search(r"\[2/3\] case-b: done \(\d+\.\d s\; about \d+ s left\)", err), err
    code, out, err = run(capsys, "batch", "segment", "--model", sphere_model.parent, "--cases", scans,
                         "--output-dir", results, "--format", "nii.gz", "-q")
    assert code == 0 and "[1/3]" not in err and "case-c" in out


def test_batch_register_from_a_csv(tmp_path, capsys):
    spacing = np.diag([3.0, 3.0, 3.0, 1.0])
    grid = ((20, 20, 20), spacing)
    centre = np.array([28.5, 28.5, 28.5])
    fixed, _ = sphere_volume(centre, 12.0, grid)
    rows = ["case,fixed,moving"]
    for name, shift in (("p1", [3.0, 0.0, 0.0]), ("p2", [0.0, -3.0, 3.0])):
        moving, _ = sphere_volume(centre + shift, 12.0, grid)
        sitk.WriteImage(nodes.array_to_sitk(gaussian_filter(moving.array, 1.0), spacing), str(tmp_path / f"{name}.nrrd"))
        rows.append(f"{name},fixed.nrrd,{name}.nrrd")
    sitk.WriteImage(nodes.array_to_sitk(gaussian_filter(fixed.array, 1.0), spacing), str(tmp_path / "fixed.nrrd"))
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")

    code, out, err = run(capsys, "batch", "register", "--cases", tmp_path / "pairs.csv", "--output-dir",
                         tmp_path / "out", "--preset", "rigid", "--device", "cpu", "--json")
    assert code == 0, err
    assert [case["status"] for case in json.loads(out)["cases"]] == ["done", "done"]
    transform = sitk.ReadTransform(str(tmp_path / "out" / "p2.h5"))
    moved = np.array(transform.TransformPoint((centre * LPS).tolist())) * LPS
    np.testing.assert_allclose(moved, centre + [0.0, -3.0, 3.0], atol=1.0)


def test_version_flag_and_help_that_reads_right(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("deepseg ") and "torch" in out and "slicer-core" in out
    code, out, _ = run(capsys, "segment", "--help")
    assert code == 0
    assert "<bool>" not in out and "list[Path]" not in out
    json_line = next(line for line in out.splitlines() if "--json" in line)
    assert json_line.split()[0] == "--json"  # a flag: no value after it
    code, _, err = run(capsys)
    assert code == 2 and err.startswith("Usage: ") and "COMMAND" in err and "error" not in err.splitlines()[0]
    # Every command's usage line reads as click's do: required arguments as NAME, no Python types or braces.
    for command in ("segment", "register", "demo", "version", "models list", "models import", "models info",
                    "models trust", "models remove", "batch segment", "batch register"):  # fmt: skip
        code, out, _ = run(capsys, *command.split(), "--help")
        usage = out.splitlines()[0]
        assert code == 0 and usage.startswith("Usage: ") and usage.endswith(f"{command} [OPTIONS]" + usage.split("[OPTIONS]", 1)[1]), usage
        assert not any(mark in usage for mark in ("{", "}", "<", "list[", "Path")), usage


def test_previews_read_like_slicers_views_on_an_asymmetric_phantom(tmp_path):
    """A marker at the patient's right, anterior and superior: on screen it must sit left (axial, coronal: the
    patient's right is the screen's left), top (anterior in axial, superior in the others), and for the
    sagittal view, seen from the patient's left, anterior on the screen's left."""
    from DeepSegModuleLib.preview import _to_ras_axes, screen_views, write_preview
    from PIL import Image

    # An LPS-stored volume (the axes run left and posterior), to test the reorientation as well.
    grid = np.diag([-1.0, -1.2, 1.5, 1.0])
    volume = np.zeros((30, 40, 50), np.float32)  # (k, j, i)
    volume[22:28, 4:10, 4:10] = 100.0  # i small -> right (x = -i), j small -> anterior, k large -> superior
    image, spacing = _to_ras_axes(volume, grid)
    centre = [int(np.mean(axis)) for axis in np.nonzero(image > 50)]
    for name, (shown, _, letters) in screen_views(image, spacing, centre).items():
        rows, columns = np.nonzero(shown > 50)
        assert columns.mean() < shown.shape[1] / 2, f"{name}: the marker should be on the screen's left"
        assert rows.mean() < shown.shape[0] / 2, f"{name}: the marker should be at the top"
        assert letters[0] == {"axial": "R", "coronal": "R", "sagittal": "A"}[name]
    path = write_preview(tmp_path / "p.png", volume, grid, (volume > 50).astype(np.uint8))
    assert Image.open(path).size[0] >= 1200


def test_register_preview_shows_before_and_after(tmp_path, capsys, sphere_image):
    from PIL import Image

    image, _, _ = sphere_image
    code, _, err = run(capsys, "register", "--fixed", image, "--moving", image, "--preset", "rigid",
                       "--output-transform", tmp_path / "t.h5", "--preview", tmp_path / "check.png", "--device", "cpu")
    assert code == 0, err
    width, height = Image.open(tmp_path / "check.png").size
    assert width >= 1200 and height > width * 0.6  # two rows of three views


def test_models_info_lists_the_labels(capsys):
    code, out, _ = run(capsys, "models", "info", "deepseg-brain", "--json")
    assert code == 0
    info = json.loads(out)
    assert set(info["labels"].values()) == {"cerebrospinal fluid", "grey matter", "white matter"}


def test_register_scores_each_structure_against_a_reference_on_the_fixed_image(tmp_path, capsys):
    spacing, _, fixed_truth, moving_truth = write_sphere_pair(tmp_path, np.array([4.0, -3.0, 2.0]))
    moving_labels = moving_truth.astype(np.uint8) * 7
    moving_labels[:3, :3, :3] = 3  # a structure the reference lacks: not scored
    sitk.WriteImage(nodes.array_to_sitk(moving_labels, spacing), str(tmp_path / "moving-labels.nii.gz"))
    sitk.WriteImage(nodes.array_to_sitk(fixed_truth.astype(np.uint8) * 7, spacing), str(tmp_path / "fixed-labels.nii.gz"))

    code, out, err = run(
        capsys, "register", "--fixed", tmp_path / "fixed.nrrd", "--moving", tmp_path / "moving.nrrd", "--preset",
        "rigid", "--device", "cpu", "--output-transform", tmp_path / "t.h5", "--moving-segmentation",
        tmp_path / "moving-labels.nii.gz", "--output-segmentation", tmp_path / "on-fixed.nii.gz",
        "--fixed-segmentation", tmp_path / "fixed-labels.nii.gz",
    )  # fmt: skip
    assert code == 0, err
    dice_line = next(line for line in out.splitlines() if "Dice" in line)
    assert "Label 7:" in dice_line and "Label 3" not in dice_line
    assert float(dice_line.split("Label 7:")[1].split(";")[0]) > 0.9
    code, _, err = run(capsys, "register", "--fixed", tmp_path / "fixed.nrrd", "--moving", tmp_path / "moving.nrrd",
                       "--output-transform", tmp_path / "t2.h5", "--fixed-segmentation", tmp_path / "fixed-labels.nii.gz")  # fmt: skip
    assert code == 1 and "give --moving-segmentation" in err
