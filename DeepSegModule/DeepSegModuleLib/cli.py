"""The ``deepseg`` command: DeepSeg's engine without Slicer's GUI, writing Slicer's own files.

Every output opens in 3D Slicer as it would have looked in the panel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="deepseg",
    help="Deep-learning segmentation and registration that writes 3D Slicer scenes, segmentations and transforms.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message}))
    else:
        typer.echo(f"deepseg: error: {message}", err=True)
    raise typer.Exit(code=1)


@app.command()
def demo(
    output: Path = typer.Option(Path("deepseg-demo"), "--output", "-o", help="Folder for the scene and files."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Build a Slicer scene from a real brain MRI shipped with a package, and write it. Offline.

    Example: deepseg demo --output ~/deepseg-demo  (then open deepseg-demo/deepseg-demo.mrb in 3D Slicer)
    """
    from .demo import run_demo

    try:
        summary = run_demo(output)
    except (OSError, ValueError, RuntimeError) as error:
        _fail(str(error), as_json)
    if as_json:
        typer.echo(json.dumps({"ok": True, **summary}, indent=2))
        return
    for step, seconds in summary["timings_s"].items():
        typer.echo(f"  {step:<28s} {seconds:6.2f} s")
    for kind, path in summary["files"].items():
        typer.echo(f"  wrote {kind:<14s} {path}")
    typer.echo(f"Open {summary['files']['scene']} in 3D Slicer (File > Open Data).")


@app.command()
def version() -> None:
    """Print DeepSeg's version and the versions of the libraries it runs on."""
    from . import __version__

    typer.echo(f"deepseg {__version__}")
    for package in ("slicer-core", "vtk", "torch", "monai", "SimpleITK"):
        try:
            from importlib.metadata import version as package_version

            typer.echo(f"  {package} {package_version(package)}")
        except Exception:  # noqa: BLE001 - an optional package that is not installed
            typer.echo(f"  {package} (not installed)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deepseg`` console script."""
    try:
        # Outside standalone mode click hands back a command's exit code instead of calling sys.exit.
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int):
            return result
    except typer.Exit as stop:
        return stop.exit_code
    except SystemExit as stop:  # click's own usage errors
        return int(stop.code or 0)
    except Exception as error:  # click.UsageError and friends: one line, non-zero
        message = getattr(error, "format_message", lambda: str(error))()
        typer.echo(f"deepseg: error: {message}", err=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
