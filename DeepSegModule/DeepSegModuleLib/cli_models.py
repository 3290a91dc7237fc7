"""``deepseg models ...``: the local model store from the command line (list, import, info, trust, remove)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from .cli_common import PlainUsage, download_progress, emit, file_size, progress_bar, reported

models_app = typer.Typer(help="Manage the local model store (~/.deepseg/models, or $DEEPSEG_MODEL_DIR).",
                         no_args_is_help=True, rich_markup_mode=None)





@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the models in the store, and those that ship with DeepSeg (marked "bundled").

    Example: deepseg models list
    """
    from .models.errors import ModelFileError
    from .models.store import DEFAULT_MODEL_ID, ModelStore

    with reported(as_json):
        store = ModelStore()
        entries = []
        for model_id in store.list_ids():
            try:
                stored = store.get(model_id)
            except ModelFileError as error:  # one damaged entry is reported; the others still list
                entries.append({"id": model_id, "damaged": str(error)})
                continue
            entries.append({"id": model_id, "path": str(stored.path), "bundled": stored.bundled,
                            "default": model_id == DEFAULT_MODEL_ID, "needs_trust": stored.needs_trust})
        lines = [
            f"  {entry['id']:<30s} DAMAGED: {entry['damaged']}" if "damaged" in entry else
            f"  {entry['id']:<30s} {entry['path']}" + ("  (bundled, default)" if entry["default"] else
                                                       "  (bundled)" if entry["bundled"] else "")
            + ("  (needs --trust-code)" if entry["needs_trust"] else "")
            for entry in entries
        ]  # fmt: skip
        emit({"store": str(store.root), "models": entries}, as_json, lines or [f"  (no models in {store.root})"])


@models_app.command("import", cls=PlainUsage)
def models_import(
    source: str = typer.Argument(
        ..., metavar="SOURCE", help="A model folder, .zip, TorchScript file, or an http(s)/file URL."
    ),
    sha256: str | None = typer.Option(None, help="Expected sha256 of the file or archive (refused otherwise)."),
    name: str | None = typer.Option(None, "--name", help="Store the model under this name."),
    replace: bool = typer.Option(False, help="Replace a stored model of the same name."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines (errors still show)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Copy a model into the store (checksums recorded, archives extracted safely).

    Example: deepseg models import ./Task001_Brain.zip --sha256 3f2a...  --name brain
    """
    from .download import download, is_url
    from .models.store import ModelStore

    with reported(as_json):
        store = ModelStore()
        lines = []
        if is_url(source):
            with tempfile.TemporaryDirectory(prefix="deepseg-download-") as folder, progress_bar(as_json or quiet) as on_event:
                started = time.monotonic()
                path = download(source, folder, expected_sha256=sha256, progress=download_progress(source, on_event))
                lines.append(f"downloaded {file_size(path.stat().st_size)} in {time.monotonic() - started:.1f} s")
                # A URL should name one file holding the whole model: a .zip of a bundle, nnU-Net folder or
                # TorchScript file with its card.
                stored = store.import_model(path, model_id=name, replace=replace)
        else:
            stored = store.import_model(Path(source).expanduser(), model_id=name, expected_sha256=sha256, replace=replace)
        lines.append(f"imported {stored.model_id} into {stored.path} ({len(stored.files)} files, sha256 recorded)")
        emit({"id": stored.model_id, "path": str(stored.path), "files": stored.files}, as_json, lines)


@models_app.command("info", cls=PlainUsage)
def models_info(name: str = typer.Argument(..., metavar="NAME"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a stored model's files, checksums status and, where readable, its labels.

    Example: deepseg models info brain
    """
    from .models.store import ModelStore

    with reported(as_json):
        stored = ModelStore().verify(name)
        info: dict[str, Any] = {"id": stored.model_id, "path": str(stored.model_path), "source": stored.source,
                                "files": stored.files, "checksums": "ok"}
        try:
            from .models.loader import detect_format, model_labels

            info["format"] = str(detect_format(stored.model_path).value)
            info["labels"] = model_labels(stored.model_path)
        except Exception as error:  # noqa: BLE001 - an unreadable model is still listed
            info.setdefault("format", f"unknown ({error})")
            info["labels"] = {}
        if stored.needs_trust:
            info["needs_trust"] = stored.needs_trust
        lines = [f"  {key:<10s} {value}" for key, value in info.items() if key not in ("files", "labels", "needs_trust")]
        lines += [f"  label      {value:>4d}  {name}" for value, name in info["labels"].items()]
        lines += [f"  needs --trust-code: {finding}" for finding in info.get("needs_trust", [])]
        lines += [f"  file       {path}" for path in stored.files]
        emit(info, as_json, lines)


@models_app.command("trust", cls=PlainUsage)
def models_trust(
    name: str = typer.Argument(..., metavar="NAME"),
    revoke: bool = typer.Option(False, "--revoke", help="Withdraw the decision: run the model untrusted again."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Record that a stored MONAI bundle may run its own code (its scripts/, any expression), after showing what.

    Example: deepseg models trust renal-unest   (then: deepseg segment --model renal-unest ...)
    """
    from .models.monai_bundle import trusted_code_summary
    from .models.store import ModelStore

    with reported(as_json):
        store = ModelStore()
        stored = store.verify(name)
        what_runs = trusted_code_summary(stored.model_path) if (stored.model_path / "configs").is_dir() else []
        updated = store.set_trusted(name, not revoke, what_runs)
        lines = [f"  {line}" for line in what_runs]
        lines.append(f"{name}: {'trusted' if updated.trusted else 'not trusted'} (recorded in {updated.path})")
        emit({"id": name, "trusted": bool(updated.trusted), "what_runs": what_runs}, as_json, lines)


@models_app.command("remove", cls=PlainUsage)
def models_remove(name: str = typer.Argument(..., metavar="NAME"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete a model from the store.

    Example: deepseg models remove brain
    """
    from .models.store import ModelStore

    with reported(as_json):
        ModelStore().remove(name)
        emit({"removed": name}, as_json, [f"removed {name}"])
