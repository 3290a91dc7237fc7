"""``deepseg batch segment|register``: a cohort, resumable, one failed case reported without stopping the others."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli_common import (
    CPUS_PER_ACTOR_OPTION,
    DESCRIPTION_OPTION,
    MODALITY_OPTION,
    RAY_OPTION,
    SEG_ENCODING_OPTION,
    SERIES_OPTION,
    CommandError,
    check_seg_encoding,
    checked_options,
    checked_registration,
    reported,
    resolve_model,
    series_choice,
)
from .file_runs import json_default
from .jobs import format_duration
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


def _finish_batch(results, as_json: bool, title: str, output_dir: Path, extra: dict | None = None) -> None:
    from dataclasses import asdict

    from .batch import write_summary_csv, write_summary_json

    _print_table(results, as_json, title)
    failed = [result.name for result in results if result.status == "failed"]
    summary = {"cases": [asdict(result) for result in results], "failed": failed, **(extra or {})}
    summary["summary_csv"] = str(write_summary_csv(results, output_dir))
    summary["summary_json"] = str(write_summary_json(results, output_dir, extra))
    if as_json:
        typer.echo(json.dumps({"ok": not failed, **summary}, indent=2, default=json_default))
    if failed:
        if not as_json:
            typer.echo(f"deepseg: error: {len(failed)} of {len(results)} case(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(code=1)


def _absolute(cases):
    """Cases with absolute paths (a Ray worker may start in another folder, or on another node)."""
    for case in cases:
        case.files = {key: path.absolute() for key, path in case.files.items()}
    return cases


def _run(job, case_list, ray: str | None, cpus_per_actor: int, as_json: bool, quiet: bool):
    """The cases on this machine with one persistent worker (the model loads once), or on Ray with ``--ray``."""
    from .batch import run_cases

    on_result = case_lines(len(case_list), as_json or quiet)
    if ray is not None:
        from .ray_cohort import run_on_ray

        return run_on_ray(case_list, job, address=ray, cpus_per_actor=cpus_per_actor, on_result=on_result)
    from .jobs import ProcessWorker

    worker = ProcessWorker()
    try:
        return run_cases(case_list, job.output_dir, job.outputs_of, lambda case, outputs: job(case, outputs, worker),
                         on_result)  # fmt: skip
    finally:
        worker.shutdown()


@batch_app.command("segment")
def batch_segment(
    cases: Path = typer.Option(
        ..., help="A folder (each image file, and each subfolder holding a DICOM series, is a case) or a CSV: "
        "case,input[,input2,...].",
    ),
    output_dir: Path = typer.Option(..., help="Outputs go here as <case>.seg.nrrd (or --format nii.gz, dicom-seg)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model folder/file, or a name in the model store (default: deepseg-brain)."
    ),
    output_format: str = typer.Option(
        "seg.nrrd", "--format", help="seg.nrrd (segments), nii.gz (label maps) or dicom-seg (<case>.dcm, for DICOM cases)."
    ),
    seg_encoding: str = SEG_ENCODING_OPTION,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    labels: str | None = typer.Option(None, help="Comma-separated label names to keep."),
    series: list[str] | None = SERIES_OPTION,
    modality: str | None = MODALITY_OPTION,
    series_description: str | None = DESCRIPTION_OPTION,
    ray: str | None = RAY_OPTION,
    cpus_per_actor: int = CPUS_PER_ACTOR_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files of unfinished cases that exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No line per case (errors and the summary still show)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Segment every case; a re-run skips finished cases.

    Example: deepseg batch segment --model brain --cases scans/ --output-dir results/

    Example: deepseg batch segment -m total --cases /nfs/studies/ --output-dir /nfs/segs/ --format dicom-seg --ray auto
    """
    from .batch import read_cases
    from .cohort import INPUT_COLUMNS, SEGMENT_FORMATS, SegmentCases
    from .segmentation.options import SegmentationOptions

    with reported(as_json):
        if output_format not in SEGMENT_FORMATS:
            raise CommandError(f"--format must be one of {', '.join(SEGMENT_FORMATS)}")
        check_seg_encoding(seg_encoding)
        options = checked_options(SegmentationOptions(device=device, labels=label_names(labels)))
        model_path = resolve_model(model).absolute()
        case_list = _absolute(read_cases(cases, INPUT_COLUMNS[:1], optional=INPUT_COLUMNS[1:]))
        output_dir.mkdir(parents=True, exist_ok=True)
        job = SegmentCases(model_path, options, output_dir.absolute(), output_format, overwrite,
                           series_choice(series, modality, series_description), seg_encoding)  # fmt: skip
        results = _run(job, case_list, ray, cpus_per_actor, as_json, quiet)
    _finish_batch(results, as_json, f"deepseg batch segment: {len(results)} case(s)", output_dir,
                  {"ray": ray} if ray is not None else None)  # fmt: skip


@batch_app.command("register")
def batch_register(
    cases: Path = typer.Option(..., help="A CSV: case,fixed,moving[,moving_segmentation] (images or DICOM folders)."),
    output_dir: Path = typer.Option(..., help="<case>.h5 (+ <case>.nrrd, <case>.seg.nrrd) go here."),
    preset: str = typer.Option("deformable fast", help="rigid, affine, deformable fast, deformable accurate, multimodal."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    series: list[str] | None = SERIES_OPTION,
    modality: str | None = MODALITY_OPTION,
    series_description: str | None = DESCRIPTION_OPTION,
    ray: str | None = RAY_OPTION,
    cpus_per_actor: int = CPUS_PER_ACTOR_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files of unfinished cases that exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No line per case (errors and the summary still show)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Register every case's moving image to its fixed image; a re-run skips finished cases.

    Example: deepseg batch register --cases pairs.csv --output-dir transforms/ --preset affine
    """
    from .batch import read_cases
    from .cohort import RegisterCases

    with reported(as_json):
        options = checked_registration(preset, device)
        case_list = _absolute(read_cases(cases, ("fixed", "moving"), optional=("moving_segmentation",)))
        output_dir.mkdir(parents=True, exist_ok=True)
        job = RegisterCases(options, output_dir.absolute(), overwrite, series_choice(series, modality, series_description))
        results = _run(job, case_list, ray, cpus_per_actor, as_json, quiet)
    _finish_batch(results, as_json, f"deepseg batch register: {len(results)} case(s)", output_dir,
                  {"ray": ray} if ray is not None else None)  # fmt: skip
