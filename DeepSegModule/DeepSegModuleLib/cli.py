"""The ``deepseg`` command: DeepSeg's engine without Slicer's GUI, writing Slicer's own files.

Every output opens in 3D Slicer as it would have looked in the panel. Every command exits 0 on success and
non-zero with a one-line reason on failure, leaves no partial output behind, and prints JSON with ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .outputs import OutputSet

app = typer.Typer(
    name="deepseg",
    help="Deep-learning segmentation and registration that writes 3D Slicer scenes, segmentations and transforms.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: typer's rich layout shows every flag as taking a value ("--json <bool>")
    rich_markup_mode=None,
)
models_app = typer.Typer(help="Manage the local model store (~/.deepseg/models, or $DEEPSEG_MODEL_DIR).",
                         no_args_is_help=True, rich_markup_mode=None)
app.add_typer(models_app, name="models")

LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SEGMENTATION_SUFFIX = ".seg.nrrd"
TRANSFORM_SUFFIXES = (".h5", ".tfm")


class CommandError(Exception):
    """A failure to report in one line (exit code 1)."""


def _emit(summary: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps({"ok": True, **summary}, indent=2, default=_json_default))
    else:
        for line in lines:
            typer.echo(line)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _fail(message: str, as_json: bool) -> None:
    message = " ".join(str(message).split())  # one line, whatever the exception held
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message}))
    else:
        typer.echo(f"deepseg: error: {message}", err=True)
    raise typer.Exit(code=1)


@contextmanager
def _reported(as_json: bool):
    """Turns the errors a user can fix into one line and exit code 1."""
    from .jobs import JobCancelled, JobFailed
    from .models.errors import ModelError
    from .storage import StorageError

    try:
        yield
    except typer.Exit:
        raise
    except (CommandError, StorageError, JobFailed, JobCancelled, OSError, ValueError, KeyError, ModelError) as error:
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        _fail(str(text), as_json)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (SEGMENTATION_SUFFIX, ".nii.gz", ".nii", ".nrrd", ".mha", ".h5", ".tfm", ".json", ".png"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _check_output(path: Path | None, allowed: tuple[str, ...], what: str) -> None:
    """Fails before any work when an output cannot be written where the user asked."""
    if path is None:
        return
    if _suffix(path) not in allowed:
        raise CommandError(f"{what} {path} must end in one of {', '.join(allowed)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CommandError(f"output folder {folder} does not exist: create it or choose another {what}")
    if not os.access(folder, os.W_OK):
        raise CommandError(f"output folder {folder} is not writable: choose another {what}")


def _checked(options):
    """The options object once its fields are valid (no torch), else the reason as the command's one line; CUDA
    on a machine without a GPU is refused here too, before anything is read (torch: under 1 s)."""
    try:
        options.checked()
    except ValueError as error:
        raise CommandError(f"--{str(error).replace('_', '-')}") from None
    device = str(options.device).strip().lower()
    if device.startswith("cuda") and (not _torch_built_with_cuda() or not _cuda_available()):
        raise CommandError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    return options


def _torch_built_with_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from its version file (importing torch takes a second)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return True  # cannot tell: let torch answer
    match = re.search(r"^cuda\b[^=\n]*=\s*(.+)$", text, re.MULTILINE)
    return match is None or match.group(1).strip() not in ("None", "''", '""')


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_input(path: Path, what: str) -> Path:
    if not path.exists():
        raise CommandError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CommandError(f"{what} {path} is a folder: pass an image file (.nii.gz, .nrrd, .mha)")
    return path


def resolve_model(model: str | None) -> Path:
    """A model argument as a path (see :func:`~DeepSegModuleLib.models.store.resolve_model`); None is the default
    model that ships with DeepSeg."""
    from .models.store import ModelStore
    from .models.store import resolve_model as resolve

    return resolve(model, ModelStore())


def _logic(worker=None):
    """A factory of logics on a context; one case per command runs the engine in this process, while a batch
    passes its persistent worker so the model stays loaded from case to case."""
    from .jobs import InProcessWorker
    from .logic import DeepSegLogic

    shared = worker or InProcessWorker()
    return lambda context: DeepSegLogic(context, shared)


@contextmanager
def _progress_bar(quiet: bool):
    """Yields an ``on_event`` callback that drives a progress bar (stage name, bar, time left) on stderr.

    On a terminal it is a live rich progress bar; when stderr is a file or a pipe, one line per stage; with
    ``--json`` (``quiet``) nothing, so standard output stays machine-readable.
    """
    if quiet:
        yield lambda event: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        last_stage = [""]

        def log_stage(event) -> None:
            if event.kind == "progress" and event.stage != last_stage[0]:
                last_stage[0] = event.stage
                typer.echo(f"  {event.stage} ...", err=True)

        yield log_stage
        return
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting", total=1.0)

        def update(event) -> None:
            if event.kind == "progress":
                progress.update(task, description=event.stage, completed=event.fraction)

        yield update


# ------------------------------------------------------------------------------------------------ segment


@app.command()
def segment(
    inputs: list[Path] = typer.Option(
        ..., "--input", "-i", metavar="<image>", help="Input image(s), in the model's input order (repeat -i)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="OUT.seg.nrrd (segments) or OUT.nii.gz/.nrrd (label map)."),
    model: str | None = typer.Option(
        None, "--model", "-m",
        help="Model folder/file, or a name in the model store (default: the bundled brain tissue model, deepseg-brain).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    labels: str | None = typer.Option(None, help="Comma-separated label names to keep (default: all)."),
    probabilities: Path | None = typer.Option(None, help="Folder for one probability map (.nii.gz) per label."),
    mirroring: bool = typer.Option(
        False, "--mirroring", "--tta", help="Mirroring test-time augmentation (slower, a little better)."
    ),
    precision: str = typer.Option(
        "auto", help="Network arithmetic: auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), fp32, bf16, fp16."
    ),
    overlap: float | None = typer.Option(None, help="Sliding-window overlap, 0..1 (default: the model's)."),
    preview: Path | None = typer.Option(None, help="Also write a PNG with three slices and the segments."),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="Let a MONAI bundle run code outside DeepSeg's allow-list (its scripts/, any "
        "expression). Only for bundles whose author you trust; what will run is printed first.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files that already exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines (errors and warnings still show)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Segment an image with a model; write a Slicer segmentation or a label map.

    Example: deepseg segment --input T1.nii.gz --output brain.seg.nrrd   (the bundled brain tissue model)
    """
    from .segmentation.options import SegmentationOptions

    with _reported(as_json):
        options = _checked(SegmentationOptions(
            device=device, overlap=overlap, mirroring=mirroring, precision=precision, labels=_label_names(labels),
            probabilities=probabilities is not None, trust_code=trust_code,
        ))  # fmt: skip
        _check_output(output, (SEGMENTATION_SUFFIX, *LABEL_MAP_SUFFIXES), "--output")
        _check_output(preview, (".png",), "--preview")
        for path in inputs:
            _check_input(path, "input")
        from .models.store import ModelStore, recorded_trust

        model_path = resolve_model(model)
        if not options.trust_code and model is not None and recorded_trust(model, ModelStore()):
            options.trust_code = True
            typer.echo(f"deepseg: {model} runs its own code: you trusted it (deepseg models trust {model} --revoke "
                       "withdraws that)", err=True)
        if options.trust_code and (model_path / "configs").is_dir():
            from .models.monai_bundle import trusted_code_summary

            for line in trusted_code_summary(model_path):
                typer.echo(f"deepseg: --trust-code: {line}", err=True)
        outputs = OutputSet(inputs=[*inputs, model_path], overwrite=overwrite)
        outputs.claim(output, "--output")
        if preview is not None:
            outputs.claim(preview, "--preview")
        if probabilities is not None:
            outputs.claim_folder(probabilities, "--probabilities")

        with _progress_bar(as_json or quiet) as on_event:
            summary = segment_files(
                _logic(), inputs, output, model_path, options, probabilities=probabilities, preview=preview,
                on_event=on_event, outputs=outputs,
            )
        lines = [f"  {name:<30s} {volume:10.2f} ml" for name, volume in summary["segments_ml"].items()]
        lines += [f"  {stage:<30s} {seconds:8.2f} s" for stage, seconds in summary.get("timings_s", {}).items()]
        lines += [f"  note: {message}" for message in summary.get("messages", []) if not message.startswith("Warning:")]
        for message in summary.get("messages", []):
            if message.startswith("Warning:"):  # on stderr too, so that it is seen with --json and in a batch log
                typer.echo(f"deepseg: warning: {message.removeprefix('Warning: ')}", err=True)
        lines.append(f"wrote {output}")
        _emit(summary, as_json, lines)


def _label_names(text: str | None) -> list[str] | None:
    """``--labels a,b`` as names; None (all labels) when empty."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


def segment_files(
    logic_factory, inputs: list[Path], output: Path, model_path: Path, options, *, probabilities: Path | None = None,
    preview: Path | None = None, on_event=None, outputs: OutputSet | None = None,
) -> dict[str, Any]:
    """One case: reads ``inputs``, segments with ``model_path`` and ``options`` (a
    :class:`~DeepSegModuleLib.segmentation.options.SegmentationOptions`), writes ``output`` (and the probability
    maps into the folder ``probabilities``, the ``preview``); all or nothing.

    ``logic_factory(context)`` gives the :class:`DeepSegLogic` to run with (its worker may be shared by cases).
    ``outputs`` holds the checked output paths (see :mod:`~DeepSegModuleLib.outputs`); by default the outputs are
    checked here, with no file replaced.
    """
    if outputs is None:
        outputs = OutputSet(inputs=[*inputs, model_path])
        outputs.claim(output, "output")
    from . import nodes, storage
    from .context import SceneContext

    context = SceneContext.headless()
    volumes = [storage.load_volume(context, path) for path in inputs]
    options = options.replace(probabilities=probabilities is not None)
    outcome = logic_factory(context).start_segment(volumes, str(model_path), options, on_event=on_event).wait()
    result = outcome.result
    try:
        if _suffix(output) == SEGMENTATION_SUFFIX:
            storage.save_node(context, outcome.segmentation, outputs.stage(output))
        else:
            storage.save_array_like_file(outputs.stage(output), result.labels, result.ijk_to_ras, like=inputs[0])
        probability_files = {}
        for name, node in outcome.probabilities.items():
            path = probabilities / f"{_file_safe(name)}.nii.gz"
            storage.save_node(context, node, outputs.stage(path))
            probability_files[name] = str(path)
        if preview is not None:
            from .preview import write_preview

            image, grid = nodes.volume_to_array(volumes[0])
            write_preview(outputs.stage(preview), image, grid, result.labels, result.label_table,
                          title=f"{inputs[0].name}: {model_path.name}")  # fmt: skip
        outputs.commit()
    except BaseException:
        outputs.rollback()
        raise
    return {
        "output": str(output),
        "model": str(model_path),
        "segments_ml": result.volumes_ml(),
        "probabilities": probability_files,
        **result.report(),
    }


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "label"


# ------------------------------------------------------------------------------------------------ register


@app.command()
def register(
    fixed: Path = typer.Option(..., help="Fixed (reference) image."),
    moving: Path = typer.Option(..., help="Moving image, to be aligned with the fixed one."),
    output_transform: Path = typer.Option(..., help="OUT.h5 / OUT.tfm: the transform Slicer, ITK and ANTs read."),
    output_volume: Path | None = typer.Option(None, help="The moving image resampled onto the fixed grid."),
    moving_segmentation: Path | None = typer.Option(None, help="Segmentation (.seg.nrrd) or label map on the moving image."),
    output_segmentation: Path | None = typer.Option(None, help="Where the moving segmentation lands on the fixed image."),
    preset: str = typer.Option("deformable fast", help="rigid, affine, deformable fast, deformable accurate, multimodal."),
    fixed_mask: Path | None = typer.Option(None, help="Mask (label map or .seg.nrrd) on the fixed image."),
    moving_mask: Path | None = typer.Option(None, help="Mask (label map or .seg.nrrd) on the moving image."),
    inverse_transform: Path | None = typer.Option(None, help="Also write the inverse transform (moving to fixed)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    report: Path | None = typer.Option(None, help="Write the quality report (folding, Dice, runtime) as JSON."),
    preview: Path | None = typer.Option(
        None, help="Also write a PNG: checkerboards of the fixed and the moving image, before and after."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files that already exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines (errors and warnings still show)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Register two images; write the transform (and optionally the resampled image and propagated labels).

    Example: deepseg register --fixed T1.nii.gz --moving FLAIR.nii.gz --preset multimodal --output-transform flair_to_t1.h5
    """
    with _reported(as_json):
        options = _checked_registration(preset, device, inverse=inverse_transform is not None)
        if (moving_segmentation is None) != (output_segmentation is None):
            raise CommandError("--moving-segmentation and --output-segmentation go together")
        _check_output(output_transform, TRANSFORM_SUFFIXES, "--output-transform")
        _check_output(inverse_transform, TRANSFORM_SUFFIXES, "--inverse-transform")
        _check_output(output_volume, LABEL_MAP_SUFFIXES, "--output-volume")
        _check_output(output_segmentation, (SEGMENTATION_SUFFIX, *LABEL_MAP_SUFFIXES), "--output-segmentation")
        _check_output(report, (".json",), "--report")
        _check_output(preview, (".png",), "--preview")
        for path, what in ((fixed, "--fixed"), (moving, "--moving"), (moving_segmentation, "--moving-segmentation"),
                           (fixed_mask, "--fixed-mask"), (moving_mask, "--moving-mask")):
            if path is not None:
                _check_input(path, what)
        outputs = OutputSet(inputs=[fixed, moving, moving_segmentation, fixed_mask, moving_mask], overwrite=overwrite)
        outputs.inputs = [p for p in outputs.inputs if p is not None]
        for path, what in ((output_transform, "--output-transform"), (inverse_transform, "--inverse-transform"),
                           (output_volume, "--output-volume"), (output_segmentation, "--output-segmentation"),
                           (report, "--report"), (preview, "--preview")):
            if path is not None:
                outputs.claim(path, what)

        with _progress_bar(as_json or quiet) as on_event:
            summary, quality = register_files(
                _logic(), fixed, moving, output_transform, options, output_volume=output_volume,
                moving_segmentation=moving_segmentation, output_segmentation=output_segmentation, fixed_mask=fixed_mask,
                moving_mask=moving_mask, inverse_transform=inverse_transform, report=report, preview=preview,
                outputs=outputs, on_event=on_event,
            )  # fmt: skip
        lines = [f"  {line}" for line in quality.lines()]
        lines.append(f"wrote {output_transform}")
        _emit(summary, as_json, lines)


def _checked_registration(preset: str, device: str, inverse: bool = False):
    """The registration options of the flags, checked before anything is read."""
    from .registration.presets import RegistrationOptions, preset_names

    options = RegistrationOptions(preset=preset, device=device, inverse=inverse)
    try:
        options.config()
    except ValueError:
        raise CommandError(f"unknown preset {preset!r}: choose one of {', '.join(preset_names())}") from None
    return _checked(options)


def register_files(
    logic_factory, fixed: Path, moving: Path, output_transform: Path, options, *, output_volume: Path | None = None,
    moving_segmentation: Path | None = None, output_segmentation: Path | None = None, fixed_mask: Path | None = None,
    moving_mask: Path | None = None, inverse_transform: Path | None = None, report: Path | None = None,
    preview: Path | None = None, outputs: OutputSet | None = None, on_event=None,
):
    """One pair: reads the images, registers ``moving`` to ``fixed`` with ``options`` (a
    :class:`~DeepSegModuleLib.registration.presets.RegistrationOptions`), writes the transform (and the extras); all
    or nothing. ``logic_factory(context)`` gives the :class:`DeepSegLogic` (its worker may be shared by cases);
    ``outputs`` holds the checked output paths (by default they are checked here, with no file replaced).

    Returns:
        The summary (plain values, for JSON) and the :class:`~DeepSegModuleLib.registration.results.QualityReport`.
    """
    from . import nodes, storage
    from .context import SceneContext

    if outputs is None:
        outputs = OutputSet(inputs=[p for p in (fixed, moving, moving_segmentation, fixed_mask, moving_mask) if p])
        for path in (output_transform, inverse_transform, output_volume, output_segmentation, report, preview):
            if path is not None:
                outputs.claim(path)
    options = options.replace(inverse=inverse_transform is not None)
    context = SceneContext.headless()
    fixed_node = storage.load_volume(context, fixed)
    moving_node = storage.load_volume(context, moving)

    def load_labels(path: Path | None):
        if path is None:
            return None
        if _suffix(path) == SEGMENTATION_SUFFIX:
            return storage.load_segmentation(context, path)
        return storage.load_volume(context, path, labelmap=True)

    outcome = logic_factory(context).start_register(
        fixed_node, moving_node, options, fixed_mask=load_labels(fixed_mask), moving_mask=load_labels(moving_mask),
        moving_segmentation=load_labels(moving_segmentation), on_event=on_event,
    ).wait()
    check_points = _check_points(fixed_node)
    mapped = nodes.transform_points(outcome.transform, check_points)
    preset = options.preset if isinstance(options.preset, str) else "custom"
    try:
        storage.save_node(context, outcome.transform, outputs.stage(output_transform))
        if inverse_transform is not None:
            storage.save_node(context, outcome.inverse_transform, outputs.stage(inverse_transform))
        if output_volume is not None:
            storage.save_node(context, outcome.volume, outputs.stage(output_volume))
        if output_segmentation is not None:
            if _suffix(output_segmentation) == SEGMENTATION_SUFFIX:
                storage.save_node(context, outcome.segmentation, outputs.stage(output_segmentation))
            else:
                storage.save_array_like_file(
                    outputs.stage(output_segmentation), outcome.outputs.propagated_labels, outcome.fixed_ijk_to_ras,
                    like=fixed,
                )
        summary = {
            "output_transform": str(output_transform),
            "transform_kind": "linear" if outcome.transform.IsA("vtkMRMLLinearTransformNode") else "grid",
            "preset": preset,
            "check_points": {"fixed_ras": check_points.tolist(), "moving_ras": mapped.tolist()},
            "quality": outcome.quality.as_dict(),
            "device": outcome.outputs.device,
        }
        if report is not None:
            outputs.stage(report).write_text(json.dumps(summary, indent=2, default=_json_default), encoding="utf-8")
        if preview is not None:
            _write_registration_preview(outputs.stage(preview), fixed_node, moving_node, outcome.volume,
                                        title=f"{fixed.name} and {moving.name}: {preset}")  # fmt: skip
        outputs.commit()
    except BaseException:
        outputs.rollback()
        raise
    return summary, outcome.quality


def _write_registration_preview(path: Path, fixed_node, moving_node, registered_node, title: str) -> Path:
    from . import nodes
    from .preview import write_registration_preview
    from .segmentation.volume import VolumeArray, resample_onto

    fixed, grid = nodes.volume_to_array(fixed_node, world=True)
    moving, moving_grid = nodes.volume_to_array(moving_node, world=True)
    before = resample_onto(VolumeArray(moving, moving_grid), VolumeArray(fixed, grid)).array
    after, _ = nodes.volume_to_array(registered_node, world=True)
    return write_registration_preview(path, fixed, before, after, grid, title=title)


def _check_points(volume_node) -> np.ndarray:
    """The fixed image's centre and points a quarter of the way in along each axis (RAS), for the report."""
    from . import nodes

    array, grid = nodes.volume_to_array(volume_node, world=True)
    size = np.array(array.shape[::-1], dtype=float) - 1
    fractions = np.array([[0.5, 0.5, 0.5], [0.25, 0.5, 0.5], [0.5, 0.25, 0.5], [0.5, 0.5, 0.25], [0.75, 0.75, 0.75]])
    ijk = fractions * size
    return (grid @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]


# ------------------------------------------------------------------------------------------------ models


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the models in the store, and those that ship with DeepSeg (marked "bundled").

    Example: deepseg models list
    """
    from .models.errors import ModelFileError
    from .models.store import DEFAULT_MODEL_ID, ModelStore

    with _reported(as_json):
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
        _emit({"store": str(store.root), "models": entries}, as_json, lines or [f"  (no models in {store.root})"])


@models_app.command("import")
def models_import(
    source: str = typer.Argument(
        ..., metavar="SOURCE", help="A model folder, .zip, TorchScript file, or an http(s)/file URL."
    ),
    sha256: str | None = typer.Option(None, help="Expected sha256 of the file or archive (refused otherwise)."),
    name: str | None = typer.Option(None, "--name", help="Store the model under this name."),
    replace: bool = typer.Option(False, help="Replace a stored model of the same name."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Copy a model into the store (checksums recorded, archives extracted safely).

    Example: deepseg models import ./Task001_Brain.zip --sha256 3f2a...  --name brain
    """
    from .download import download, is_url
    from .models.store import ModelStore

    with _reported(as_json):
        store = ModelStore()
        if is_url(source):
            with tempfile.TemporaryDirectory(prefix="deepseg-download-") as folder:
                path = download(source, folder, expected_sha256=sha256)
                # A URL should name one file holding the whole model: a .zip of a bundle, nnU-Net folder or
                # TorchScript file with its card.
                stored = store.import_model(path, model_id=name, replace=replace)
        else:
            stored = store.import_model(Path(source).expanduser(), model_id=name, expected_sha256=sha256, replace=replace)
        _emit({"id": stored.model_id, "path": str(stored.path), "files": stored.files}, as_json,
              [f"imported {stored.model_id} into {stored.path} ({len(stored.files)} files, sha256 recorded)"])


@models_app.command("info")
def models_info(name: str = typer.Argument(..., metavar="NAME"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a stored model's files, checksums status and, where readable, its labels.

    Example: deepseg models info brain
    """
    from .models.store import ModelStore

    with _reported(as_json):
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
        _emit(info, as_json, lines)


@models_app.command("trust")
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

    with _reported(as_json):
        store = ModelStore()
        stored = store.verify(name)
        what_runs = trusted_code_summary(stored.model_path) if (stored.model_path / "configs").is_dir() else []
        updated = store.set_trusted(name, not revoke, what_runs)
        lines = [f"  {line}" for line in what_runs]
        lines.append(f"{name}: {'trusted' if updated.trusted else 'not trusted'} (recorded in {updated.path})")
        _emit({"id": name, "trusted": bool(updated.trusted), "what_runs": what_runs}, as_json, lines)


@models_app.command("remove")
def models_remove(name: str = typer.Argument(..., metavar="NAME"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete a model from the store.

    Example: deepseg models remove brain
    """
    from .models.store import ModelStore

    with _reported(as_json):
        ModelStore().remove(name)
        _emit({"removed": name}, as_json, [f"removed {name}"])


# ------------------------------------------------------------------------------------------------ batch

batch_app = typer.Typer(help="Run over a cohort: resumable, one failed case does not stop the others.",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(batch_app, name="batch")


def _print_table(results, as_json: bool, title: str) -> None:
    from .batch import iter_rows

    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("case", "status", "seconds", "details"):
        table.add_column(column, overflow="fold")
    for row in iter_rows(results):
        table.add_row(*row)
    Console(stderr=False, width=160).print(table)


def _finish_batch(results, as_json: bool, title: str, output_dir: Path) -> None:
    from dataclasses import asdict

    from .batch import write_summary_csv

    _print_table(results, as_json, title)
    failed = [result.name for result in results if result.status == "failed"]
    summary = {"cases": [asdict(result) for result in results], "failed": failed}
    summary["summary_csv"] = str(write_summary_csv(results, output_dir))
    if as_json:
        typer.echo(json.dumps({"ok": not failed, **summary}, indent=2, default=_json_default))
    if failed:
        if not as_json:
            typer.echo(f"deepseg: error: {len(failed)} of {len(results)} case(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(code=1)


@batch_app.command("segment")
def batch_segment(
    cases: Path = typer.Option(..., help="A folder of images (one case each) or a CSV: case,input[,input2,...]."),
    output_dir: Path = typer.Option(..., help="Outputs go here as <case>.seg.nrrd (or --format nii.gz)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model folder/file, or a name in the model store (default: deepseg-brain)."
    ),
    output_format: str = typer.Option("seg.nrrd", "--format", help="seg.nrrd (segments) or nii.gz (label maps)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    labels: str | None = typer.Option(None, help="Comma-separated label names to keep."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files of unfinished cases that exist."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Segment every case; a re-run skips finished cases.

    Example: deepseg batch segment --model brain --cases scans/ --output-dir results/
    """
    from .batch import read_cases, run_cases
    from .jobs import ProcessWorker
    from .segmentation.options import SegmentationOptions

    with _reported(as_json):
        if output_format not in ("seg.nrrd", "nii.gz"):
            raise CommandError("--format must be seg.nrrd or nii.gz")
        options = _checked(SegmentationOptions(device=device, labels=_label_names(labels)))
        model_path = resolve_model(model)
        case_list = read_cases(cases, ("input",), optional=tuple(f"input{n}" for n in range(2, 9)))
        output_dir.mkdir(parents=True, exist_ok=True)
        worker = ProcessWorker()  # one process for the cohort: the model is loaded once

        def process(case, outputs):
            inputs = [case.files[key] for key in ("input", *[f"input{n}" for n in range(2, 9)]) if key in case.files]
            for path in inputs:
                _check_input(path, f"input of case {case.name}")
            checked = OutputSet(inputs=[*inputs, model_path], overwrite=overwrite, root=output_dir)
            checked.claim(outputs["segmentation"], f"output of case {case.name}")
            summary = segment_files(_logic(worker), inputs, outputs["segmentation"], model_path, options,
                                    outputs=checked)
            return {f"{name} ml": volume for name, volume in summary["segments_ml"].items()}

        def report(result):
            if not as_json:
                typer.echo(f"  {result.name}: {result.status}" + (f" ({result.error})" if result.error else ""), err=True)

        try:
            results = run_cases(
                case_list, output_dir, lambda case: {"segmentation": output_dir / f"{case.name}.{output_format}"},
                process, report,
            )
        finally:
            worker.shutdown()
    _finish_batch(results, as_json, f"deepseg batch segment: {len(results)} case(s)", output_dir)


@batch_app.command("register")
def batch_register(
    cases: Path = typer.Option(..., help="A CSV: case,fixed,moving[,moving_segmentation]."),
    output_dir: Path = typer.Option(..., help="<case>.h5 (+ <case>.nrrd, <case>.seg.nrrd) go here."),
    preset: str = typer.Option("deformable fast", help="rigid, affine, deformable fast, deformable accurate, multimodal."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files of unfinished cases that exist."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Register every case's moving image to its fixed image; a re-run skips finished cases.

    Example: deepseg batch register --cases pairs.csv --output-dir transforms/ --preset affine
    """
    from .batch import read_cases, run_cases
    from .jobs import ProcessWorker

    with _reported(as_json):
        options = _checked_registration(preset, device)
        case_list = read_cases(cases, ("fixed", "moving"), optional=("moving_segmentation",))
        output_dir.mkdir(parents=True, exist_ok=True)

        def outputs_of(case):
            outputs = {"transform": output_dir / f"{case.name}.h5", "volume": output_dir / f"{case.name}.nrrd"}
            if "moving_segmentation" in case.files:
                outputs["segmentation"] = output_dir / f"{case.name}.seg.nrrd"
            return outputs

        worker = ProcessWorker()  # one process for the cohort, as for segmentation

        def process(case, outputs):
            for key in case.files:
                _check_input(case.files[key], f"{key} of case {case.name}")
            checked = OutputSet(inputs=[Path(p) for p in case.files.values()], overwrite=overwrite, root=output_dir)
            for kind, path in outputs.items():
                checked.claim(path, f"{kind} of case {case.name}")
            _, quality = register_files(
                _logic(worker), case.files["fixed"], case.files["moving"], outputs["transform"], options,
                output_volume=outputs["volume"], moving_segmentation=case.files.get("moving_segmentation"),
                output_segmentation=outputs.get("segmentation"), outputs=checked,
            )  # fmt: skip
            result = {key: getattr(quality, key) for key in ("folding_percent", "log_jacobian_std")
                      if getattr(quality, key) is not None}  # fmt: skip
            if "total" in quality.runtime_s:
                result["engine_s"] = round(quality.runtime_s["total"], 2)
            return result

        try:
            results = run_cases(case_list, output_dir, outputs_of, process)
        finally:
            worker.shutdown()
    _finish_batch(results, as_json, f"deepseg batch register: {len(results)} case(s)", output_dir)


# ------------------------------------------------------------------------------------------------ demo, version


@app.command()
def demo(
    output: Path = typer.Option(Path("deepseg-demo"), "--output", "-o", help="Folder for the scene and files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier demo in that folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines (errors still show)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Register two real brain MRIs shipped with packages, segment one with the bundled model; write a Slicer scene.

    Offline: the MNI152 template (nilearn) is registered to a subject T1 (nibabel's test data) and carries its
    tissues over; the bundled deepseg-brain model segments the template; both results, the transform, pictures
    and a .mrb scene are written.

    Example: deepseg demo --output ~/deepseg-demo  (then open deepseg-demo/deepseg-demo.mrb in 3D Slicer)
    """
    from .demo import run_demo

    with _reported(as_json):
        def step(name: str) -> None:
            if not (quiet or as_json):
                typer.echo(f"  {name} ...", err=True)

        summary = run_demo(output, overwrite=overwrite, on_step=step)
        lines = [f"  {step:<52s} {seconds:6.2f} s" for step, seconds in summary["timings_s"].items()]
        lines.append("  the subject is a crop of nibabel's sample head (part of the brain), so its volumes are partial:")
        lines += [f"  subject {name:<22s} {volume:8.1f} ml" for name, volume in summary["subject_segments_ml"].items()]
        model_name = summary["model"].rstrip("/").split("/")[-1]
        lines.append(f"  {model_name} against the template's own tissue maps (its brain mask is what it was measured "
                     "on; its grey/white matter are coarse, see docs/model_card.md):")  # fmt: skip
        lines += [f"    {name:<20s} Dice {dice}" for name, dice in summary["agreement_dice"].items()]
        lines += [f"  wrote {kind:<22s} {path}" for kind, path in summary["files"].items()]
        lines.append(f"Open {summary['files']['scene']} in 3D Slicer (File > Open Data).")
        _emit(summary, as_json, lines)


def _print_version_and_exit(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version_and_exit, is_eager=True,
        help="Print DeepSeg's version and the versions of the libraries it runs on, then exit.",
    ),
) -> None:
    """Deep-learning segmentation and registration that writes 3D Slicer scenes, segmentations and transforms."""


@app.command()
def version() -> None:
    """Print DeepSeg's version and the versions of the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from . import __version__

    typer.echo(f"deepseg {__version__}")
    for package in ("slicer-core", "vtk", "torch", "monai", "SimpleITK"):
        try:
            typer.echo(f"  {package} {package_version(package)}")
        except PackageNotFoundError:
            typer.echo(f"  {package} (not installed)")


INTERRUPTED = 130


def _interrupted() -> int:
    """Ctrl-C: outputs were staged and have been rolled back as the interrupt passed through the command; what
    is left is to stop the workers and remove the scenes' temporary folders. Returns exit code 130."""
    from .context import remove_temporary_folders
    from .jobs import kill_all_workers

    kill_all_workers()
    remove_temporary_folders()
    sys.stderr.write("deepseg: interrupted; nothing was written\n")
    sys.stderr.flush()
    return INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Runs one ``deepseg`` command; returns its exit code (130 when interrupted with Ctrl-C)."""
    try:
        # Outside standalone mode click hands back a command's exit code instead of calling sys.exit.
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int):
            # click hands back Exit(130), which typer makes of Ctrl-C, as a return value
            return _interrupted() if result == INTERRUPTED else result
    except typer.Exit as stop:
        # typer turns Ctrl-C into Exit(130) itself
        return _interrupted() if stop.exit_code == INTERRUPTED else stop.exit_code
    except SystemExit as stop:
        return int(stop.code or 0)
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted()
    except Exception as error:  # click's usage errors: one line, exit code 2
        message = getattr(error, "format_message", lambda: str(error))()
        if type(error).__name__ == "NoArgsIsHelpError":  # `deepseg` or `deepseg models` alone: the help
            typer.echo(message, err=True)
            return 2
        typer.echo(f"deepseg: error: {message}", err=True)
        return 2
    return 0


def entry_point() -> None:  # pragma: no cover - the console script
    """The ``deepseg`` console script: :func:`main`, then an exit that an interrupted engine cannot turn into an
    abort (a torch thread still busy at interpreter shutdown ends the process with "terminate called...")."""
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry_point()
