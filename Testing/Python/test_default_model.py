"""The default model that ships with DeepSeg (Resources/models/deepseg-brain): found through the model store,
checksums verified, and it finds the brain on the MNI152 template through the normal pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from DeepSegModuleLib import cli
from DeepSegModuleLib.models.store import DEFAULT_MODEL_ID, ModelStore
from DeepSegModuleLib.models.torchscript import load_torchscript_model
from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment


@pytest.fixture(autouse=True)
def own_model_store(tmp_path, monkeypatch):
    """The user's store is empty and private to the test; the bundled models are what is found."""
    monkeypatch.setenv("DEEPSEG_MODEL_DIR", str(tmp_path / "user-store"))


@pytest.fixture(scope="module")
def default_model():
    store = ModelStore()
    assert DEFAULT_MODEL_ID in store.bundled_ids(), "Resources/models/deepseg-brain is missing"
    stored = store.verify(DEFAULT_MODEL_ID)  # every file's sha256 against the committed manifest
    return load_torchscript_model(stored.model_path)


@pytest.fixture(scope="module")
def template_2mm():
    """The MNI152 2009 T1 at 2 mm as nilearn ships it, with its own brain mask and tissue maps, (k, j, i)."""
    datasets = pytest.importorskip("nilearn.datasets")

    def array(image):
        return np.asarray(image.get_fdata(), np.float32).transpose(2, 1, 0).copy()

    t1 = datasets.load_mni152_template(resolution=2)
    return {
        "volume": VolumeArray(array(t1), np.asarray(t1.affine, np.float64)),
        "brain": array(datasets.load_mni152_brain_mask(resolution=2)) > 0.5,
        "grey matter": array(datasets.load_mni152_gm_template(resolution=2)),
        "white matter": array(datasets.load_mni152_wm_template(resolution=2)),
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_the_default_model_is_bundled_verified_and_described(default_model):
    description = default_model.description
    assert [(label.value, label.name) for label in description.labels] == [
        (1, "cerebrospinal fluid"),
        (2, "grey matter"),
        (3, "white matter"),
    ]
    assert all("SCT^" in label.terminology for label in description.labels)
    card = json.loads(next(ModelStore().get(DEFAULT_MODEL_ID).path.glob("deepseg.json")).read_text())
    assert "not for clinical use" in card["description"]
    # The card reports what was measured on real scans, not a placeholder.
    assert "mr_brain_seg3d T1" in card["description"] and "not measured" not in card["description"]
    assert card["spacing"] == [2.0, 2.0, 2.0]


def test_the_default_model_finds_the_brain_of_the_template(default_model, template_2mm):
    result = segment(template_2mm["volume"], default_model, SegmentationOptions(device="cpu"))
    labels = result.labels
    assert labels.shape == template_2mm["brain"].shape
    assert dice(labels > 0, template_2mm["brain"]) >= 0.9
    # The tissues are told apart by what they look like: on this T1, white matter is brighter than grey matter,
    # and grey matter brighter than CSF.
    t1 = template_2mm["volume"].array
    csf, grey, white = (np.median(t1[labels == value]) for value in (1, 2, 3))
    assert white > grey > csf


def test_every_file_of_the_bundled_model_is_packaged_with_the_extension():
    from extension_checks import MODULE_DIR, listed_resources

    folder = ModelStore().get(DEFAULT_MODEL_ID).path
    shipped = {f"models/{DEFAULT_MODEL_ID}/{path.name}" for path in folder.iterdir() if path.is_file()}
    assert shipped <= set(listed_resources(MODULE_DIR))


def test_segment_without_a_model_runs_the_default_model(template_2mm, tmp_path, capsys):
    import nibabel

    image = tmp_path / "t1.nii.gz"
    volume = template_2mm["volume"]
    nibabel.save(nibabel.Nifti1Image(volume.array.transpose(2, 1, 0), volume.ijk_to_ras), str(image))
    output = tmp_path / "tissues.nii.gz"
    assert cli.main(["segment", "--input", str(image), "--output", str(output), "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"].endswith(DEFAULT_MODEL_ID)
    assert set(summary["segments_ml"]) == {"cerebrospinal fluid", "grey matter", "white matter"}
    labels = np.asarray(nibabel.load(str(output)).dataobj).transpose(2, 1, 0)
    assert dice(labels > 0, template_2mm["brain"]) >= 0.9


def test_the_bundled_model_is_listed_and_cannot_be_removed(capsys):
    assert cli.main(["models", "list", "--json"]) == 0
    entries = {entry["id"]: entry for entry in json.loads(capsys.readouterr().out)["models"]}
    assert entries[DEFAULT_MODEL_ID]["bundled"] and entries[DEFAULT_MODEL_ID]["default"]
    assert cli.main(["models", "remove", DEFAULT_MODEL_ID]) != 0
    assert "cannot be removed" in capsys.readouterr().err
    assert DEFAULT_MODEL_ID in ModelStore().list_ids()


SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _segment_warnings(capsys, path: Path, tmp_path: Path) -> list[str]:
    from DeepSegModuleLib import cli

    code = cli.main(["segment", "-i", str(path), "-o", str(tmp_path / f"{path.name}.seg.nrrd"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    return [line for line in err.splitlines() if line.startswith("deepseg: warning:")]


def test_the_brain_model_warns_on_a_body_ct_and_not_on_a_head(tmp_path, capsys):
    """Out-of-distribution input gets a warning from the card's expectations, on synthetic data always and on
    the real abdominal CT and head MRIs in shared/ when they are there."""
    import nibabel

    body = np.full((120, 100, 30), -1000.0, np.float32)
    body[20:100, 15:85, :] = 40.0  # a 3 mm CT of a body: air around soft tissue, 360 x 300 mm
    body_path = tmp_path / "body_ct.nii.gz"
    nibabel.save(nibabel.Nifti1Image(body, np.diag([3.0, 3.0, 3.0, 1.0])), str(body_path))
    warnings = _segment_warnings(capsys, body_path, tmp_path)
    assert any("looks like a CT" in w for w in warnings) and any("spans 360 x 300 x 90 mm" in w for w in warnings)
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout: the real-scan half of this test needs it")
    ct = _segment_warnings(capsys, SHARED_DATA / "ct_abdomen_small" / "example_ct_sm.nii.gz", tmp_path)
    assert len(ct) == 2
    for head in ("mr_brain_seg3d/MR.nii.gz", "mr_stroke/FLAIR.nii.gz", "ct_head_avm/CT_AVM.nii.gz"):
        assert _segment_warnings(capsys, SHARED_DATA / head, tmp_path) == [], head
