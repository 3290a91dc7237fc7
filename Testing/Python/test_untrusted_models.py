"""The model store as an attacker and a careless user meet it: names, imports, damage, races, archives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from DeepSegModuleLib import cli
from DeepSegModuleLib.models import ModelError, ModelFileError, UnsafeArchiveError
from DeepSegModuleLib.models.archive import safe_extract_zip
from DeepSegModuleLib.models.store import ModelStore, model_argument
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segmentation_helpers import Thresholder, write_torchscript_model


@pytest.fixture
def store(tmp_path, monkeypatch) -> ModelStore:
    root = tmp_path / "store"
    monkeypatch.setenv("DEEPSEG_MODEL_DIR", str(root))
    return ModelStore(root)


@pytest.fixture(scope="module")
def sphere_card(tmp_path_factory) -> Path:
    return write_torchscript_model(tmp_path_factory.mktemp("model") / "sphere", Thresholder())


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_folder_here_with_a_stored_models_name_is_refused_naming_both(store, sphere_card, tmp_path, monkeypatch):
    store.import_model(sphere_card.parent, model_id="brain")
    impostor = tmp_path / "work" / "brain"
    impostor.mkdir(parents=True)
    (impostor / "deepseg.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ModelFileError, match=r"names both the stored model 'brain' and .*work/brain"):
        model_argument("brain", store)
    assert model_argument("./brain", store) == ("path", Path("./brain"))
    monkeypatch.chdir(tmp_path)
    assert model_argument("brain", store) == ("store", "brain")


def test_import_refuses_what_is_not_a_model_and_stores_nothing(store, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for source in (text, "file:///etc/passwd"):
        code, _, err = _run(capsys, "models", "import", source, "--name", "x")
        assert code == 1 and "deepseg: error" in err
    assert store.list_ids() == [i for i in store.list_ids() if i != "x"]
    assert not (store.root / "x").exists()


def test_ids_are_matched_whole(store, sphere_card):
    for bad in ("brain\n", "../brain", ".hidden", "a/b", "x" * 129):
        with pytest.raises(ValueError):
            store.import_model(sphere_card.parent, model_id=bad)


def test_one_damaged_entry_is_reported_and_the_rest_still_list(store, sphere_card, capsys):
    store.import_model(sphere_card.parent, model_id="good")
    store.import_model(sphere_card.parent, model_id="bad")
    (store.root / "bad" / "manifest.json").write_text("{ damaged")
    code, out, _ = _run(capsys, "models", "list", "--json")
    assert code == 0
    entries = {entry["id"]: entry for entry in json.loads(out)["models"]}
    assert "damaged" in entries["bad"] and entries["good"]["path"].endswith("good")


def test_concurrent_imports_of_one_name_install_exactly_one(store, sphere_card, tmp_path):
    env = {**os.environ, "DEEPSEG_MODEL_DIR": str(store.root), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "DeepSegModuleLib.cli", "models", "import", str(sphere_card.parent),
               "--name", "raced", "--json"]  # fmt: skip
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]  # fmt: skip
    answers = [json.loads(p.communicate(timeout=120)[0]) for p in processes]
    assert sum(answer["ok"] for answer in answers) == 1
    assert all("already stored" in answer["error"] for answer in answers if not answer["ok"])
    store.verify("raced")
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".import")] == []


def test_a_bundle_that_needs_its_own_code_is_stored_marked(store, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "net.py").write_text("raise SystemExit('never imported untrusted')\n")
    (bundle / "models" / "model.pt").write_bytes(b"")
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "scripts.net.Net"},
        "preprocessing": {"_target_": "Compose", "transforms": []}}))  # fmt: skip
    stored = store.import_model(bundle, model_id="needs-code")
    assert any("scripts.net.Net" in finding for finding in stored.needs_trust)
    assert store.get("needs-code").needs_trust == stored.needs_trust


def _zip(path: Path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    bomb = _zip(tmp_path / "bomb.zip", {"weights.bin": b"\0" * (64 << 20)})
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setenv("DEEPSEG_MAX_UNPACKED_BYTES", str(16 << 20))
    with pytest.raises(UnsafeArchiveError, match="DEEPSEG_MAX_UNPACKED_BYTES"):
        safe_extract_zip(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4), cut=st.integers(0, 400))
def test_fuzzed_archives_extract_inside_or_raise_deepseg_errors(tmp_path, names, cut):
    work = tmp_path / "fuzz"
    work.mkdir(exist_ok=True)
    outside_before = sorted(os.listdir(tmp_path))
    try:
        archive = _zip(work / "a.zip", {name: b"x" * 10 for name in names})
    except (ValueError, UnicodeEncodeError, IndexError):  # names zipfile itself cannot write
        return
    data = archive.read_bytes()
    archive.write_bytes(data[: max(cut, 1)] if cut < len(data) else data)
    destination = work / "out"
    try:
        safe_extract_zip(archive, destination)
    except ModelError:
        pass
    else:
        for path in destination.rglob("*"):
            assert destination.resolve() in path.resolve().parents
    finally:
        import shutil

        shutil.rmtree(destination, ignore_errors=True)
        archive.unlink(missing_ok=True)
    assert sorted(os.listdir(tmp_path)) == outside_before


def test_an_archive_that_inflates_a_hundredfold_is_refused_at_default_limits(tmp_path):
    bomb = _zip(tmp_path / "model.zip", {"model.pt": b"\0" * (100 << 20)})
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UnsafeArchiveError, match="DEEPSEG_MAX_COMPRESSION_RATIO"):
        safe_extract_zip(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_pickle_with_code_is_refused_without_torchs_advice_to_load_it_unsafely(tmp_path):
    import pickle

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'canary'}",))

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                        "channels": [4, 8], "strides": [2]},
        "preprocessing": {"_target_": "Compose", "transforms": []}}))  # fmt: skip
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {"pred": {
        "channel_def": {"0": "background", "1": "organ"}}}}}))  # fmt: skip
    torch.save({"model": Payload()}, bundle / "models" / "model.pt", pickle_module=pickle)
    from DeepSegModuleLib.models import load_model

    with pytest.raises(ModelError) as caught:
        load_model(bundle)
    assert "weights_only=False" not in str(caught.value) and "trust the source" not in str(caught.value)
    assert not (tmp_path / "canary").exists()
