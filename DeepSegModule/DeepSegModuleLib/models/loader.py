"""Reads any supported model (TorchScript + card, MONAI bundle, nnU-Net v2 folder) by looking at it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from DeepSegModuleLib.devices import resolve_device
from DeepSegModuleLib.models.archive import safe_extract_zip, sha256_of_file
from DeepSegModuleLib.models.description import LoadedModel, ModelFormat
from DeepSegModuleLib.models.errors import ModelFileError, ModelFormatError


def unpacked_cache_root() -> Path:
    """Where model archives are unpacked: ``$DEEPSEG_CACHE_DIR`` or ``~/.deepseg/unpacked``."""
    return Path(os.environ.get("DEEPSEG_CACHE_DIR") or Path.home() / ".deepseg" / "unpacked")


def _unpacked_archive(archive: Path) -> Path:
    # Extract once per archive content, next to other unpacked models, so a cached load finds it again.
    digest = sha256_of_file(archive)[:16]
    root = unpacked_cache_root()
    target = root / digest
    if not target.is_dir():
        try:
            safe_extract_zip(archive, target)
        except ModelFileError:
            if not target.is_dir():  # another process unpacked the same archive at the same moment
                raise
        trim_unpacked_cache(root, keep=target)
    os.utime(target)  # most recently used: the last to be removed
    entries = [p for p in target.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return target


def trim_unpacked_cache(root: Path, keep: Path | None = None) -> list[Path]:
    """Removes the least recently used unpacked archives until the cache fits ``DEEPSEG_MAX_UNPACKED_CACHE_BYTES``.

    Only folders named like DeepSeg's (16 hex digits) are ever removed; returns what was removed.
    """
    import shutil

    from DeepSegModuleLib import limits

    budget = limits.UNPACKED_CACHE_BYTES.value()
    entries = [p for p in root.iterdir() if p.is_dir() and len(p.name) == 16 and all(c in "0123456789abcdef" for c in p.name)]
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in entries}
    removed = []
    for entry in sorted(entries, key=lambda p: p.stat().st_mtime):
        if sum(sizes.values()) <= budget:
            break
        if keep is not None and entry.resolve() == keep.resolve():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        sizes.pop(entry)
        removed.append(entry)
    return removed


def detect_format(path: str | os.PathLike) -> ModelFormat:
    """Tells which model format a file or folder holds.

    Raises:
        ModelFormatError: when it is none of them (the message lists what each format looks like).
    """
    from DeepSegModuleLib.models.torchscript import find_card

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model {path} does not exist")
    if path.is_dir():
        if (path / "configs").is_dir():
            return ModelFormat.MONAI_BUNDLE
        if (path / "dataset.json").is_file() and (path / "plans.json").is_file():
            return ModelFormat.NNUNET_V2
    if find_card(path) is not None:
        return ModelFormat.TORCHSCRIPT
    raise ModelFormatError(
        f"{path} is not a model DeepSeg reads. Expected one of: a MONAI bundle folder or .zip (configs/, models/); "
        "an nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_*/checkpoint_final.pth); a TorchScript "
        "file with a DeepSeg model card (deepseg.json, see docs/model_card.md)."
    )


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", trust_code: bool = False, **options
) -> LoadedModel:
    """Loads a model of any supported format onto ``device``.

    Args:
        path: a model folder, a ``.zip`` of one, a TorchScript file or a model card.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
        trust_code: MONAI bundles only: build the config with MONAI's own parser (runs the author's code).
        **options: format-specific options (``folds`` and ``checkpoint_name`` for nnU-Net).

    Raises:
        ModelFormatError, ModelFileError, UnsafeArchiveError: see the format readers.
    """
    path = Path(path)
    device = resolve_device(device)
    if path.is_file() and path.suffix.lower() == ".zip":
        path = _unpacked_archive(path)
    model_format = detect_format(path)
    if model_format == ModelFormat.TORCHSCRIPT:
        from DeepSegModuleLib.models.torchscript import load_torchscript_model

        return load_torchscript_model(path, device)
    if model_format == ModelFormat.MONAI_BUNDLE:
        from DeepSegModuleLib.models.monai_bundle import load_monai_bundle

        return load_monai_bundle(path, device, trust_code=trust_code)
    from DeepSegModuleLib.models.nnunet import load_nnunet_model

    return load_nnunet_model(path, device, **options)


def model_labels(path: str | os.PathLike) -> dict[int, str]:
    """Label value -> name as a model's own description files say, without loading its weights.

    Raises:
        ModelFormatError, ModelFileError: the model is none of the formats, or its description is unreadable.
    """
    import json

    path = Path(path)
    model_format = detect_format(path)
    if model_format == ModelFormat.TORCHSCRIPT:
        from DeepSegModuleLib.models.torchscript import find_card, read_card

        description, _ = read_card(find_card(path))
        return {info.value: info.name for info in description.labels}
    if model_format == ModelFormat.MONAI_BUNDLE:
        from DeepSegModuleLib.models.monai_bundle import _labels_from_metadata

        metadata_path = path / "configs" / "metadata.json"
        metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
        return {info.value: info.name for info in _labels_from_metadata(metadata, path)[0]}
    dataset = json.loads((path / "dataset.json").read_text(encoding="utf-8"))
    labels = {}
    for name, value in dict(dataset.get("labels", {})).items():
        values = value if isinstance(value, list) else [value]
        if str(name).lower() != "background" and values and isinstance(values[-1], int):
            labels[int(values[-1])] = str(name)
    return dict(sorted(labels.items()))
