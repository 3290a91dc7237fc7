"""What every ``deepseg`` command shares: one-line errors, JSON or text output, argument checks that run before
anything heavy is imported, model resolution, the logic factory and the progress bar."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from .file_runs import json_default, suffix


class PlainUsage(TyperCommand):
    """A command whose usage line names its required arguments as click does (``NAME``), not in typer's braces
    (``{NAME}``), which read as a literal to type."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece for piece in pieces]


class CommandError(ValueError):
    """A failure to report in one line (exit code 1)."""


def emit(summary: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps({"ok": True, **summary}, indent=2, default=json_default))
    else:
        for line in lines:
            typer.echo(line)


def _fail(message: str, as_json: bool, choices: list[dict[str, Any]] | None = None) -> None:
    message = " ".join(str(message).split())  # one line, whatever the exception held
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message, **({"choices": choices} if choices else {})}))
    else:
        typer.echo(f"deepseg: error: {message}", err=True)
        for choice in choices or []:  # a study folder's series, one a line, to copy a UID from
            typer.echo(f"  {choice['series_uid'] or '(no UID)'}  {choice['modality']}  {choice['images']} images  "
                       f"{choice['description'] or '(no description)'}", err=True)  # fmt: skip
    raise typer.Exit(code=1)


@contextmanager
def reported(as_json: bool):
    """Turns the errors a user can fix into one line and exit code 1."""
    from .dicom_series import AmbiguousSeries
    from .jobs import JobCancelled, JobFailed
    from .models.errors import ModelError
    from .storage import StorageError

    try:
        yield
    except typer.Exit:
        raise
    except AmbiguousSeries as error:
        _fail(error.headline, as_json, error.choices)
    except (CommandError, StorageError, JobFailed, JobCancelled, OSError, ValueError, KeyError, ModelError) as error:
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        _fail(str(text), as_json)


def check_output(path: Path | None, allowed: tuple[str, ...], what: str) -> None:
    """Fails before any work when an output cannot be written where the user asked."""
    if path is None:
        return
    if suffix(path) not in allowed:
        raise CommandError(f"{what} {path} must end in one of {', '.join(allowed)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CommandError(f"output folder {folder} does not exist: create it or choose another {what}")
    if not os.access(folder, os.W_OK):
        raise CommandError(f"output folder {folder} is not writable: choose another {what}")


def checked_options(options):
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


def check_input(path: Path, what: str, dicom=None) -> Path:
    """Fails before any work when an input is missing, or is a folder without one DICOM series to read (several
    that ``dicom``, a :class:`~DeepSegModuleLib.dicom_series.SeriesChoice`, does not tell apart are listed)."""
    if not path.exists():
        raise CommandError(f"{what} {path} does not exist")
    if path.is_dir():
        from .dicom_series import SeriesChoice, find_series

        find_series(path, dicom or SeriesChoice())
    return path


# Options that every command reading images shares: which series of a DICOM folder to read.
SERIES_OPTION = typer.Option(
    None, "--series", metavar="UID", help="DICOM: the Series Instance UID to read where a folder holds several (repeat "
    "for the folders of a pair).",
)  # fmt: skip
MODALITY_OPTION = typer.Option(None, "--modality", help="DICOM: read the series of this modality (CT, MR, PT).")
DESCRIPTION_OPTION = typer.Option(
    None, "--series-description", help="DICOM: read the series whose description is (or contains) this."
)
SEG_ENCODING_OPTION = typer.Option(
    "labelmap", "--seg-encoding", help="DICOM SEG encoding: labelmap (one frame per image, smallest) or binary "
    "(one bit-packed frame per segment and image, for older readers).",
)  # fmt: skip
RAY_OPTION = typer.Option(
    None, "--ray", metavar="[ADDRESS]",
    help="Run the cases on Ray: --ray alone starts a local Ray on this machine; --ray ADDRESS (e.g. auto, "
    "ray://head:10001) joins a cluster. Inputs and outputs must be on paths every node sees.",
)  # fmt: skip
CPUS_PER_ACTOR_OPTION = typer.Option(
    1, "--cpus-per-actor", min=1, help="With --ray and no GPUs: CPU cores per worker (one model each)."
)


#: Options that may stand alone or take a value (click's options always take one): alone, they get this value.
OPTIONAL_VALUES = {"--ray": "local"}


def with_optional_values(argv: list[str]) -> list[str]:
    """``argv`` with the value of a bare ``--ray`` (last, or before another option) filled in as ``local``."""
    filled: list[str] = []
    for index, argument in enumerate(argv):
        filled.append(argument)
        if argument in OPTIONAL_VALUES and (index + 1 == len(argv) or argv[index + 1].startswith("-")):
            filled.append(OPTIONAL_VALUES[argument])
    return filled


def series_choice(series: list[str] | None, modality: str | None, description: str | None):
    """The :class:`~DeepSegModuleLib.dicom_series.SeriesChoice` of the DICOM flags."""
    from .dicom_series import SeriesChoice

    return SeriesChoice(tuple(s.strip() for s in series or () if s.strip()), modality, description)


def check_seg_encoding(encoding: str) -> str:
    from .dicom_seg import ENCODINGS

    if encoding not in ENCODINGS:
        raise CommandError(f"--seg-encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    return encoding


def resolve_model(model: str | None) -> Path:
    """A model argument as a path (see :func:`~DeepSegModuleLib.models.store.resolve_model`); None is the default
    model that ships with DeepSeg."""
    from .models.store import ModelStore
    from .models.store import resolve_model as resolve

    return resolve(model, ModelStore())


def logic_factory(worker=None):
    """A factory of logics on a context; one case per command runs the engine in this process, while a batch
    passes its persistent worker so the model stays loaded from case to case."""
    from .jobs import InProcessWorker
    from .logic import DeepSegLogic

    shared = worker or InProcessWorker()
    return lambda context: DeepSegLogic(context, shared)


@contextmanager
def progress_bar(quiet: bool):
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


def checked_registration(preset: str, device: str, inverse: bool = False):
    """The registration options of the flags, checked before anything is read."""
    from .registration.presets import RegistrationOptions, preset_names

    options = RegistrationOptions(preset=preset, device=device, inverse=inverse)
    try:
        options.config()
    except ValueError:
        raise CommandError(f"unknown preset {preset!r}: choose one of {', '.join(preset_names())}") from None
    return checked_options(options)


def file_size(size: float) -> str:
    """``"812 kB"``, ``"1.2 GB"``: a byte count as a person reads it (decimal units, as download sizes are given)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "kB") else f"{size:.1f} {unit}"
        size /= 1000.0
    return f"{size:.1f} GB"


def download_progress(url: str, on_event):
    """A ``download(progress=...)`` callback that drives :func:`progress_bar`: the stage names the file and its
    size, the bar its fraction, so a terminal shows the time left."""
    from .download import file_name_of
    from .jobs import JobEvent

    def report(received: int, total: int | None) -> None:
        size = f", {file_size(total)}" if total else ""
        fraction = received / total if total else 0.0
        on_event(JobEvent("progress", stage=f"downloading {file_name_of(url)}{size}", fraction=fraction))

    return report
