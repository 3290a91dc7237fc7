"""A hostile TorchScript file reads, writes and creates nothing: it is refused before torch.jit.load runs it.

The payloads are real TorchScript: ``__setstate__`` runs during ``torch.jit.load`` and can call
``torch.from_file(path, shared=True)``, which maps any file into a tensor that can then be read or overwritten.
Each test first proves the payload works on an unchecked ``torch.jit.load``, then that every DeepSeg loading
path (card + TorchScript, bundle ``model.ts``, bundle ``$torch.jit.load``, the registration initialiser) refuses
it and leaves the victim file byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepSegModuleLib.models import ModelError, load_model
from DeepSegModuleLib.models.torchscript_check import UnsafeTorchScriptError, check_torchscript
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HOSTILE_SOURCE = '''
import torch


class Overwrite(torch.nn.Module):
    """Maps the victim file and overwrites its first bytes while it is being loaded."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        return torch.cat([x, -x], 1)

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        self.path = state[0]
        mapped = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
        mapped.fill_(65)
        # used, so that the compiler keeps the call
        self.training = state[1] and bool(mapped.sum() > 0)


class ReadInForward(torch.nn.Module):
    """Returns the victim's bytes as its output, a leak into the segmentation."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        leaked = torch.from_file(self.path, shared=False, size=4, dtype=torch.uint8)
        return x + leaked.float().sum()
'''


@pytest.fixture(scope="module")
def hostile_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_source")
    source = folder / "hostile_networks.py"
    source.write_text(textwrap.dedent(HOSTILE_SOURCE))
    spec = importlib.util.spec_from_file_location("hostile_networks", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "patient_notes.txt"
    path.write_text("confidential: do not change")
    return path


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_the_payload_is_real_on_an_unchecked_load(hostile_module, victim, tmp_path):
    archive = _save(hostile_module.Overwrite(str(victim)), tmp_path / "evil.ts")
    victim.write_text("confidential: do not change")
    torch.jit.load(str(archive))
    assert victim.read_text().startswith("AAAA")


def _card(folder: Path, weights: str) -> Path:
    card = {"deepseg_model_card": 1, "name": "evil", "weights": weights, "patch_size": [8, 8, 8],
            "inputs": [{"name": "CT"}], "labels": [{"value": 1, "name": "organ"}]}  # fmt: skip
    (folder / "deepseg.json").write_text(json.dumps(card))
    return folder / "deepseg.json"


@pytest.mark.parametrize("network", ["Overwrite", "ReadInForward"])
def test_model_card_torchscript_is_refused_and_the_victim_untouched(network, hostile_module, victim, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    _save(getattr(hostile_module, network)(str(victim)), folder / "net.ts")
    victim.write_text("confidential: do not change")
    before = _digest(victim)
    _card(folder, "net.ts")
    with pytest.raises(UnsafeTorchScriptError, match="from_file"):
        load_model(folder)
    assert _digest(victim) == before


def test_bundle_model_ts_is_refused(hostile_module, victim, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    _save(hostile_module.Overwrite(str(victim)), bundle / "models" / "model.ts")
    victim.write_text("confidential: do not change")
    before = _digest(victim)
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                        "channels": [4, 8], "strides": [2]},
        "preprocessing": {"_target_": "Compose", "transforms": [{"_target_": "EnsureChannelFirstd", "keys": "image"}]},
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts')",
    }))  # fmt: skip
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {"pred": {
        "channel_def": {"0": "background", "1": "organ"}}}}}))  # fmt: skip
    with pytest.raises(UnsafeTorchScriptError):
        load_model(bundle)
    from DeepSegModuleLib.models.bundle_config import SafeBundleConfig, read_bundle_config

    config = SafeBundleConfig(read_bundle_config(bundle / "configs" / "inference.json"), {}, bundle, {"bundle_root": str(bundle)})
    with pytest.raises(UnsafeTorchScriptError):
        config.resolve("network")
    assert _digest(victim) == before


def test_registration_initialiser_is_checked(hostile_module, victim, tmp_path):
    from DeepSegModuleLib.registration import register

    archive = _save(hostile_module.Overwrite(str(victim)), tmp_path / "init.ts")
    victim.write_text("confidential: do not change")
    before = _digest(victim)
    image = np.zeros((16, 16, 16), np.float32)
    image[4:12, 4:12, 4:12] = 1
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    with pytest.raises(UnsafeTorchScriptError, match="from_file"):
        register(image, grid, image, grid, "deformable fast", initializer=str(archive), device="cpu",
                 initializer_input_shape=(8, 8, 8))
    assert _digest(victim) == before


def test_real_networks_pass_the_check(tmp_path):
    from monai.networks.nets import UNet

    scripted = _save(UNet(3, 1, 2, (4, 8), (2,), num_res_units=1), tmp_path / "unet.ts")
    check_torchscript(scripted)
    traced = torch.jit.trace(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2),
                                                 torch.nn.LeakyReLU()), torch.ones(1, 1, 8, 8, 8))  # fmt: skip
    torch.jit.save(traced, str(tmp_path / "traced.ts"))
    check_torchscript(tmp_path / "traced.ts")
    for shipped in Path(__file__).resolve().parents[2].glob("Resources/**/*.ts"):
        check_torchscript(shipped)


def test_not_torchscript_is_a_clear_error(tmp_path):
    text = tmp_path / "net.ts"
    text.write_text("not a model")
    with pytest.raises(ModelError, match="not a readable TorchScript archive"):
        check_torchscript(text)


def _rewrite_code(archive: Path, target: Path, replace: tuple[str, str]) -> Path:
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as sink:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith(".py"):
                data = data.decode().replace(*replace).encode()
            sink.writestr(item, data)
    return target


@pytest.mark.parametrize(
    "call",
    ["torch.from_file('/etc/passwd', False, 4)", "ops.aten.from_file('/etc/passwd')", "torch.ops.custom.run(x)",
     "torch.classes.evil.Run()", "getattr(torch, 'from_file')('/x')", "x.set_(x)", "print(x)", "torch.save(x)"],
)  # fmt: skip
def test_each_refused_operator_stops_the_load(call, tmp_path):
    network = torch.jit.script(torch.nn.Sequential(torch.nn.ReLU()))
    torch.jit.save(network, str(tmp_path / "plain.ts"))
    edited = _rewrite_code(tmp_path / "plain.ts", tmp_path / "edited.ts", ("torch.relu(", f"({call}) or torch.relu("))
    with pytest.raises(UnsafeTorchScriptError):
        check_torchscript(edited)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=400), st.integers(min_value=0, max_value=4000))
def test_fuzzed_archives_only_raise_deepseg_errors(tmp_path, noise, cut):
    network = torch.jit.script(torch.nn.Sequential(torch.nn.ReLU()))
    torch.jit.save(network, str(tmp_path / "plain.ts"))
    data = (tmp_path / "plain.ts").read_bytes()
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(data[:cut] + noise + data[cut + len(noise):])
    try:
        check_torchscript(damaged)
    except ModelError:
        pass  # refused with DeepSeg's own error; anything else fails the test
