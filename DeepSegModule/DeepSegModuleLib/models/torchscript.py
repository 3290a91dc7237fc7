"""TorchScript model + DeepSeg model card (JSON).

A DeepSeg model card is a small JSON file beside a TorchScript file (``torch.jit.save`` output,
``.ts`` or ``.pt``). It tells the engine how to feed the network and what its outputs mean; the
format is documented in ``docs/model_card.md``. Minimal example::

    {
      "deepseg_model_card": 1,
      "name": "Brain (T1)",
      "weights": "brain.ts",
      "sha256": "<optional hex sha256 of brain.ts>",
      "inputs": [{"name": "T1", "modality": "MR", "normalization": {"mode": "zscore", "nonzero": true}}],
      "orientation": "RAS",
      "spacing": [1.0, 1.0, 1.0],
      "patch_size": [96, 96, 96],
      "overlap": 0.5,
      "activation": "softmax",
      "mirror_axes": [0, 1, 2],
      "labels": [{"value": 1, "name": "Brain", "color": [0.9, 0.7, 0.6],
                  "terminology": "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^12738006^Brain~^^~~^^~^^"}]
    }

TorchScript runs TorchScript code, not Python, but its operators reach further than tensors (``torch.from_file``
maps any file): every archive is inspected by :mod:`~DeepSegModuleLib.models.torchscript_check` before
``torch.jit.load`` runs any of it, and refused when it calls an operator outside the allow-list.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from DeepSegModuleLib.labels import CodedEntry, LabelInfo, Terminology, as_label_table
from DeepSegModuleLib.models.archive import verify_sha256
from DeepSegModuleLib.models.description import (
    InputSpec,
    LoadedModel,
    ModelDescription,
    ModelFormat,
    NormalizationSpec,
    OutputActivation,
)
from DeepSegModuleLib.models.errors import ModelFileError, ModelFormatError
from DeepSegModuleLib.models.torchscript_check import load_checked_torchscript

CARD_VERSION = 1
#: File names looked for when a folder or a bare TorchScript file is given.
CARD_FILE_NAMES = ("deepseg.json", "model_card.json")

_CARD_KEYS = {
    "deepseg_model_card", "name", "description", "weights", "sha256", "inputs", "orientation", "spacing",
    "patch_size", "overlap", "sw_batch_size", "activation", "mirror_axes", "axis_order", "labels", "license",
    "version", "authors", "expects",
}  # fmt: skip


def find_card(path: str | os.PathLike) -> Path | None:
    """Finds the model card for a folder, a card file or a TorchScript file, or None."""
    path = Path(path)
    if path.is_dir():
        for name in CARD_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        return None
    if path.suffix.lower() == ".json":
        return path
    for candidate in (path.with_suffix(".json"), *(path.parent / name for name in CARD_FILE_NAMES)):
        if candidate.is_file():
            return candidate
    return None


def _terminology(value: Any, where: str) -> Terminology | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        try:
            category = CodedEntry.from_slicer(value["category"])
            type_ = CodedEntry.from_slicer(value["type"])
            modifier = CodedEntry.from_slicer(value["type_modifier"]) if value.get("type_modifier") else None
            region = CodedEntry.from_slicer(value["anatomic_region"]) if value.get("anatomic_region") else None
        except (KeyError, ValueError) as error:
            raise ModelFormatError(
                f"{where}: terminology needs 'category' and 'type' as 'scheme^value^meaning' codes ({error})"
            ) from error
        if category is None or type_ is None:
            raise ModelFormatError(f"{where}: terminology category and type must not be empty")
        return Terminology(category=category, type=type_, type_modifier=modifier, anatomic_region=region)
    raise ModelFormatError(f"{where}: terminology must be a Slicer terminology string or an object, got {value!r}")


def _check_card_fields(card: Mapping[str, Any], source: str) -> None:
    """Types and bounds of the fields that size allocations or index arrays, each named when wrong."""
    from DeepSegModuleLib import limits

    patch = card["patch_size"]
    if not isinstance(patch, list) or len(patch) not in (2, 3) or any(
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024 for n in patch
    ):
        raise ModelFormatError(f"{source}: 'patch_size' must be 2 or 3 whole numbers from 1 to 1024, got {patch!r:.80}")
    if not isinstance(card["inputs"], list) or not 1 <= len(card["inputs"]) <= 64 or not all(
        isinstance(entry, Mapping) for entry in card["inputs"]
    ):
        raise ModelFormatError(f"{source}: 'inputs' must be a list of 1 to 64 objects")
    labels = card["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(item, Mapping) for item in labels):
        raise ModelFormatError(f"{source}: 'labels' must be a non-empty list of objects with 'value' and 'name'")
    limits.SEGMENTS.check(len(labels), f"the label count of {source}")
    for item in labels:
        for key in ("value", "channel"):
            value = item.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
                raise ModelFormatError(f"{source}: label {item.get('name')!r}: '{key}' must be 0..65535, got {value!r:.40}")
    for key in ("spacing",):
        value = card.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != 3 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e4 for v in value
        )):  # fmt: skip
            raise ModelFormatError(f"{source}: '{key}' must be three positive numbers (mm), got {value!r:.80}")
    expects = card.get("expects")
    if expects is not None:
        if not isinstance(expects, Mapping) or set(expects) - {"body_region", "modality", "extent_mm"}:
            raise ModelFormatError(f"{source}: 'expects' is an object with 'body_region', 'modality', 'extent_mm'")
        extent = expects.get("extent_mm")
        if extent is not None and (not isinstance(extent, list) or len(extent) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e4 for v in extent
        )):  # fmt: skip
            raise ModelFormatError(f"{source}: 'expects.extent_mm' must be [smallest, largest] in mm")
    overlap = card.get("overlap", 0.5)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ModelFormatError(f"{source}: 'overlap' must be a number in 0..1 (exclusive), got {overlap!r:.40}")


def parse_card(card: Mapping[str, Any], source: str = "model card") -> ModelDescription:
    """Reads a model card (already parsed JSON) into a :class:`ModelDescription`.

    Raises:
        ModelFormatError: naming the field that is missing or wrong.
    """
    if not isinstance(card, Mapping):
        raise ModelFormatError(f"{source}: a model card is a JSON object")
    version = card.get("deepseg_model_card")
    if version != CARD_VERSION:
        raise ModelFormatError(
            f"{source}: 'deepseg_model_card' must be {CARD_VERSION} (got {version!r}); is this a DeepSeg model card?"
        )
    unknown = sorted(set(card) - _CARD_KEYS)
    if unknown:
        raise ModelFormatError(f"{source}: unknown fields {unknown}; see docs/model_card.md for the card format")
    for key in ("inputs", "patch_size", "labels"):
        if key not in card:
            raise ModelFormatError(f"{source}: the card has no '{key}' field; see docs/model_card.md")
    _check_card_fields(card, source)
    try:
        inputs = []
        for index, entry in enumerate(card["inputs"]):
            norm = dict(entry.get("normalization", {}))
            inputs.append(
                InputSpec(
                    name=str(entry.get("name", f"input {index}")),
                    modality=str(entry.get("modality", "")),
                    normalization=NormalizationSpec(**norm),
                )
            )
        activation = OutputActivation(card.get("activation", "softmax"))
        raw_labels = list(card["labels"])
        labels = as_label_table(
            [
                LabelInfo(
                    value=int(item["value"]),
                    name=str(item["name"]),
                    color=tuple(float(c) for c in item.get("color", (0.5, 0.5, 0.5))),
                    terminology=_terminology(item.get("terminology"), f"{source}: label {item.get('name')!r}"),
                )
                for item in raw_labels
            ]
        )
        if activation == OutputActivation.SIGMOID:
            channels = {int(item.get("channel", index)): int(item["value"]) for index, item in enumerate(raw_labels)}
        else:
            channels = {int(item.get("channel", item["value"])): int(item["value"]) for item in raw_labels}
            channels.setdefault(0, 0)
        count = max(channels) + 1
        missing = [c for c in range(count) if c not in channels]
        if missing:
            raise ModelFormatError(
                f"{source}: output channels {missing} have no label; give every channel a label (or 'channel' fields)"
            )
        return ModelDescription(
            name=str(card.get("name", source)),
            version=str(card.get("version") or ""),
            format=ModelFormat.TORCHSCRIPT,
            inputs=inputs,
            labels=labels,
            channel_to_label=[channels[c] for c in range(count)],
            patch_size=tuple(card["patch_size"]),
            spacing=tuple(card["spacing"]) if card.get("spacing") is not None else None,
            orientation=card.get("orientation"),
            overlap=float(card.get("overlap", 0.5)),
            sw_batch_size=int(card.get("sw_batch_size", 1)),
            activation=activation,
            mirror_axes=tuple(int(a) for a in card.get("mirror_axes", ())),
            axis_order=str(card.get("axis_order", "ijk")),
            sha256=card.get("sha256") or None,
            expects=dict(card["expects"]) if isinstance(card.get("expects"), dict) else None,
        )
    except ModelFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as error:
        raise ModelFormatError(f"{source}: {type(error).__name__}: {error}; see docs/model_card.md for the card "
                               "format") from None  # fmt: skip


def read_card(card_path: str | os.PathLike) -> tuple[ModelDescription, Path]:
    """Reads a card file; returns the description and the TorchScript file it names.

    Raises:
        ModelFormatError: the JSON is invalid or the card is inconsistent.
        ModelFileError: the weights file it names does not exist.
    """
    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFormatError(f"{card_path} is not valid JSON ({error}); fix or replace the model card") from error
    description = parse_card(card, source=str(card_path))
    weights_name = card.get("weights")
    if not weights_name:
        candidates = sorted(p for p in card_path.parent.iterdir() if p.suffix.lower() in (".ts", ".pt"))
        if len(candidates) != 1:
            raise ModelFormatError(f"{card_path}: name the TorchScript file in the card's 'weights' field")
        weights = candidates[0]
    else:
        weights = (card_path.parent / weights_name).resolve()
        if card_path.parent.resolve() not in weights.parents:
            raise ModelFormatError(f"{card_path}: 'weights' must be a file in the card's folder, got {weights_name!r}")
    if not weights.is_file():
        raise ModelFileError(f"{card_path} names weights {weights.name!r}, which is not in {card_path.parent}")
    description.source = str(weights)
    return description, weights


def load_torchscript_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Loads a TorchScript model and its card.

    Args:
        path: the card (``.json``), the TorchScript file (card beside it), or their folder.
        device: where to put the weights.

    Raises:
        ModelFormatError: no card, or an inconsistent one.
        ModelFileError: the TorchScript file is truncated, damaged or not TorchScript, or its sha256
            differs from the card's.
    """
    started = time.perf_counter()
    card_path = find_card(path)
    if card_path is None:
        raise ModelFormatError(
            f"no DeepSeg model card found for {path}: put a {CARD_FILE_NAMES[0]} (see docs/model_card.md) beside "
            "the TorchScript file"
        )
    description, weights = read_card(card_path)
    if description.sha256:
        verify_sha256(weights, description.sha256)
    device = torch.device(device)
    network = load_checked_torchscript(weights, map_location=device)
    network.eval()

    return LoadedModel.of_network(description, network, device, started)
