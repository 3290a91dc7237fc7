"""A careless command line never destroys the user's data: one output rule for every command that writes.

Each test puts the user's files where a mistyped argument points, runs the command as a user would, and checks
that the files are byte for byte as they were, that the command said why in one line, and that nothing was
written outside where the user asked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel
import numpy as np
import pytest
from DeepSegModuleLib import cli
from DeepSegModuleLib.outputs import OutputError, OutputSet, output_set
from segmentation_helpers import Thresholder, grid_center, oblique_grid, sphere_volume, write_torchscript_model


@pytest.fixture(scope="module")
def sphere_model(tmp_path_factory):
    return write_torchscript_model(tmp_path_factory.mktemp("model") / "sphere", Thresholder())


@pytest.fixture
def image(tmp_path) -> Path:
    grid = oblique_grid()
    volume, _ = sphere_volume(grid_center(grid), 8.0, grid)
    path = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.array.transpose(2, 1, 0), volume.ijk_to_ras), str(path))
    return path


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}  # fmt: skip


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "thesis"
    (folder / "chapter").mkdir(parents=True)
    (folder / "notes.txt").write_text("years of work")
    (folder / "chapter" / "draft.tex").write_text("\\section{Results}")
    return folder


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("deepseg: error")]


@pytest.mark.parametrize(("flag", "name"), [("--output", "old.seg.nrrd"), ("--output", "old.nii.gz"),
                                            ("--preview", "old.png")])  # fmt: skip
def test_output_that_is_an_existing_folder_is_refused_and_kept(flag, name, tmp_path, capsys, sphere_model, image,
                                                               user_folder):  # fmt: skip
    folder = user_folder.rename(tmp_path / name)
    before = _tree_digest(folder)
    argv = ["segment", "--model", sphere_model.parent, "--input", image, "--device", "cpu",
            "--output", tmp_path / "ok.seg.nrrd", "--preview", tmp_path / "ok.png"]  # fmt: skip
    argv[argv.index(flag) + 1] = folder
    code, err = _run(capsys, *argv, "--overwrite")
    assert code == 1 and len(_errors(err)) == 1 and "existing folder" in err, err
    assert _tree_digest(folder) == before
    assert not (tmp_path / "ok.seg.nrrd").exists()


def test_output_equal_to_the_input_is_refused(capsys, sphere_model, image):
    before = image.read_bytes()
    code, err = _run(capsys, "segment", "--model", sphere_model.parent, "--input", image, "--output", image,
                     "--device", "cpu", "--overwrite")  # fmt: skip
    assert code == 1 and "also an input" in err
    assert image.read_bytes() == before
    same_by_another_name = image.parent / "." / ".." / image.parent.name / image.name
    code, err = _run(capsys, "segment", "--model", sphere_model.parent, "--input", image, "--output",
                     same_by_another_name, "--device", "cpu", "--overwrite")  # fmt: skip
    assert code == 1 and "also an input" in err


def test_register_output_volume_equal_to_moving_is_refused(tmp_path, capsys, image):
    before = image.read_bytes()
    code, err = _run(capsys, "register", "--fixed", image, "--moving", image, "--preset", "rigid",
                     "--output-transform", tmp_path / "t.h5", "--output-volume", image, "--overwrite")  # fmt: skip
    assert code == 1 and "also an input" in err
    assert image.read_bytes() == before and not (tmp_path / "t.h5").exists()


def test_register_report_that_is_a_folder_is_refused(tmp_path, capsys, image, user_folder):
    folder = user_folder.rename(tmp_path / "report.json")
    before = _tree_digest(folder)
    code, err = _run(capsys, "register", "--fixed", image, "--moving", image, "--preset", "rigid",
                     "--output-transform", tmp_path / "t.h5", "--report", folder, "--overwrite")  # fmt: skip
    assert code == 1 and "existing folder" in err
    assert _tree_digest(folder) == before


def test_existing_file_needs_overwrite_and_is_then_replaced(tmp_path, capsys, sphere_model, image):
    output = tmp_path / "labels.nii.gz"
    output.write_bytes(b"an older result the user keeps")
    argv = ["segment", "--model", sphere_model.parent, "--input", image, "--output", output, "--device", "cpu"]
    code, err = _run(capsys, *argv)
    assert code == 1 and "--overwrite" in err
    assert output.read_bytes() == b"an older result the user keeps"
    code, err = _run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert nibabel.load(str(output)).shape == nibabel.load(str(image)).shape
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".deepseg")] == []


def test_failed_run_keeps_the_users_probability_folder(tmp_path, capsys, image, user_folder):
    before = _tree_digest(user_folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "deepseg.json").write_text("{not json")
    code, err = _run(capsys, "segment", "--model", broken, "--input", image, "--output", tmp_path / "x.seg.nrrd",
                     "--probabilities", user_folder, "--device", "cpu")  # fmt: skip
    assert code == 1 and len(_errors(err)) == 1 and "not valid JSON" in err
    assert _tree_digest(user_folder) == before
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_batch_case_names_cannot_leave_the_output_folder(tmp_path, capsys, sphere_model, image):
    results = tmp_path / "results"
    cases = tmp_path / "cases.csv"
    cases.write_text(f"case,input\n../../escaped,{image}\n")
    code, err = _run(capsys, "batch", "segment", "--model", sphere_model.parent, "--cases", cases,
                     "--output-dir", results, "--device", "cpu")  # fmt: skip
    assert code == 1 and "letters, digits" in err
    assert not list(tmp_path.parent.glob("escaped*")) and not list(tmp_path.glob("escaped*"))


def test_batch_case_whose_output_is_a_folder_fails_alone_and_keeps_it(tmp_path, capsys, sphere_model, image):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        (scans / f"{name}.nii.gz").write_bytes(image.read_bytes())
    results = tmp_path / "results"
    (results / "a.seg.nrrd").mkdir(parents=True)
    (results / "a.seg.nrrd" / "keep.txt").write_text("mine")
    code, _ = _run(capsys, "batch", "segment", "--model", sphere_model.parent, "--cases", scans,
                   "--output-dir", results, "--device", "cpu", "--json")  # fmt: skip
    assert code == 1
    assert (results / "a.seg.nrrd" / "keep.txt").read_text() == "mine"
    assert (results / "b.seg.nrrd").is_file()


def test_folder_case_names_are_made_safe(tmp_path):
    from DeepSegModuleLib.batch import read_cases

    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "patient 01 (t1).nii.gz").write_bytes(b"")
    (scans / ".hidden.nii.gz").write_bytes(b"")
    names = sorted(case.name for case in read_cases(scans, ("input",)))
    assert names == ["hidden", "patient_01__t1_"]


def test_demo_refuses_a_folder_with_an_earlier_demo_unless_overwrite(tmp_path):
    from DeepSegModuleLib.demo import run_demo

    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "deepseg-demo.mrb").write_text("an earlier scene the user edited")
    with pytest.raises(OutputError, match="--overwrite"):
        run_demo(folder)
    assert (folder / "deepseg-demo.mrb").read_text() == "an earlier scene the user edited"


def test_output_set_commits_all_or_nothing_and_never_replaces_a_file_that_appears(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(RuntimeError), output_set() as outputs:
        outputs.stage(first).write_text("1")
        raise RuntimeError("the engine failed")
    assert not first.exists() and os.listdir(tmp_path) == []
    outputs = OutputSet()
    outputs.stage(first).write_text("1")
    outputs.stage(second).write_text("2")
    second.write_text("someone else's")  # appears while the run is going on
    with pytest.raises(OutputError, match="appeared"):
        outputs.commit()
    assert second.read_text() == "someone else's" and not first.exists()


def test_output_through_a_symbolic_link_to_the_input_is_refused(tmp_path, image):
    link = tmp_path / "link.nii.gz"
    link.symlink_to(image)
    with pytest.raises(OutputError, match="also an input"):
        OutputSet(inputs=[image], overwrite=True).claim(link)


def test_two_outputs_of_one_run_cannot_be_the_same_file(tmp_path, capsys, image):
    code, err = _run(capsys, "register", "--fixed", image, "--moving", image, "--preset", "rigid",
                     "--output-transform", tmp_path / "t.h5", "--inverse-transform", tmp_path / "t.h5")  # fmt: skip
    assert code == 1 and "twice" in err


def test_json_failure_is_one_json_object(tmp_path, capsys, sphere_model, image, user_folder):
    code = cli.main(["segment", "--model", str(sphere_model.parent), "--input", str(image), "--output",
                     str(user_folder), "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and json.loads(out)["ok"] is False
    assert np.isfinite(len(out))
