"""Malformed and hostile model descriptions (DeepSeg model cards, nnU-Net plans.json/dataset.json): DeepSeg's own
error naming the field, never a raw Python error, an import of something not on the allow-list, or an abort."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from DeepSegModuleLib.models import ModelError, ModelFormatError, load_model
from DeepSegModuleLib.models.torchscript import parse_card
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nnunet_helpers import DATASET, plans, train_tiny_network, write_nnunet_folder

CARD = {"deepseg_model_card": 1, "name": "x", "inputs": [{"name": "CT", "normalization": {"mode": "none"}}],
        "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "overlap": 0.25,
        "labels": [{"value": 1, "name": "organ", "color": [1, 0, 0]}]}  # fmt: skip

_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                  st.text(max_size=12), st.lists(st.integers(-5, 10**9), max_size=5),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))  # fmt: skip


def _mutate(document: dict, paths: list[tuple], values: list) -> dict:
    mutated = copy.deepcopy(document)
    for path, value in zip(paths, values):
        node = mutated
        for key in path[:-1]:
            node = node[key] if isinstance(node, dict) else node[int(key)]
        if value == "__delete__" and isinstance(node, dict):
            node.pop(path[-1], None)
        elif isinstance(node, dict):
            node[path[-1]] = value
        else:
            node[int(path[-1])] = value
    return mutated


def _leaf_paths(document, prefix=()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            paths += _leaf_paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += _leaf_paths(value, (*prefix, index))
    return paths


CARD_PATHS = _leaf_paths(CARD)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(CARD_PATHS), st.one_of(_JUNK, st.just("__delete__"))), min_size=1,
                max_size=4))  # fmt: skip
def test_fuzzed_model_cards_raise_only_deepseg_errors(changes):
    try:
        card = _mutate(CARD, [path for path, _ in changes], [value for _, value in changes])
    except (KeyError, IndexError, TypeError, ValueError):  # a later change inside what an earlier one replaced
        return
    try:
        parse_card(card, "fuzzed card")
    except ModelFormatError as error:
        assert "fuzzed card" in str(error)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("patch_size", [10**9, 10**9, 10**9], "patch_size"),
    ("patch_size", "big", "patch_size"),
    ("inputs", [42], "inputs"),
    ("labels", [{"value": -3, "name": "x"}], "value"),
    ("overlap", 7, "overlap"),
    ("spacing", [0, 1, 1], "spacing"),
])  # fmt: skip
def test_card_errors_name_the_field(field, value, message):
    with pytest.raises(ModelFormatError, match=message):
        parse_card({**CARD, field: value}, "card")


@pytest.fixture(scope="module")
def nnunet_model(tmp_path_factory):
    return write_nnunet_folder(tmp_path_factory.mktemp("nnunet"), train_tiny_network(steps=1))


def _copy_with(folder: Path, target: Path, plans_change=None, dataset_change=None) -> Path:
    import shutil

    shutil.copytree(folder, target)
    for name, change in (("plans.json", plans_change), ("dataset.json", dataset_change)):
        if change is not None:
            document = json.loads((target / name).read_text())
            (target / name).write_text(json.dumps(change(document)))
    return target


@pytest.mark.parametrize(("path", "value", "message"), [
    (("configurations", "3d_fullres", "architecture", "network_class_name"), "os.system", "not one DeepSeg builds"),
    (("configurations", "3d_fullres", "architecture", "network_class_name"),
     "dynamic_network_architectures.architectures.primus.Primus", "not one DeepSeg builds"),
    (("configurations", "3d_fullres", "architecture", "arch_kwargs", "conv_op"), "torch.nn.modules.module.Module",
     "not one DeepSeg builds"),
    (("configurations", "3d_fullres", "architecture", "arch_kwargs", "features_per_stage"), [10**7, 10**7],
     "features_per_stage"),
    (("configurations", "3d_fullres", "architecture", "arch_kwargs", "n_stages"), 10**6, "n_stages"),
    (("configurations", "3d_fullres", "patch_size"), [10**6, 10**6, 10**6], "patch_size"),
    (("configurations", "3d_fullres", "inherits_from"), "3d_fullres", "circle"),
    (("transpose_forward",), [0, 0, 1], "permutation"),
    (("foreground_intensity_properties_per_channel", "0", "mean"), "NaN", "must be a number"),
])  # fmt: skip
def test_hostile_plans_are_refused_naming_the_field(path, value, message, nnunet_model, tmp_path):
    def change(document):
        return _mutate(document, [path], [value])

    folder = _copy_with(nnunet_model, tmp_path / nnunet_model.name, plans_change=change)
    with pytest.raises(ModelFormatError, match=message):
        load_model(folder)


PLANS_PATHS = _leaf_paths(plans())
DATASET_PATHS = _leaf_paths(DATASET)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan_changes=st.lists(st.tuples(st.sampled_from(PLANS_PATHS), st.one_of(_JUNK, st.just("__delete__"))),
                             max_size=3),
       dataset_changes=st.lists(st.tuples(st.sampled_from(DATASET_PATHS), st.one_of(_JUNK, st.just("__delete__"))),
                                max_size=2))  # fmt: skip
def test_fuzzed_nnunet_plans_raise_only_deepseg_errors(nnunet_model, tmp_path, plan_changes, dataset_changes):
    import shutil

    target = tmp_path / "fuzz" / nnunet_model.name
    shutil.rmtree(target.parent, ignore_errors=True)

    def plans_change(document):
        try:
            return _mutate(document, [p for p, _ in plan_changes], [v for _, v in plan_changes])
        except (KeyError, IndexError, TypeError, ValueError):  # a path an earlier change removed
            return document

    def dataset_change(document):
        try:
            return _mutate(document, [p for p, _ in dataset_changes], [v for _, v in dataset_changes])
        except (KeyError, IndexError, TypeError, ValueError):
            return document

    folder = _copy_with(nnunet_model, target, plans_change, dataset_change)
    try:
        load_model(folder)
    except ModelError:
        pass
