"""The ``deepseg`` command: DeepSeg's engine without Slicer's GUI, writing Slicer's own files.

Every output opens in 3D Slicer as it would have looked in the panel. Every command exits 0 on success and
non-zero with a one-line reason on failure, leaves no partial output behind, and prints JSON with ``--json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from .cli_batch import batch_app
from .cli_common import (
    DESCRIPTION_OPTION,
    MODALITY_OPTION,
    SEG_ENCODING_OPTION,
    SERIES_OPTION,
    CommandError,
    check_input,
    check_output,
    check_seg_encoding,
    checked_options,
    checked_registration,
    emit,
    logic_factory,
    progress_bar,
    reported,
    resolve_model,
    series_choice,
    with_optional_values,
)
from .cli_models import models_app
from .file_runs import (
    DICOM_SEG_SUFFIX,
    LABEL_MAP_SUFFIXES,
    SEGMENTATION_SUFFIX,
    TRANSFORM_SUFFIXES,
    register_files,
    segment_files,
    writes_dicom_seg,
)
from .file_runs import suffix as suffix_of
from .outputs import OutputSet
from .segmentation.options import label_names

app = typer.Typer(
    name="deepseg",
    help="Deep-learning segmentation and registration that writes 3D Slicer scenes, segmentations and transforms.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: typer's rich layout shows every flag as taking a value ("--json <bool>")
    rich_markup_mode=None,
)
app.add_typer(models_app, name="models")
app.add_typer(batch_app, name="batch")


# ------------------------------------------------------------------------------------------------ segment


@app.command()
def segment(
    inputs: list[Path] = typer.Option(
        ..., "--input", "-i", metavar="<image>",
        help="Input image(s) or DICOM series folder(s), in the model's input order (repeat -i).",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="OUT.seg.nrrd (segments), OUT.nii.gz/.nrrd (label map) or OUT.dcm (DICOM SEG, for a DICOM series).",
    ),
    output_format: str = typer.Option(
        "auto", "--output-format", help="auto (from --output's suffix) or dicom-seg (a DICOM SEG under any file name)."
    ),
    seg_encoding: str = SEG_ENCODING_OPTION,
    series: list[str] | None = SERIES_OPTION,
    modality: str | None = MODALITY_OPTION,
    series_description: str | None = DESCRIPTION_OPTION,
    model: str | None = typer.Option(
        None, "--model", "-m",
        help="Model folder/file, or a name in the model store (default: the bundled brain tissue model, deepseg-brain).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    labels: str | None = typer.Option(None, help="Comma-separated label names to keep (default: all)."),
    probabilities: Path | None = typer.Option(
        None, help="Folder for one probability map (.nii.gz) per label, or OUT.dcm: a FRACTIONAL DICOM SEG."
    ),
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

    Example: deepseg segment -m total -i CT_series/ -o liver.dcm   (a DICOM SEG referencing the series)
    """
    from .segmentation.options import SegmentationOptions

    with reported(as_json):
        options = checked_options(SegmentationOptions(
            device=device, overlap=overlap, mirroring=mirroring, precision=precision, labels=label_names(labels),
            probabilities=probabilities is not None, trust_code=trust_code,
        ))  # fmt: skip
        if output_format not in ("auto", "dicom-seg"):
            raise CommandError(f"--output-format must be auto or dicom-seg, not {output_format!r}")
        format_ = None if output_format == "auto" else output_format
        check_seg_encoding(seg_encoding)
        dicom = series_choice(series, modality, series_description)
        if writes_dicom_seg(output, format_):
            check_output(output, (suffix_of(output),), "--output")
        else:
            check_output(output, (SEGMENTATION_SUFFIX, *LABEL_MAP_SUFFIXES, DICOM_SEG_SUFFIX), "--output")
        check_output(preview, (".png",), "--preview")
        for path in inputs:
            check_input(path, "input", dicom)
        fractional = probabilities is not None and suffix_of(probabilities) == DICOM_SEG_SUFFIX
        if (writes_dicom_seg(output, format_) or fractional) and not inputs[0].is_dir():
            raise CommandError(f"a DICOM SEG references the DICOM images it segments: the first input {inputs[0]} "
                               "must be a DICOM series folder (or write a .seg.nrrd or a label map)")  # fmt: skip
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
        if fractional:
            check_output(probabilities, (DICOM_SEG_SUFFIX,), "--probabilities")
            outputs.claim(probabilities, "--probabilities")
        elif probabilities is not None:
            outputs.claim_folder(probabilities, "--probabilities")

        with progress_bar(as_json or quiet) as on_event:
            summary = segment_files(
                logic_factory(), inputs, output, model_path, options, probabilities=probabilities, preview=preview,
                on_event=on_event, outputs=outputs, dicom=dicom, output_format=format_, seg_encoding=seg_encoding,
            )
        lines = [f"  {name:<30s} {volume:10.2f} ml" for name, volume in summary["segments_ml"].items()]
        lines += [f"  {stage:<30s} {seconds:8.2f} s" for stage, seconds in summary.get("timings_s", {}).items()]
        lines += [f"  note: {message}" for message in summary.get("messages", []) if not message.startswith("Warning:")]
        for message in summary.get("messages", []):
            if message.startswith("Warning:"):  # on stderr too, so that it is seen with --json and in a batch log
                typer.echo(f"deepseg: warning: {message.removeprefix('Warning: ')}", err=True)
        lines.append(f"wrote {output}")
        emit(summary, as_json, lines)


# ------------------------------------------------------------------------------------------------ register


@app.command()
def register(
    fixed: Path = typer.Option(..., help="Fixed (reference) image, or a DICOM series folder."),
    moving: Path = typer.Option(..., help="Moving image (or DICOM series folder), to be aligned with the fixed one."),
    output_transform: Path = typer.Option(..., help="OUT.h5 / OUT.tfm: the transform Slicer, ITK and ANTs read."),
    output_volume: Path | None = typer.Option(None, help="The moving image resampled onto the fixed grid."),
    moving_segmentation: Path | None = typer.Option(None, help="Segmentation (.seg.nrrd) or label map on the moving image."),
    output_segmentation: Path | None = typer.Option(None, help="Where the moving segmentation lands on the fixed image."),
    fixed_segmentation: Path | None = typer.Option(
        None, help="Reference segmentation (or label map) of the same structures on the fixed image: the report "
        "gives each structure's Dice (segments matched by name).",
    ),
    preset: str = typer.Option("deformable fast", help="rigid, affine, deformable fast, deformable accurate, multimodal."),
    fixed_mask: Path | None = typer.Option(None, help="Mask (label map or .seg.nrrd) on the fixed image."),
    moving_mask: Path | None = typer.Option(None, help="Mask (label map or .seg.nrrd) on the moving image."),
    inverse_transform: Path | None = typer.Option(None, help="Also write the inverse transform (moving to fixed)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    series: list[str] | None = SERIES_OPTION,
    modality: str | None = MODALITY_OPTION,
    series_description: str | None = DESCRIPTION_OPTION,
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
    with reported(as_json):
        options = checked_registration(preset, device, inverse=inverse_transform is not None)
        dicom = series_choice(series, modality, series_description)
        if (moving_segmentation is None) != (output_segmentation is None):
            raise CommandError("--moving-segmentation and --output-segmentation go together")
        if fixed_segmentation is not None and moving_segmentation is None:
            raise CommandError("--fixed-segmentation is compared with the moving segmentation carried onto the fixed "
                               "image: give --moving-segmentation and --output-segmentation too")  # fmt: skip
        check_output(output_transform, TRANSFORM_SUFFIXES, "--output-transform")
        check_output(inverse_transform, TRANSFORM_SUFFIXES, "--inverse-transform")
        check_output(output_volume, LABEL_MAP_SUFFIXES, "--output-volume")
        check_output(output_segmentation, (SEGMENTATION_SUFFIX, *LABEL_MAP_SUFFIXES), "--output-segmentation")
        check_output(report, (".json",), "--report")
        check_output(preview, (".png",), "--preview")
        for path, what in ((fixed, "--fixed"), (moving, "--moving"), (moving_segmentation, "--moving-segmentation"),
                           (fixed_mask, "--fixed-mask"), (moving_mask, "--moving-mask"),
                           (fixed_segmentation, "--fixed-segmentation")):
            if path is not None:
                check_input(path, what, dicom if what in ("--fixed", "--moving") else None)
        outputs = OutputSet(inputs=[fixed, moving, moving_segmentation, fixed_mask, moving_mask, fixed_segmentation],
                            overwrite=overwrite)  # fmt: skip
        outputs.inputs = [p for p in outputs.inputs if p is not None]
        for path, what in ((output_transform, "--output-transform"), (inverse_transform, "--inverse-transform"),
                           (output_volume, "--output-volume"), (output_segmentation, "--output-segmentation"),
                           (report, "--report"), (preview, "--preview")):
            if path is not None:
                outputs.claim(path, what)

        with progress_bar(as_json or quiet) as on_event:
            summary, quality = register_files(
                logic_factory(), fixed, moving, output_transform, options, output_volume=output_volume,
                moving_segmentation=moving_segmentation, output_segmentation=output_segmentation, fixed_mask=fixed_mask,
                moving_mask=moving_mask, inverse_transform=inverse_transform, report=report, preview=preview,
                outputs=outputs, on_event=on_event, dicom=dicom, fixed_segmentation=fixed_segmentation,
            )  # fmt: skip
        lines = [f"  {line}" for line in quality.lines()]
        lines.append(f"wrote {output_transform}")
        emit(summary, as_json, lines)


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

    with reported(as_json):
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
        emit(summary, as_json, lines)


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
        argv = with_optional_values(list(sys.argv[1:] if argv is None else argv))
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
