"""MONAI bundles: the network and the bundle's own pre- and post-processing, run on in-memory arrays.

A bundle (folder or ``.zip``) has ``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``)
and ``models/model.pt`` (a state dict) or ``models/model.ts`` (TorchScript). DeepSeg builds the
bundle's ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` so the bundle runs as its
authors meant, except that:

- file reading (``LoadImage(d)``) and writing (``SaveImage(d)``) transforms are left out: the image
  arrives as a MetaTensor carrying the volume's IJK-to-RAS matrix, exactly what ``LoadImaged`` makes;
- the sliding window runs through DeepSeg's inferer with the bundle's roi size, overlap, blend mode
  and window batch, adding progress, cancel and the out-of-memory fallback;
- weights load with ``torch.load(weights_only=True)``; TorchScript is inspected before it is loaded.

A bundle config is code: ``_target_`` names a callable and ``$`` strings are Python expressions. By default
(untrusted) the config is built by :class:`~DeepSegModuleLib.models.bundle_config.SafeBundleConfig`: only
allow-listed MONAI components, a restricted expression interpreter, files inside the bundle. With
``trust_code=True`` (an explicit choice: ``deepseg segment --trust-code``) MONAI's own ``ConfigParser`` builds
it, the bundle folder is importable while it does (``scripts/``), and what will run outside the allow-list is
logged first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from DeepSegModuleLib.labels import LabelInfo, default_color
from DeepSegModuleLib.models.description import InputSpec, LoadedModel, ModelDescription, ModelFormat
from DeepSegModuleLib.models.errors import ModelFileError, ModelFormatError, load_error_detail

logger = logging.getLogger(__name__)

_IO_TRANSFORMS = {"LoadImage", "LoadImaged", "SaveImage", "SaveImaged"}
_USED_IDS = ("network_def", "preprocessing", "inferer", "postprocessing")


def _config_file(bundle: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        if (bundle / "configs" / name).is_file():
            return bundle / "configs" / name
    raise ModelFormatError(
        f"{bundle} has no configs/inference.json or .yaml; it is not an inference-ready MONAI bundle"
    )


def _labels_from_metadata(metadata: Mapping[str, Any], bundle: Path) -> tuple[list[LabelInfo], list[int]]:
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output = outputs.get("pred") or next(iter(outputs.values()), {})
    channel_def = output.get("channel_def") or {}
    if not channel_def:
        count = int(output.get("num_channels", 0))
        if count < 2:
            raise ModelFormatError(
                f"{bundle}/configs/metadata.json names no output channels (network_data_format.outputs.pred."
                "channel_def); add them so segments get names"
            )
        channel_def = {str(c): ("background" if c == 0 else f"label {c}") for c in range(count)}
    named = sorted((int(k), str(v)) for k, v in channel_def.items())
    if named and named[0][0] == 0 and named[0][1].strip().lower() not in ("background", "_background_", "bg"):
        # Overlapping regions (BraTS: tumour core, whole tumour, enhancing tumour), one sigmoid channel each: the
        # bundle's post-processing turns them into label values of its own (1, 2, 4) that no channel names.
        # Naming them after the channels would put wrong names on the tumour a planner looks at.
        raise ModelFormatError(
            f"{bundle}: its outputs are overlapping regions ({', '.join(name for _, name in named)}) that its "
            "post-processing turns into label values its metadata does not name; DeepSeg does not guess what they "
            "are: run this bundle with MONAI's own runner (python -m monai.bundle run)"
        )
    labels, channels = [], []
    for channel, name in named:
        if channel == 0 or name.lower() == "background":
            channels.append(0)
            continue
        labels.append(LabelInfo(value=channel, name=name, color=default_color(channel)))
        channels.append(channel)
    return labels, channels


def _weights(bundle: Path) -> Path:
    for name in ("model.pt", "model.ts"):
        if (bundle / "models" / name).is_file():
            return bundle / "models" / name
    raise ModelFileError(f"{bundle}/models has neither model.pt nor model.ts; copy the bundle's weights there")


def _load_state_dict(weights: Path) -> Mapping[str, torch.Tensor]:
    try:
        checkpoint = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickled objects outside the allow-list...
        raise ModelFileError(
            f"{weights} ({os.path.getsize(weights)} bytes) could not be read as a weights-only checkpoint: it is "
            f"truncated, damaged, or holds Python objects besides tensors. Details: {load_error_detail(error)}"
        ) from error
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise ModelFileError(f"{weights} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


class BundleProcessing:
    """A bundle's pre-processing, inferer settings and post-processing, built once from its config when the model
    loads; :class:`~DeepSegModuleLib.segmentation.runners.MonaiBundleRunner` applies them to in-memory volumes.

    (Not MONAI's ``monai.bundle.BundleWorkflow``, which runs a whole bundle from its files: this holds only the
    transforms DeepSeg runs around its own sliding window.)
    """

    def __init__(self, parser: Any) -> None:
        preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
        self.image_key = "image"
        for component in getattr(parser, "io_components", []):  # the safe builder leaves them unbuilt
            if component.name.startswith("Load") and component.keys:
                self.image_key = component.keys[0]
                break
        kept = []
        for transform in getattr(preprocessing, "transforms", [preprocessing]):
            if type(transform).__name__ in _IO_TRANSFORMS:
                keys = getattr(transform, "keys", None)
                if keys:
                    self.image_key = keys[0]
                continue
            kept.append(transform)
        from monai.transforms import Compose

        self.preprocessing = Compose(kept)
        self.postprocessing = None
        if "postprocessing" in parser:
            post = parser.get_parsed_content("postprocessing", instantiate=True)
            self.postprocessing = Compose(
                [t for t in getattr(post, "transforms", [post]) if type(t).__name__ not in _IO_TRANSFORMS]
            )
        self.inferer = parser.get_parsed_content("inferer", instantiate=True) if "inferer" in parser else None

    def input_dict(self, volumes: list) -> dict[str, Any]:
        """Volumes on the first one's grid as the dict ``LoadImaged`` would have made: a channel-first MetaTensor
        carrying the IJK-to-RAS matrix under the bundle's image key."""
        from monai.data import MetaTensor

        affine = torch.as_tensor(volumes[0].ijk_to_ras, dtype=torch.float64)
        arrays = [np.ascontiguousarray(v.array.transpose(2, 1, 0)).astype(np.float32, copy=False) for v in volumes]
        data = np.stack(arrays) if len(arrays) > 1 else arrays[0]
        meta = {
            "affine": affine.clone(),
            "original_affine": affine.clone(),
            "spatial_shape": np.array(arrays[0].shape),
            "original_channel_dim": 0 if len(arrays) > 1 else float("nan"),
            "filename_or_obj": "deepseg_input",
            "space": "RAS",
        }
        return {self.image_key: MetaTensor(torch.from_numpy(data), affine=affine, meta=meta)}

    def check_resampled_size(self, volume: Any) -> None:
        """The grid the bundle's Spacing(d) would make, checked against the voxel limit before it is made."""
        from DeepSegModuleLib import limits

        spacing = np.linalg.norm(np.asarray(volume.ijk_to_ras)[:3, :3], axis=0)
        for transform in getattr(self.preprocessing, "transforms", []):
            pixdim = getattr(getattr(transform, "spacing_transform", transform), "pixdim", None)
            if pixdim is None or type(transform).__name__ not in ("Spacing", "Spacingd"):
                continue
            target = np.broadcast_to(np.asarray(pixdim, dtype=np.float64).ravel()[:3], (3,))
            if np.all(target > 0):
                shape = np.asarray(volume.array.shape[::-1], dtype=np.float64) * spacing / target
                limits.VOXELS.check(float(np.prod(np.ceil(shape))), f"the input resampled to {tuple(target)} mm")

    @staticmethod
    def labels_to_input_grid(labels: torch.Tensor, pred: Any, reference: Any) -> torch.Tensor:
        import SimpleITK as sitk

        from DeepSegModuleLib.segmentation.volume import VolumeArray, to_sitk

        affine = np.asarray(pred.affine, dtype=np.float64)
        moving = to_sitk(VolumeArray(labels.numpy().transpose(2, 1, 0).astype(np.int32), affine))
        fixed = to_sitk(VolumeArray(np.zeros(reference.array.shape, np.uint8), reference.ijk_to_ras))
        out = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        return torch.from_numpy(sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(np.int64))


def load_monai_bundle(
    bundle: str | os.PathLike,
    device: torch.device | str = "cpu",
    trust_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Reads a MONAI bundle folder into a :class:`LoadedModel` whose ``bundle`` holds its own processing.

    Args:
        bundle: the bundle folder (``.zip`` files are unpacked safely by ``load_model``).
        device: where the network runs.
        trust_code: build the config with MONAI's own parser, which runs any ``_target_`` and ``$`` expression
            and may import the bundle's ``scripts/``. What runs outside the allow-list is logged first.
        log: where that list goes (default: the module's logger).

    Raises:
        UntrustedCodeError: untrusted mode, and the config needs code outside the allow-list (it lists what).
        ModelFormatError: missing configs, unknown classes, no channel names.
        ModelFileError: missing, truncated or non-weights-only weights.
    """
    from DeepSegModuleLib.models.bundle_config import SafeBundleConfig, read_bundle_config

    started = time.perf_counter()
    bundle = Path(bundle)
    device = torch.device(device)
    config_path = _config_file(bundle)
    metadata_path = bundle / "configs" / "metadata.json"
    metadata = read_bundle_config(metadata_path) if metadata_path.is_file() else {}
    config = read_bundle_config(config_path)
    missing = [key for key in ("network_def", "preprocessing") if key not in config]
    if missing:
        raise ModelFormatError(f"{config_path} defines no {missing}; DeepSeg needs them to run the bundle")
    safe = SafeBundleConfig(config, metadata, bundle, {"bundle_root": str(bundle), "device": device}, str(bundle))
    if trust_code:
        (log or logger.warning)(f"Trusted mode for {bundle}: " + "; ".join(trusted_code_summary(bundle)))
        parser = _trusted_parser(config_path, metadata, bundle, device)
    else:
        parser = safe
    try:
        network = _network(parser, bundle, device)
        description = _description(parser, metadata, bundle, config_path)
        processing = BundleProcessing(parser)
    except (ModelFormatError, ModelFileError):
        raise
    except ImportError as error:
        raise ModelFormatError(
            f"the bundle {bundle} needs the Python package {error.name or str(error)!r}: pip install {error.name or ''}"
        ) from None
    except Exception as error:
        raise ModelFormatError(
            f"the bundle {bundle} could not be built: {str(error).splitlines()[0]}. If the config names classes from "
            "the bundle's own scripts or a newer MONAI, update MONAI or the bundle."
        ) from error

    return LoadedModel.of_network(description, network, device, started, bundle=processing)


def _network(parser: Any, bundle: Path, device: torch.device) -> torch.nn.Module:
    """The bundle's network with its weights (a checked TorchScript file, or the config's network_def and a
    weights-only state dict), in evaluation mode on ``device``."""
    weights = _weights(bundle)
    if weights.suffix == ".ts":
        from DeepSegModuleLib.models.torchscript_check import load_checked_torchscript

        network = load_checked_torchscript(weights, map_location=device)
    else:
        network = parser.get_parsed_content("network_def", instantiate=True)
        state = _load_state_dict(weights)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelFileError(
                f"{weights} does not match the bundle's network_def ({str(error).splitlines()[0]}); the weights "
                "belong to another version of this bundle"
            ) from error
        network.to(device)
    network.eval()
    return network


def _description(parser: Any, metadata: Mapping[str, Any], bundle: Path, config_path: Path) -> ModelDescription:
    """Inputs and labels from the bundle's metadata; window size, overlap and window batch from its built inferer
    (which carries the config's values after references and expressions are resolved)."""
    labels, channels = _labels_from_metadata(metadata, bundle)
    inferer = parser.get_parsed_content("inferer", instantiate=True) if "inferer" in parser else None
    roi = getattr(inferer, "roi_size", None)
    inputs_meta = metadata.get("network_data_format", {}).get("inputs", {})
    image_meta = inputs_meta.get("image") or next(iter(inputs_meta.values()), {})
    if roi is None or isinstance(roi, str):
        roi = image_meta.get("spatial_shape", [96, 96, 96])
    try:
        roi = [int(r) for r in roi]
    except (TypeError, ValueError):
        raise ModelFormatError(f"{config_path}: the inferer's roi_size {roi!r} is not a list of integers") from None
    if len(roi) == 2:
        raise ModelFormatError(
            f"{bundle} segments 2D images (its window is {roi[0]} x {roi[1]}) and DeepSeg runs bundles on 3D volumes: "
            "run it with MONAI's own runner (python -m monai.bundle run)"
        )
    channel_names = image_meta.get("channel_def") or {"0": image_meta.get("modality", "image")}
    return ModelDescription(
        name=str(metadata.get("name") or bundle.name),
        version=str(metadata.get("version") or ""),
        format=ModelFormat.MONAI_BUNDLE,
        inputs=[
            InputSpec(name=str(name), modality=str(image_meta.get("modality", ""))) for name in channel_names.values()
        ],
        labels=labels,
        channel_to_label=channels,
        patch_size=tuple(roi),
        overlap=float(getattr(inferer, "overlap", 0.25)),
        sw_batch_size=int(getattr(inferer, "sw_batch_size", 1)),
        source=str(bundle),
    )


def trusted_code_summary(bundle: str | os.PathLike) -> list[str]:
    """What trusted mode runs that untrusted mode would not: targets and expressions outside the allow-list
    (with where they are), and the bundle's own Python files, which the config may import."""
    from DeepSegModuleLib.models.bundle_config import SafeBundleConfig, read_bundle_config

    bundle = Path(bundle)
    config_path = _config_file(bundle)
    metadata_path = bundle / "configs" / "metadata.json"
    metadata = read_bundle_config(metadata_path) if metadata_path.is_file() else {}
    safe = SafeBundleConfig(read_bundle_config(config_path), metadata, bundle, {"bundle_root": str(bundle)})
    lines = [f"runs {finding}" for finding in safe.audit(_USED_IDS)] or ["nothing outside the allow-list"]
    scripts = sorted(str(p.relative_to(bundle)) for p in bundle.glob("scripts/**/*.py"))
    if scripts:
        lines.append(f"may import the bundle's code from {bundle}: {', '.join(scripts)}")
    return lines


def _trusted_parser(config_path: Path, metadata: Mapping[str, Any], bundle: Path, device: torch.device) -> Any:
    """MONAI's own parser, with the bundle folder importable while it builds (its ``scripts/`` package)."""
    import sys

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser.read_meta(dict(metadata))
    parser["bundle_root"] = str(bundle)
    parser["device"] = device
    return _ImportableDuringBuild(parser, str(bundle.resolve()), sys)


class _ImportableDuringBuild:
    """Wraps a ConfigParser so that the bundle folder is on ``sys.path`` only while items are built."""

    def __init__(self, parser: Any, folder: str, sys_module: Any) -> None:
        self._parser, self._folder, self._sys = parser, folder, sys_module

    def __contains__(self, key: str) -> bool:
        return key in self._parser

    def get(self, key: str, default: Any = None) -> Any:
        return self._parser.get(key, default)

    def get_parsed_content(self, key: str, **kwargs: Any) -> Any:
        self._sys.path.insert(0, self._folder)
        try:
            return self._parser.get_parsed_content(key, **kwargs)
        finally:
            if self._folder in self._sys.path:
                self._sys.path.remove(self._folder)
