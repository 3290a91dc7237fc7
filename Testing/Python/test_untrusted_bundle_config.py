"""A hostile MONAI bundle config runs no code and touches no file: every route that ran code before is a test.

Each payload tries to create a canary file; the test fails if it appears. The idioms real model-zoo bundles
use must still evaluate to what MONAI's own parser gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from DeepSegModuleLib.models import ModelFormatError, load_model
from DeepSegModuleLib.models.bundle_config import SafeBundleConfig, UntrustedCodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
           "strides": [2], "num_res_units": 0}  # fmt: skip
PREPROCESSING = {"_target_": "Compose", "transforms": [
    {"_target_": "LoadImaged", "keys": "image", "reader": "ITKReader"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "ScaleIntensityd", "keys": "image"},
]}  # fmt: skip
METADATA = {"name": "hostile", "network_data_format": {
    "inputs": {"image": {"modality": "CT", "num_channels": 1, "spatial_shape": [16, 16, 16]}},
    "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "organ"}}}}}  # fmt: skip


def _config(**extra) -> dict:
    return {"network_def": dict(NETWORK), "preprocessing": json.loads(json.dumps(PREPROCESSING)),
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16]}, **extra}  # fmt: skip


def _bundle(root: Path, config: dict, metadata: dict | None = None) -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata or METADATA))
    from monai.networks.nets import UNet

    torch.save(UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"}).state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture
def canary(tmp_path) -> Path:
    return tmp_path / "canary"


def _payload(canary: Path) -> str:
    return f"__import__('os').system('touch {canary}')"


def _attacks(canary: Path, outside: Path) -> dict[str, tuple[dict, dict | None]]:
    shell = _payload(canary)
    if outside.is_dir():
        (outside / "evil.json").write_text(json.dumps({"net": f"${shell}"}))
    victim = outside / "victim.txt"
    net = dict(NETWORK)
    return {
        "reference to an expression": (_config(evil=f"${shell}", network_def={**net, "channels": "@evil"}), None),
        "expression reference": (_config(evil=f"${shell}", network_def={**net, "channels": "$@evil"}), None),
        "macro in the same file": (_config(evil=f"${shell}", network_def={**net, "channels": "%evil"}), None),
        "macro from a file outside the bundle": (_config(network_def={**net, "channels": f"%{outside}/evil.json::net"}),
                                                 None),  # fmt: skip
        "_requires_": (_config(evil=f"${shell}", network_def={**net, "_requires_": "@evil"}), None),
        "metadata expression": (_config(network_def={**net, "channels": "@_meta_#evil"}), {**METADATA,
                                                                                             "evil": f"${shell}"}),
        "dict as _target_": (_config(network_def={"_target_": {"_target_": "monai.utils.module.locate",
                                                               "path": "os.system"}, "command": f"touch {canary}"}),
                             None),  # fmt: skip
        "computed _target_": (_config(network_def={"_target_": "$os.system", "command": f"touch {canary}"}), None),
        "os.system as _target_": (_config(network_def={"_target_": "os.system", "command": f"touch {canary}"}), None),
        "locate as _target_": (_config(network_def={"_target_": "monai.utils.module.locate", "path": "os.system"}),
                               None),  # fmt: skip
        "torch.hub.load": (_config(network_def={"_target_": "torch.hub.load", "repo_or_dir": str(outside),
                                                "model": "x", "source": "local"}), None),  # fmt: skip
        "torch.save over a file": (_config(x={"_target_": "torch.save", "obj": 1, "f": str(canary)},
                                           network_def={**net, "_requires_": "@x"}), None),  # fmt: skip
        "torch.hub.download_url_to_file": (_config(network_def={**net, "channels": "$torch.hub.download_url_to_file("
                                                   f"'file://{victim}', '{canary}') or [4, 8]"}), None),  # fmt: skip
        "dunder escape": (_config(network_def={**net, "channels": "$().__class__.__bases__[0].__subclasses__()"}),
                          None),  # fmt: skip
        "getattr escape": (_config(network_def={**net, "channels": "$getattr(torch, 'save')(1, '" + str(canary) +
                                                "')"}), None),  # fmt: skip
        "lambda globals": (_config(network_def={**net, "channels": "$(lambda: 0).__globals__"}), None),
        "format attribute walk": (_config(network_def={**net, "channels": "$'{0.__class__}'.format(1)"}), None),
        "module reached through torch": (_config(network_def={**net, "channels": f"$torch.os.system('touch {canary}')"}),
                                         None),  # fmt: skip
        "locate through monai": (_config(network_def={**net, "channels": "$monai.utils.module.locate('os.system')"
                                                      f"('touch {canary}')"}), None),  # fmt: skip
        "numpy file write": (_config(network_def={**net, "channels": f"$numpy.save('{canary}', [1])"}), None),
        "torch.from_file": (_config(network_def={**net, "channels": f"$torch.from_file('{canary}', True, 8)"}), None),
        "import statement": (_config(network_def={**net, "channels": "$import os"}), None),
        "open()": (_config(network_def={**net, "channels": f"$open('{canary}', 'w')"}), None),
        "pathlib outside the bundle": (_config(network_def={**net, "channels": f"$pathlib.Path('{victim}').read_text()"}),
                                       None),  # fmt: skip
        "torch.load outside the bundle": (_config(network_def={**net, "channels": f"$torch.load('{victim}')"}), None),
        "pretrained download": (_config(network_def={"_target_": "FlexibleUNet", "in_channels": 1, "out_channels": 2,
                                                     "backbone": "efficientnet-b0", "pretrained": True}), None),
        "pretrained download, positional": (_config(network_def="$monai.networks.nets.FlexibleUNet(1, 2, "
                                                    "'efficientnet-b0', True)"), None),  # fmt: skip
        "file reader transform built": (_config(preprocessing={"_target_": "Compose", "transforms": [
            {"_target_": "LoadImage", "reader": "$os.system('touch " + str(canary) + "')"}]}), None),  # fmt: skip
    }


ATTACK_NAMES = list(_attacks(Path("/c"), Path("/o")))


@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_hostile_config_runs_nothing_and_says_so(attack, tmp_path, canary):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("the user's file")
    config, metadata = _attacks(canary, outside)[attack]
    bundle = _bundle(tmp_path / "bundle", config, metadata)
    try:
        load_model(bundle)
    except ModelFormatError as error:
        assert "\n" not in str(error).strip()
    # A file-reading transform is dropped unbuilt (the volume is handed over in memory), so that case loads.
    assert not canary.exists(), f"{attack}: the payload ran"
    assert (outside / "victim.txt").read_text() == "the user's file"


def test_untrusted_error_names_what_would_run_and_how_to_allow_it(tmp_path):
    config = _config(network_def={"_target_": "scripts.networks.Net", "channels": "$import os"})
    with pytest.raises(UntrustedCodeError, match=r"scripts\.networks\.Net.*--trust-code"):
        load_model(_bundle(tmp_path / "b", config))


def _resolve(expression: str, tmp_path: Path, **config):
    safe = SafeBundleConfig({"x": expression, **config}, METADATA, tmp_path, {"bundle_root": str(tmp_path)})
    return safe.resolve("x")


@pytest.mark.parametrize(
    ("expression", "config", "expected"),
    [
        ("$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')", {},
         torch.device("cuda:0" if torch.cuda.is_available() else "cpu")),
        ("$torch.float32", {}, torch.float32),
        ("$None", {}, None),
        ("$len(@label_names) + @number_intensity_ch", {"label_names": {"a": 1, "b": 2}, "number_intensity_ch": 1}, 3),
        ("$@a + @b", {"a": [1], "b": [2]}, [1, 2]),
        ("$[1.5, 1.5, 1.5] if @x2 else [3.0, 3.0, 3.0]", {"x2": False}, [3.0, 3.0, 3.0]),
        ("$list(range(33, 36)) + [114]", {}, [33, 34, 35, 114]),
        ("$list(set([i+1 for i in range(4)]) - set([2]))", {}, [1, 3, 4]),
        ("$@bundle_root + '/models/model.pt'", {}, None),  # checked below
        ("$int(@sw_batch_size)", {"sw_batch_size": "4"}, 4),
        ("$float(@displayable_configs::sw_overlap)", {"displayable_configs": {"sw_overlap": 0.625}}, 0.625),
        ("@nested#deep", {"nested": {"deep": "$1 + 1"}}, 2),
        ("$f'{1 + 1:03d}'", {}, "002"),
    ],
)
def test_real_bundle_idioms_evaluate_as_monai_does(expression, config, expected, tmp_path):
    value = _resolve(expression, tmp_path, **config)
    if "bundle_root" in expression:
        assert value == str(tmp_path) + "/models/model.pt"
    else:
        assert value == expected


def test_lambda_with_torch_where_runs_through_the_interpreter(tmp_path):
    function = _resolve("$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, "
                        "2, 0)))", tmp_path)  # fmt: skip
    channels = torch.zeros(3, 2)
    channels[2, 0] = 1
    channels[0, 1] = 1
    assert function(channels).tolist() == [[4, 1]]


def test_network_expression_and_relative_references(tmp_path):
    config = {"input_channels": 1, "net": {"inner": {"a": 2, "b": "@::a"}},
              "network_def": "$monai.networks.nets.UNet(spatial_dims=3, in_channels=@input_channels, out_channels=2, "
                             "channels=[4, 8], strides=[2])"}  # fmt: skip
    safe = SafeBundleConfig(config, {}, tmp_path, {})
    assert safe.resolve("net::inner::b") == 2
    assert type(safe.resolve("network_def")).__name__ == "UNet"


def test_torchscript_inside_the_bundle_loads_through_the_check(tmp_path):
    network = torch.jit.script(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1)))
    (tmp_path / "models").mkdir()
    torch.jit.save(network, tmp_path / "models" / "model.ts")
    loaded = _resolve("$torch.jit.load(@bundle_root + '/models/model.ts')", tmp_path)
    assert loaded(torch.ones(1, 1, 2, 2, 2)).shape == (1, 2, 2, 2, 2)
    with pytest.raises(UntrustedCodeError, match="outside the bundle"):
        _resolve("$torch.jit.load('/etc/passwd')", tmp_path)


@pytest.mark.parametrize("expression", ["$10**10**10", "$[0] * 10**9", "$list(range(10**9))", "$'a' * 10**9",
                                        "$1 << 10**9", "$[[i for i in range(3000)] for j in range(3000)]"])
def test_expressions_that_would_exhaust_the_machine_are_refused(expression, tmp_path):
    with pytest.raises(ModelFormatError):
        _resolve(expression, tmp_path)


def test_circular_references_are_an_error_not_a_hang(tmp_path):
    with pytest.raises(ModelFormatError, match="circular"):
        SafeBundleConfig({"a": "@b", "b": "$@a"}, {}, tmp_path, {}).resolve("a")


_TOKENS = ["torch", "monai", "numpy", "os", "json", "copy", "pathlib", ".", "(", ")", "[", "]", "'", ",", "_", "__",
           "class", "system", "save", "load", "hub", "jit", "from_file", "import", "lambda x:", "x", "1", "'/tmp'",
           "@a", "getattr", "open", "eval", "exec", "globals", "__builtins__", "subclasses", "+", "*", "**", " if ",
           " else ", "for", " in ", ":", "f'{", "}'", "format", "mro", "locate", "utils", "module"]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=14))
def test_fuzzed_expressions_raise_only_deepseg_errors_and_run_nothing(tmp_path, tokens):
    canary = tmp_path / "canary"
    before = set(os.listdir(tmp_path))
    expression = "$" + "".join(tokens).replace("'/tmp'", repr(str(canary)))
    try:
        SafeBundleConfig({"x": expression, "a": [1]}, {}, tmp_path, {}).resolve("x")
    except ModelFormatError:
        pass
    assert not canary.exists()
    assert set(os.listdir(tmp_path)) == before


def test_a_file_reader_keyed_by_reference_gives_the_image_key(tmp_path):
    config = {"image_key": "ct", "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key", "reader": "ITKReader"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"}]}}  # fmt: skip
    safe = SafeBundleConfig(config, {}, tmp_path, {})
    preprocessing = safe.resolve("preprocessing")
    assert [c.keys for c in safe.io_components] == [("ct",)]
    assert [type(t).__name__ for t in preprocessing.transforms] == ["EnsureChannelFirstd"]


def test_a_lambda_keeps_working_call_after_call(tmp_path, monkeypatch):
    from DeepSegModuleLib.models import bundle_expressions

    monkeypatch.setattr(bundle_expressions, "MAX_EVALUATION_STEPS", 500)
    function = _resolve("$lambda x: sum([i for i in range(20)]) + x", tmp_path)
    assert [function(i) for i in range(100)][-1] == 190 + 99


def test_macros_copy_config_content_like_monai(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "common.json").write_text(json.dumps({"net": {"channels": [4, 8]}}))
    config = {"base": {"spacing": [1.5, 1.5, 2.0]}, "x": "%base::spacing", "y": "%configs/common.json::net",
              "z": {"inner": "%::::x"}}  # fmt: skip
    safe = SafeBundleConfig(config, {}, tmp_path, {})
    assert safe.resolve("x") == [1.5, 1.5, 2.0]
    assert safe.resolve("y") == {"channels": [4, 8]}
    assert safe.resolve("z::inner") == [1.5, 1.5, 2.0]
    from monai.bundle import ConfigParser

    parser = ConfigParser({"base": config["base"], "x": config["x"]})
    assert parser.get_parsed_content("x") == safe.resolve("x")


def test_circular_macros_are_an_error_not_a_hang(tmp_path):
    with pytest.raises(ModelFormatError, match="nest too deep"):
        SafeBundleConfig({"a": "%b", "b": "%a"}, {}, tmp_path, {})


@pytest.mark.parametrize("network", [
    {"_target_": "FlexibleUNet", "in_channels": 1, "out_channels": 2, "backbone": "efficientnet-b0", "pretrained": True},
    "$monai.networks.nets.FlexibleUNet(1, 2, 'efficientnet-b0', True)",
])  # fmt: skip
def test_downloading_weights_is_refused_before_the_network_is_built(network, tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("a download started"))
    with pytest.raises(UntrustedCodeError, match="download"):
        SafeBundleConfig({"net": network}, {}, tmp_path, {}).resolve("net")


def test_every_allowed_argument_that_sounds_like_io_is_guarded_or_reviewed():
    """A new MONAI version may give an allowed class a 'weights_url' or 'cache_dir': the allow-list must then
    be reviewed, and this test says so."""
    import inspect
    import re

    from DeepSegModuleLib.models import bundle_allowlist as allow
    from DeepSegModuleLib.models.bundle_expressions import allowed_names

    sounds_like_io = re.compile(r"pretrain|download|url|path|file|reader|writer|dir$|save|load|progress|hub|cache")
    unreviewed = {}
    for name, target in allowed_names()[0].items():
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):
            continue
        found = {p for p in parameters if sounds_like_io.search(p)} - allow.FALSE_ONLY_ARGUMENTS - allow.REVIEWED_ARGUMENTS
        if found:
            unreviewed[name] = sorted(found)
    assert unreviewed == {}
