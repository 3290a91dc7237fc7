"""A cohort on a local Ray (2 CPUs, 2 actors), as a user runs it with ``deepseg batch ... --ray``: the same files as
the local batch, byte for byte for label maps; a worker that dies is replaced and its case retried once; a
refusal is reported without a retry; a stopped cohort resumes."""

from __future__ import annotations

import json
import shutil

import nibabel
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'deepseg[ray]'")

import cohort_helpers  # noqa: E402
from dicom_helpers import ball_field, write_series  # noqa: E402
from segmentation_helpers import Thresholder, grid_center, oblique_grid, sphere_volume, write_torchscript_model  # noqa: E402

from DeepSegModuleLib import cli  # noqa: E402
from DeepSegModuleLib.batch import read_cases  # noqa: E402
from DeepSegModuleLib.cohort import INPUT_COLUMNS, SegmentCases  # noqa: E402
from DeepSegModuleLib.dicom_series import SeriesChoice  # noqa: E402
from DeepSegModuleLib.ray_cohort import run_on_ray  # noqa: E402
from DeepSegModuleLib.segmentation.options import SegmentationOptions  # noqa: E402

pytestmark = pytest.mark.slow


def run(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A bright-sphere model and a cases folder: three NIfTI images (oblique, spheres of other sizes) and one DICOM
    series folder."""
    root = tmp_path_factory.mktemp("cohort")
    model = write_torchscript_model(root / "model", Thresholder()).parent
    cases = root / "cases"
    cases.mkdir()
    grid = oblique_grid()
    for index, radius in enumerate((6.0, 8.0, 10.0)):
        volume, _ = sphere_volume(grid_center(grid) + [index, 0.0, -index], radius, grid)
        nibabel.save(nibabel.Nifti1Image(volume.array.transpose(2, 1, 0), volume.ijk_to_ras),
                     str(cases / f"case-{index}.nii.gz"))  # fmt: skip
    write_series(cases / "dicom-case", ball_field((0.0, 0.0, 0.0), 9.0, inside=400.0, outside=0.0), slices=20)
    return model, cases


def test_a_cohort_on_ray_writes_what_the_local_batch_writes_and_resumes(tmp_path, capsys, cohort):
    model, cases = cohort
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    code, out, err = run(capsys, "batch", "segment", "-m", model, "--cases", cases, "--output-dir", local,
                         "--format", "nii.gz", "--device", "cpu", "--json")  # fmt: skip
    assert code == 0, err
    code, out, err = run(capsys, "batch", "segment", "-m", model, "--cases", cases, "--output-dir", on_ray,
                         "--format", "nii.gz", "--device", "cpu", "--ray")  # fmt: skip
    assert code == 0, err
    names = ["case-0", "case-1", "case-2", "dicom-case"]
    for name in names:
        assert (on_ray / f"{name}.nii.gz").read_bytes() == (local / f"{name}.nii.gz").read_bytes(), name
        record = json.loads((on_ray / f"{name}.done.json").read_text())
        assert record["summary"] == json.loads((local / f"{name}.done.json").read_text())["summary"]
    assert sum(f"] {name}: done" in err for name in names) == 4 and "[4/4]" in err
    summary = json.loads((on_ray / "deepseg-summary.json").read_text())
    assert [case["status"] for case in summary["cases"]] == ["done"] * 4
    assert all(isinstance(case["seconds"], float) and case["attempts"] == 1 for case in summary["cases"])
    assert summary["cases"][0]["summary"]["Sphere ml"] == pytest.approx(4 / 3 * np.pi * 6.0**3 / 1000, rel=0.25)
    header = (on_ray / "deepseg-summary.csv").read_text().splitlines()[0]
    assert header.startswith("case,status,seconds,error") and "Sphere ml" in header

    # A stopped cohort (one output lost) goes on where it stopped: only that case runs again.
    (on_ray / "case-1.nii.gz").unlink()
    code, out, err = run(capsys, "batch", "segment", "-m", model, "--cases", cases, "--output-dir", on_ray,
                         "--format", "nii.gz", "--device", "cpu", "--ray", "--json")  # fmt: skip
    assert code == 0, err
    statuses = {case["name"]: case["status"] for case in json.loads(out)["cases"]}
    assert statuses == {"case-0": "skipped", "case-1": "done", "case-2": "skipped", "dicom-case": "skipped"}
    assert (on_ray / "case-1.nii.gz").read_bytes() == (local / "case-1.nii.gz").read_bytes()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(cohort_helpers)
    yield
    ray.shutdown()


def test_a_worker_that_dies_is_replaced_and_its_case_retried_once(tmp_path, cohort, local_ray):
    model, cases = cohort
    inner = SegmentCases(model, SegmentationOptions(device="cpu"), tmp_path / "out", "nii.gz")
    marks = tmp_path / "marks"
    marks.mkdir()
    job = cohort_helpers.CrashingJob(inner, marks, always=("case-0",), once=("case-2",))
    case_list = read_cases(cases, INPUT_COLUMNS[:1], optional=INPUT_COLUMNS[1:])
    seen = []
    results = {result.name: result for result in run_on_ray(case_list, job, on_result=seen.append)}
    assert results["case-0"].status == "failed" and results["case-0"].attempts == 2
    assert "worker process died" in results["case-0"].error and "failed 2 times" in results["case-0"].error
    assert results["case-2"].status == "done" and results["case-2"].attempts == 2
    assert results["case-1"].status == "done" and results["case-1"].attempts == 1
    assert results["dicom-case"].status == "done"
    assert not (tmp_path / "out" / "case-0.nii.gz").exists() and (tmp_path / "out" / "case-2.nii.gz").exists()
    assert sorted(result.name for result in seen) == sorted(results)  # each case reported once


def test_a_refused_case_is_not_retried_and_the_rest_go_on(tmp_path, cohort, local_ray):
    model, cases = cohort
    broken = tmp_path / "cases"
    shutil.copytree(cases, broken)
    (broken / "case-1.nii.gz").write_bytes(b"not an image at all")
    job = SegmentCases(model, SegmentationOptions(device="cpu"), tmp_path / "out", "seg.nrrd",
                       dicom=SeriesChoice(modality="CT"))  # fmt: skip
    case_list = read_cases(broken, INPUT_COLUMNS[:1], optional=INPUT_COLUMNS[1:])
    results = {result.name: result for result in run_on_ray(case_list, job)}
    assert results["case-1"].status == "failed" and results["case-1"].attempts == 1 and results["case-1"].error
    assert [results[name].status for name in ("case-0", "case-2", "dicom-case")] == ["done"] * 3
    assert (tmp_path / "out" / "dicom-case.seg.nrrd").exists()
