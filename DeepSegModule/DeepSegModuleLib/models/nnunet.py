"""nnU-Net v2 trained-model folders (``dataset.json``, ``plans.json``, ``fold_*/checkpoint_final.pth``).

The network is built from the plans with ``dynamic_network_architectures`` as nnU-Net builds it;
checkpoints load with ``torch.load(weights_only=True)`` and a small allow-list of the numpy types
nnU-Net's training logs put in them. Several folds make an ensemble whose outputs are averaged
window by window (equal to nnU-Net's average of whole-image logits, since blending is linear).
The preprocessing nnU-Net applies (transpose, crop to non-zero, per-channel normalisation,
resampling with its anisotropic rule) lives in
:mod:`DeepSegModuleLib.segmentation.nnunet_preprocessing`.

``2d`` configurations run as nnU-Net runs them: every slice along the first (transposed) axis on its own.
The 2D network is wrapped by :class:`SliceWiseNetwork` into a 3D one with windows of ``(1, px, py)``, so
the 3D sliding window, ensembling, mirroring and resampling serve both; only the in-plane axes are
resampled (the slice axis keeps its spacing). Cascades (``3d_cascade_fullres``, which need the
``3d_lowres`` stage's segmentation as extra input channels) are refused with the folders to use instead.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from DeepSegModuleLib.labels import LabelInfo, default_color
from DeepSegModuleLib.models.description import (
    InputSpec,
    LoadedModel,
    ModelDescription,
    ModelFormat,
    NnunetPlan,
    NormalizationMode,
    NormalizationSpec,
    Tiling,
)
from DeepSegModuleLib.models.errors import ModelError, ModelFileError, ModelFormatError, load_error_detail

_NETWORK_MODULE_PREFIX = "dynamic_network_architectures."
#: The network classes a plans file may name, exactly (nnU-Net's and its ResEnc presets'; TotalSegmentator's).
NETWORK_CLASSES = frozenset({
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.unet.ResidualUNet",
})  # fmt: skip
#: The layer classes a plans file may hand the network (``_kw_requires_import``), exactly.
LAYER_CLASSES = frozenset(
    f"torch.nn.{name}" for name in (
        "Conv1d", "Conv2d", "Conv3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d",
        "BatchNorm2d", "BatchNorm3d", "GroupNorm", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "LeakyReLU",
        "ReLU", "PReLU", "GELU", "ELU", "SiLU", "Tanh", "Sigmoid",
    )
) | frozenset(f"torch.nn.modules.{module}.{name}" for module, names in {
    "conv": ("Conv1d", "Conv2d", "Conv3d"), "instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
    "batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"), "dropout": ("Dropout", "Dropout2d", "Dropout3d"),
    "activation": ("LeakyReLU", "ReLU", "PReLU", "GELU", "ELU", "SiLU"),
}.items() for name in names)  # fmt: skip
#: Bounds on what a plans file may ask a network to allocate.
_MAX_FEATURES = 4096
_MAX_STAGES = 12
_MAX_KERNEL = 15


def _multiarray(attribute: str) -> list:
    """numpy's ``multiarray.<attribute>`` (moved to ``numpy._core`` in numpy 2), as a one-item list, or []."""
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return [getattr(importlib.import_module(module_name), attribute)]
        except (ImportError, AttributeError):
            continue
    return []


def _dtype_classes(names: Sequence[str] | None = None) -> list:
    """numpy 2's per-dtype classes (``numpy.dtypes.Float32DType``...): the named ones, or every one but Object."""
    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:
        return []
    names = names or [name for name in dir(dtypes) if name.endswith("DType") and "Object" not in name]
    return [getattr(dtypes, name) for name in names if hasattr(dtypes, name)]


def numpy_safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` needs to restore plain numpy arrays (never object arrays)."""
    return [np.ndarray, np.dtype, *_multiarray("_reconstruct"), *_dtype_classes()]


def _checkpoint_safe_globals() -> list:
    """numpy types nnU-Net checkpoints contain (training-log floats), safe to restore."""
    names = ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType")
    return [np.dtype, *_multiarray("scalar"), *_dtype_classes(names)]


def load_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Reads an nnU-Net checkpoint without running pickled code.

    Raises:
        ModelFileError: truncated or damaged file, or objects outside the allow-list.
    """
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelFileError(
            f"{path} ({os.path.getsize(path)} bytes) could not be read as a weights-only nnU-Net checkpoint: it is "
            "truncated, damaged, or contains Python objects other than tensors and training logs. Copy the model "
            f"folder again. Details: {load_error_detail(error)}"
        ) from error
    if not isinstance(checkpoint, Mapping) or "network_weights" not in checkpoint:
        raise ModelFileError(f"{path} is not an nnU-Net v2 checkpoint (no 'network_weights'); use checkpoint_final.pth")
    return checkpoint


def resolve_configuration(plans: Mapping[str, Any], name: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A plans configuration with its ``inherits_from`` chain merged in."""
    configurations = plans.get("configurations", {})
    if not isinstance(name, str) or name not in configurations:
        raise ModelFormatError(f"plans.json has no configuration {name!r}; it has {sorted(map(str, configurations))}")
    if name in _chain:
        raise ModelFormatError(f"plans.json: configurations inherit from each other in a circle ({' -> '.join(_chain)})")
    if not isinstance(configurations[name], dict):
        raise ModelFormatError(f"plans.json: configurations.{name} must be an object")
    config = dict(configurations[name])
    parent = config.pop("inherits_from", None)
    if parent:
        merged = resolve_configuration(plans, parent, (*_chain, name))
        merged.update(config)
        return merged
    return config


def _import_dotted(path: Any, allowed: frozenset[str], what: str) -> Any:
    if not isinstance(path, str) or path not in allowed:
        raise ModelFormatError(
            f"plans.json {what} {path!r} is not one DeepSeg builds (allowed: {', '.join(sorted(allowed)[:6])}...); "
            "refusing to import it"
        )
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        hint = " (pip install dynamic-network-architectures)" if path.startswith(_NETWORK_MODULE_PREFIX) else ""
        raise ModelFormatError(f"plans.json {what} {path!r} cannot be imported{hint}: {error}") from error


def build_network(configuration: Mapping[str, Any], input_channels: int, output_channels: int) -> torch.nn.Module:
    """Builds the network a plans configuration describes (deep supervision off, as for inference)."""
    architecture = configuration.get("architecture")
    if not architecture:
        raise ModelFormatError("plans.json configuration has no 'architecture'; it was written by nnU-Net < 2.4")
    validate_architecture(architecture)
    network_class = _import_dotted(architecture["network_class_name"], NETWORK_CLASSES, "network class")
    kwargs = dict(architecture.get("arch_kwargs", {}))
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _import_dotted(kwargs[key], LAYER_CLASSES, f"argument {key}")
    return network_class(input_channels=input_channels, num_classes=output_channels, deep_supervision=False, **kwargs)


def _field(value: Any, where: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ModelFormatError(f"plans.json: {where} must be {what}, got {value!r:.80}")
    return value


def _int_list(value: Any, where: str, low: int, high: int, length: int | None = None) -> list[int]:
    _field(value, where, list, "a list")
    if length is not None and len(value) != length:
        raise ModelFormatError(f"plans.json: {where} must have {length} entries, got {len(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
            raise ModelFormatError(f"plans.json: {where} must hold whole numbers from {low} to {high}, got {item!r:.40}")
    return value


def validate_architecture(architecture: Any) -> None:
    """Checks a plans configuration's ``architecture`` before anything is built, naming the field that is wrong.

    Raises:
        ModelFormatError: a field is missing, of the wrong type, or asks for more than a network needs.
    """
    _field(architecture, "architecture", dict, "an object")
    _field(architecture.get("network_class_name"), "architecture.network_class_name", str, "a class name")
    kwargs = _field(architecture.get("arch_kwargs", {}), "architecture.arch_kwargs", dict, "an object")
    _field(architecture.get("_kw_requires_import", []), "architecture._kw_requires_import", list, "a list")
    stages = kwargs.get("n_stages")
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= _MAX_STAGES:
        raise ModelFormatError(f"plans.json: architecture.arch_kwargs.n_stages must be 1..{_MAX_STAGES}, got {stages!r}")
    features = kwargs.get("features_per_stage")
    if isinstance(features, int) and not isinstance(features, bool):
        features = [features] * stages
    _int_list(features, "architecture.arch_kwargs.features_per_stage", 1, _MAX_FEATURES, stages)
    for key in ("kernel_sizes", "strides"):
        entries = kwargs.get(key)
        _field(entries, f"architecture.arch_kwargs.{key}", list, "a list")
        if len(entries) != stages:
            raise ModelFormatError(f"plans.json: architecture.arch_kwargs.{key} must have n_stages={stages} entries")
        for index, entry in enumerate(entries):
            if isinstance(entry, int) and not isinstance(entry, bool):
                entry = [entry]
            _int_list(entry, f"architecture.arch_kwargs.{key}[{index}]", 1, _MAX_KERNEL)
    for key in ("n_conv_per_stage", "n_blocks_per_stage", "n_conv_per_stage_decoder"):
        if key in kwargs:
            value = kwargs[key]
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            _int_list(value, f"architecture.arch_kwargs.{key}", 1, 64)


def validate_plans(plans: Any, dataset: Any, configuration_name: str) -> None:
    """Checks the parts of plans.json and dataset.json DeepSeg reads, naming the field that is wrong.

    Raises:
        ModelFormatError: naming the file and the field.
    """
    _field(plans, "the file", dict, "a JSON object")
    if not isinstance(dataset, dict):
        raise ModelFormatError(f"dataset.json must be a JSON object, got {type(dataset).__name__}")
    configurations = _field(plans.get("configurations"), "configurations", dict, "an object")
    for name, configuration in configurations.items():
        _field(configuration, f"configurations.{name}", dict, "an object")
    for key in ("transpose_forward", "transpose_backward"):
        if key in plans and sorted(_int_list(plans[key], key, 0, 2)) != list(range(len(plans[key]))):
            raise ModelFormatError(f"plans.json: {key} must be a permutation of the axes, got {plans[key]}")
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelFormatError("dataset.json: 'labels' must map label names to values")
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 65536 for v in values):
            raise ModelFormatError(f"dataset.json: label {name!r} must be a value 0..65535 (or a list of them)")
    channels = dataset.get("channel_names", dataset.get("modality", {"0": "image"}))
    if not isinstance(channels, dict) or not channels or len(channels) > 64:
        raise ModelFormatError("dataset.json: 'channel_names' must map channel indices to names (1..64 channels)")
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    _field(properties, "foreground_intensity_properties_per_channel", dict, "an object")
    for channel, values in properties.items():
        _field(values, f"foreground_intensity_properties_per_channel.{channel}", dict, "an object")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ModelFormatError(
                    f"plans.json: foreground_intensity_properties_per_channel.{channel}.{key} must be a number"
                )
    configuration = resolve_configuration(plans, configuration_name)
    dimensions = len(configuration.get("patch_size", []) or [])
    _int_list(configuration.get("patch_size"), f"configurations.{configuration_name}.patch_size", 1, 2048)
    spacing = _field(configuration.get("spacing"), f"configurations.{configuration_name}.spacing", list, "a list")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e4 for v in spacing):
        raise ModelFormatError(f"plans.json: configurations.{configuration_name}.spacing must hold positive numbers")
    schemes = _field(configuration.get("normalization_schemes", []),
                     f"configurations.{configuration_name}.normalization_schemes", list, "a list")  # fmt: skip
    if len(schemes) < len(channels) or not all(isinstance(x, str) for x in schemes):
        raise ModelFormatError(f"plans.json: configurations.{configuration_name}.normalization_schemes must name "
                               f"one scheme per input channel ({len(channels)})")  # fmt: skip
    use_mask = configuration.get("use_mask_for_norm", [False] * len(schemes))
    if not isinstance(use_mask, list) or len(use_mask) < len(schemes):
        raise ModelFormatError(f"plans.json: configurations.{configuration_name}.use_mask_for_norm must have one "
                               "entry per channel")  # fmt: skip
    if dimensions in (2, 3) and configuration.get("architecture"):
        validate_architecture(configuration["architecture"])


class SliceWiseNetwork(torch.nn.Module):
    """A 2D network run on 3D windows ``(N, C, D, X, Y)``: the D slices are folded into the batch, each is
    predicted on its own (as nnU-Net's 2d configurations predict every slice), and the outputs are unfolded
    to ``(N, K, D, X, Y)``."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        count, channels, depth = windows.shape[:3]
        slices = windows.transpose(1, 2).reshape(count * depth, channels, *windows.shape[3:])
        output = self.network(slices)
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output.reshape(count, depth, *output.shape[1:]).transpose(1, 2)


def _refuse_cascade(folder: Path, plans: Mapping[str, Any], name: str, configuration: Mapping[str, Any]) -> None:
    previous = configuration.get("previous_stage")
    if not previous:
        return
    match = re.match(r"^(.*__.*__)[^_].*$", folder.name)
    siblings = [
        folder.parent / f"{match.group(1) if match else ''}{sibling}"
        for sibling in ("3d_fullres", str(previous))
        if sibling in plans.get("configurations", {})
    ]
    present = [str(path) for path in siblings if path.is_dir()]
    where = f" ({', '.join(present)})" if present else ""
    raise ModelFormatError(
        f"{folder}: configuration {name!r} is the second stage of an nnU-Net cascade; it needs the segmentation of "
        f"the {previous!r} stage as extra input channels, and DeepSeg does not run cascades. Run the 3d_fullres or "
        f"the {previous} folder of this model instead{where}."
    )


def _normalization(
    scheme: str, use_mask: bool, properties: Mapping[str, Any] | None, channel: int
) -> NormalizationSpec:
    if scheme == "CTNormalization":
        if not properties:
            raise ModelFormatError(
                f"plans.json: channel {channel} uses CTNormalization but has no intensity statistics"
            )
        return NormalizationSpec(
            mode=NormalizationMode.CT,
            lower=float(properties["percentile_00_5"]),
            upper=float(properties["percentile_99_5"]),
            mean=float(properties["mean"]),
            std=float(properties["std"]),
        )
    if scheme == "ZScoreNormalization":
        return NormalizationSpec(mode=NormalizationMode.ZSCORE, nonzero=bool(use_mask))
    if scheme == "NoNormalization":
        return NormalizationSpec(mode=NormalizationMode.NONE)
    if scheme == "RescaleTo01Normalization":
        return NormalizationSpec(mode=NormalizationMode.UNIT)
    if scheme == "RGBTo0_1Normalization":
        return NormalizationSpec(mode=NormalizationMode.RANGE, lower=0.0, upper=255.0)
    raise ModelFormatError(f"plans.json: normalisation scheme {scheme!r} of channel {channel} is not supported")


def _labels(dataset: Mapping[str, Any], folder: Path) -> tuple[list[LabelInfo], list[int]]:
    raw = dataset.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise ModelFormatError(f"{folder}/dataset.json has no 'labels'; it is not an nnU-Net v2 dataset.json")
    labels, values = [], []
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise ModelFormatError(
                f"{folder}: label {name!r} is a region ({value}); region-based nnU-Net models are not supported yet"
            )
        if name == "ignore":
            continue
        values.append(int(value))
        if int(value) != 0:
            labels.append(LabelInfo(value=int(value), name=str(name), color=default_color(int(value))))
    if sorted(values) != list(range(len(values))):
        raise ModelFormatError(f"{folder}/dataset.json label values must be 0..N without gaps, got {sorted(values)}")
    return sorted(labels, key=lambda info: info.value), list(range(len(values)))


def available_folds(folder: Path, checkpoint_name: str = "checkpoint_final.pth") -> list[str]:
    """The fold names (``"0"``, ``"all"``...) that have the checkpoint, sorted."""
    folds = [p.name[len("fold_") :] for p in folder.glob("fold_*") if (p / checkpoint_name).is_file()]
    return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def load_nnunet_model(folder: str | os.PathLike, *args: Any, **kwargs: Any) -> LoadedModel:
    """Reads an nnU-Net v2 trained-model folder (see :func:`_load_nnunet_model` for the arguments).

    Whatever a malformed plans.json or dataset.json does, the error is a :class:`ModelFormatError` naming it.
    """
    try:
        return _load_nnunet_model(folder, *args, **kwargs)
    except ModelError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError, OverflowError) as error:
        raise ModelFormatError(
            f"{folder}: plans.json or dataset.json is malformed ({type(error).__name__}: {str(error)[:200]}); "
            "copy the model folder again, or ask its author for the files nnU-Net wrote"
        ) from None


def _load_nnunet_model(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    folds: Sequence[int | str] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    orientation: str | None = "auto",
) -> LoadedModel:
    """Reads an nnU-Net v2 trained-model folder.

    Args:
        folder: the ``<Trainer>__<Plans>__<configuration>`` folder with dataset.json and plans.json.
        device: where the network runs.
        folds: which folds to ensemble (default: every fold with the checkpoint).
        checkpoint_name: ``checkpoint_final.pth`` (default) or ``checkpoint_best.pth``.
        orientation: reorient the input's voxel axes (permute and flip, never rotate) to this code
            before nnU-Net's preprocessing, as the model's training data were. None keeps the input's
            voxel order (what ``nnUNetv2_predict`` does with the file); ``"auto"`` picks ``"RAS"`` for
            TotalSegmentator models (which TotalSegmentator reorients to the closest canonical, RAS,
            before calling nnU-Net) and None otherwise.

    Raises:
        ModelFormatError: inconsistent plans/dataset.json, unsupported features.
        ModelFileError: missing or damaged checkpoints.
    """
    started = time.perf_counter()
    folder = Path(folder)
    device = torch.device(device)
    try:
        dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFormatError(f"{folder}: dataset.json or plans.json is not valid JSON ({error})") from error
    fold_names, checkpoints = _checkpoints(folder, folds, checkpoint_name)
    configuration_name = (checkpoints[0].get("init_args") or {}).get("configuration")
    if not configuration_name:
        match = re.search(r"__([^_].*)$", folder.name)
        configuration_name = match.group(1) if match else "3d_fullres"
    validate_plans(plans, dataset, configuration_name)
    configuration = resolve_configuration(plans, configuration_name)
    _refuse_cascade(folder, plans, configuration_name, configuration)
    dimensions = len(configuration.get("patch_size", []))
    if dimensions not in (2, 3) or len(configuration.get("spacing", [])) != dimensions:
        raise ModelFormatError(
            f"{folder}: configuration {configuration_name!r} has patch_size {configuration.get('patch_size')} and "
            f"spacing {configuration.get('spacing')}; nnU-Net configurations are 2D or 3D with one of each per axis"
        )
    labels, channels = _labels(dataset, folder)
    inputs = _inputs(dataset, plans, configuration)
    networks = _networks(folder, fold_names, checkpoints, checkpoint_name, configuration, len(inputs), len(channels),
                         dimensions == 2, device)  # fmt: skip
    if orientation == "auto":
        identity = f"{folder} {dataset.get('name', '')} {plans.get('dataset_name', '')}"
        orientation = "RAS" if "totalsegmentator" in identity.lower() else None
    description = _description(
        folder, dataset, plans, configuration_name, configuration, checkpoints[0], fold_names, inputs, labels,
        channels, orientation,
    )  # fmt: skip

    def to_device(target: torch.device) -> Any:
        for module in networks:
            module.to(target)
        return _ensemble(networks)

    return LoadedModel(
        description=description,
        predictor=_ensemble(networks),
        device=device,
        networks=networks,
        to_device=to_device,
        load_seconds=time.perf_counter() - started,
    )


def _checkpoints(folder: Path, folds: Sequence[int | str] | None, checkpoint_name: str) -> tuple[list[str], list]:
    """The folds to ensemble and their checkpoints (weights only)."""
    fold_names = [str(f) for f in folds] if folds is not None else available_folds(folder, checkpoint_name)
    if not fold_names:
        raise ModelFileError(f"{folder} has no fold_*/{checkpoint_name}; copy the trained folds into the model folder")
    checkpoints = []
    for fold in fold_names:
        path = folder / f"fold_{fold}" / checkpoint_name
        if not path.is_file():
            raise ModelFileError(f"{path} does not exist; available folds: {available_folds(folder, checkpoint_name)}")
        checkpoints.append(load_checkpoint(path))
    return fold_names, checkpoints


def _inputs(dataset: dict, plans: dict, configuration: dict) -> list[InputSpec]:
    """One input per channel of dataset.json, normalised as the plans say."""
    channel_names = dataset.get("channel_names") or dataset.get("modality") or {"0": "image"}
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    schemes = configuration.get("normalization_schemes", [])
    use_mask = configuration.get("use_mask_for_norm", [False] * len(schemes))
    return [
        InputSpec(
            name=str(name),
            modality=str(name),
            normalization=_normalization(schemes[c], use_mask[c], properties.get(str(c)), c),
        )
        for c, name in enumerate(channel_names.values())
    ]


def _networks(
    folder: Path, fold_names: list[str], checkpoints: list, checkpoint_name: str, configuration: dict, inputs: int,
    outputs: int, slice_wise: bool, device: torch.device,
) -> list[torch.nn.Module]:  # fmt: skip
    """The plans' network once per fold, with that fold's weights, in evaluation mode on ``device``."""
    networks = []
    fold = fold_names[0]
    try:
        for fold, checkpoint in zip(fold_names, checkpoints):
            network = build_network(configuration, inputs, outputs)
            network.load_state_dict(checkpoint["network_weights"])
            if slice_wise:
                network = SliceWiseNetwork(network)
            networks.append(network.to(device).eval())
    except RuntimeError as error:
        raise ModelFileError(
            f"{folder}/fold_{fold}/{checkpoint_name} does not fit the network in plans.json "
            f"({str(error).splitlines()[0]}); the checkpoint and plans belong to different trainings"
        ) from error
    return networks


def _description(
    folder: Path, dataset: dict, plans: dict, configuration_name: str, configuration: dict, first_checkpoint: dict,
    fold_names: list[str], inputs: list[InputSpec], labels: list, channels: list[int], orientation: str | None,
) -> ModelDescription:  # fmt: skip
    """What the engine needs to know of the model: windows, spacing, mirroring, labels and the typed plan."""
    dimensions = len(configuration["patch_size"])
    slice_wise = dimensions == 2
    mirror_axes = first_checkpoint.get("inference_allowed_mirroring_axes")
    mirror_axes = tuple(int(a) for a in mirror_axes) if mirror_axes is not None else tuple(range(dimensions))
    patch_size = tuple(int(s) for s in configuration["patch_size"])
    spacing: tuple[float, ...] | None = tuple(float(s) for s in configuration["spacing"])
    in_plane_spacing = None
    if slice_wise:
        # Windows of one slice; the 2D axes are the 3D grid's last two, so the checkpoint's mirror axes shift.
        patch_size, mirror_axes = (1, *patch_size), tuple(a + 1 for a in mirror_axes)
        in_plane_spacing, spacing = spacing, None  # the slice axis keeps each input's own spacing
    use_mask = configuration.get("use_mask_for_norm", [False] * len(inputs))
    return ModelDescription(
        name=str(dataset.get("name") or plans.get("dataset_name") or folder.name),
        format=ModelFormat.NNUNET_V2,
        inputs=inputs,
        labels=labels,
        channel_to_label=channels,
        patch_size=patch_size,
        spacing=spacing,
        orientation=orientation,
        overlap=0.5,
        sw_batch_size=1,
        tiling=Tiling.NNUNET,
        mirror_axes=mirror_axes,
        source=str(folder),
        nnunet=NnunetPlan(
            configuration=configuration_name,
            folds=tuple(fold_names),
            transpose_forward=tuple(int(a) for a in plans.get("transpose_forward", [0, 1, 2])),
            transpose_backward=tuple(int(a) for a in plans.get("transpose_backward", [0, 1, 2])),
            use_mask_for_norm=tuple(bool(m) for m in use_mask),
            slice_wise=slice_wise,
            in_plane_spacing=tuple(float(s) for s in in_plane_spacing) if in_plane_spacing is not None else None,
        ),
    )


def _ensemble(modules: list[torch.nn.Module]) -> Any:
    """One network as it is; several folds as the mean of their outputs."""
    if len(modules) == 1:
        return modules[0]

    def ensemble(windows: torch.Tensor) -> torch.Tensor:
        total = modules[0](windows).float()
        for module in modules[1:]:
            total += module(windows).float()
        return total / len(modules)

    return ensemble
