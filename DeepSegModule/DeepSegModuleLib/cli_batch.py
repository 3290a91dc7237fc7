"""``deepseg batch segment|register``: a cohort, resumable, one failed case reported without stopping the others."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli_common import (
    CommandError,
    check_input,
    checked_options,
    checked_registration,
    logic_factory,
    reported,
    resolve_model,
)
from .file_runs import json_default, register_files, segment_files
from .jobs import format_duration
from .outputs import OutputSet
from .segmentation.options import label_names

batch_app = typer.Typer(help="Run over a cohort: resumable, one failed case does not stop the others.",
                        no_args_is_help=True, rich_markup_mode=None)


def case_lines(total: int, quiet: bool):
    """An ``on_result`` for :func:`~DeepSegModuleLib.batch.run_cases` that prints ``[i/n] case: status (seconds)`` on
    standard error, with the time left for the cases still to run (from the mean of those run so far)."""
    done, run_seconds = [0], []

    def report(result) -> None:
        done[0] += 1
        if result.status != "skipped":
            run_seconds.append(result.seconds)
        if quiet:
            return
        line = f"  [{done[0]}/{total}] {result.name}: {result.status}"
        if result.status != "skipped":
            line += f" ({result.seconds:.1f} s"
            left = total - done[0]
            line += f"; about {format_duration(left * sum(run_seconds) / len(run_seconds))} left)" if left else ")"
        if result.error:
            line += f": {result.error}"
        typer.echo(line, err=True)

    return report


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
        typer.echo(json.dumps({"ok": not failed, **summary}, indent=2, default=json_default))
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No line per case (errors and the summary still show)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Segment every case; a re-run skips finished cases.

    Example: deepseg batch segment --model brain --cases scans/ --output-dir results/
    """
    from .batch import read_cases, run_cases
    from .jobs import ProcessWorker
    from .segmentation.options import SegmentationOptions

    with reported(as_json):
        if output_format not in ("seg.nrrd", "nii.gz"):
            raise CommandError("--format must be seg.nrrd or nii.gz")
        options = checked_options(SegmentationOptions(device=device, labels=label_names(labels)))
        model_path = resolve_model(model)
        case_list = read_cases(cases, ("input",), optional=tuple(f"input{n}" for n in range(2, 9)))
        output_dir.mkdir(parents=True, exist_ok=True)
        worker = ProcessWorker()  # one process for the cohort: the model is loaded once

        def process(case, outputs):
            inputs = [case.files[key] for key in ("input", *[f"input{n}" for n in range(2, 9)]) if key in case.files]
            for path in inputs:
                check_input(path, f"input of case {case.name}")
            checked = OutputSet(inputs=[*inputs, model_path], overwrite=overwrite, root=output_dir)
            checked.claim(outputs["segmentation"], f"output of case {case.name}")
            summary = segment_files(logic_factory(worker), inputs, outputs["segmentation"], model_path, options,
                                    outputs=checked)
            return {f"{name} ml": volume for name, volume in summary["segments_ml"].items()}

        try:
            results = run_cases(
                case_list, output_dir, lambda case: {"segmentation": output_dir / f"{case.name}.{output_format}"},
                process, case_lines(len(case_list), as_json or quiet),
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No line per case (errors and the summary still show)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Register every case's moving image to its fixed image; a re-run skips finished cases.

    Example: deepseg batch register --cases pairs.csv --output-dir transforms/ --preset affine
    """
    from .batch import read_cases, run_cases
    from .jobs import ProcessWorker

    with reported(as_json):
        options = checked_registration(preset, device)
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
                check_input(case.files[key], f"{key} of case {case.name}")
            checked = OutputSet(inputs=[Path(p) for p in case.files.values()], overwrite=overwrite, root=output_dir)
            for kind, path in outputs.items():
                checked.claim(path, f"{kind} of case {case.name}")
            _, quality = register_files(
                logic_factory(worker), case.files["fixed"], case.files["moving"], outputs["transform"], options,
                output_volume=outputs["volume"], moving_segmentation=case.files.get("moving_segmentation"),
                output_segmentation=outputs.get("segmentation"), outputs=checked,
            )  # fmt: skip
            result = {key: getattr(quality, key) for key in ("folding_percent", "log_jacobian_std")
                      if getattr(quality, key) is not None}  # fmt: skip
            if "total" in quality.runtime_s:
                result["engine_s"] = round(quality.runtime_s["total"], 2)
            return result

        try:
            results = run_cases(case_list, output_dir, outputs_of, process, case_lines(len(case_list), as_json or quiet))
        finally:
            worker.shutdown()
    _finish_batch(results, as_json, f"deepseg batch register: {len(results)} case(s)", output_dir)
