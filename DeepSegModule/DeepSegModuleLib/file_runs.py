"""One case from files to files, all or nothing: read the images, run the logic, write Slicer's own files.

:func:`segment_files` and :func:`register_files` are what ``deepseg segment``/``register`` run for one case and what
``deepseg batch`` runs for each case (with a worker shared by the cases). Outputs are checked and claimed through
:mod:`~DeepSegModuleLib.outputs`: nothing is written unless the whole case succeeds, and nothing the run did not
create is replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import OutputSet

LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DICOM_SEG_SUFFIX = ".dcm"
SEGMENTATION_SUFFIX = ".seg.nrrd"
TRANSFORM_SUFFIXES = (".h5", ".tfm")


def suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (SEGMENTATION_SUFFIX, ".nii.gz", ".nii", ".nrrd", ".mha", ".h5", ".tfm", ".json", ".png", ".dcm"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def load_image(context, path: Path, dicom=None):
    """An input as a volume node and, for a DICOM series folder, the :class:`~DeepSegModuleLib.dicom_series.DicomSeries`
    it was read from (None for an image file, which Slicer's own readers read)."""
    from . import storage

    if Path(path).is_dir():
        from .dicom_series import SeriesChoice, load_series

        return load_series(context, path, dicom or SeriesChoice())
    return storage.load_volume(context, path), None


def writes_dicom_seg(output: Path, output_format: str | None = None) -> bool:
    """Whether ``output`` is to be a DICOM SEG: asked for by name (``.dcm``) or by ``--output-format dicom-seg``."""
    return output_format == "dicom-seg" or suffix(output) == DICOM_SEG_SUFFIX


def segment_files(
    logic_factory, inputs: list[Path], output: Path, model_path: Path, options, *, probabilities: Path | None = None,
    preview: Path | None = None, on_event=None, outputs: OutputSet | None = None, dicom=None,
    output_format: str | None = None, seg_encoding: str = "labelmap",
) -> dict[str, Any]:
    """One case: reads ``inputs``, segments with ``model_path`` and ``options`` (a
    :class:`~DeepSegModuleLib.segmentation.options.SegmentationOptions`), writes ``output`` (and the probability
    maps into the folder ``probabilities``, the ``preview``); all or nothing.

    An input may be a DICOM series folder (chosen by ``dicom``, a
    :class:`~DeepSegModuleLib.dicom_series.SeriesChoice`, where it holds several); then ``output`` may be a DICOM SEG
    (see :func:`writes_dicom_seg`; ``seg_encoding`` labelmap or binary) and ``probabilities`` a FRACTIONAL SEG
    (a name ending in ``.dcm``).

    ``logic_factory(context)`` gives the :class:`DeepSegLogic` to run with (its worker may be shared by cases).
    ``outputs`` holds the checked output paths (see :mod:`~DeepSegModuleLib.outputs`); by default the outputs are
    checked here, with no file replaced.
    """
    if outputs is None:
        outputs = OutputSet(inputs=[*inputs, model_path])
        outputs.claim(output, "output")
    reading = _reader_progress(on_event)
    reading(0.0)  # reading starts with importing Slicer's libraries: say so before, not after
    from . import nodes, storage
    from .context import SceneContext

    context = SceneContext.headless()
    volumes, series = [], []
    for index, path in enumerate(inputs):
        node, read = load_image(context, path, dicom)
        volumes.append(node)
        series.append(read)
        reading((index + 1) / len(inputs))
    source = series[0]
    as_seg = writes_dicom_seg(output, output_format)
    fractional = probabilities is not None and suffix(probabilities) == DICOM_SEG_SUFFIX
    if (as_seg or fractional) and source is None:
        raise ValueError(f"a DICOM SEG references the DICOM images it segments, but the first input {inputs[0]} is "
                         "not a DICOM series: write a .seg.nrrd or a label map instead")  # fmt: skip
    options = options.replace(probabilities=probabilities is not None)
    outcome = logic_factory(context).start_segment(volumes, str(model_path), options, on_event=on_event).wait()
    result = outcome.result
    try:
        if as_seg:
            from .dicom_seg import write_dicom_seg

            write_dicom_seg(outputs.stage(output), source, result.labels, result.label_table,
                            model_name=result.model_name, model_version=result.model_version, encoding=seg_encoding)  # fmt: skip
        elif suffix(output) == SEGMENTATION_SUFFIX:
            storage.save_node(context, outcome.segmentation, outputs.stage(output))
        else:
            storage.save_array_like_file(outputs.stage(output), result.labels, result.ijk_to_ras,
                                         like=None if source is not None else inputs[0])  # fmt: skip
        probability_files = {}
        if fractional:
            from .dicom_seg import write_dicom_seg

            write_dicom_seg(outputs.stage(probabilities), source, result.labels, result.label_table,
                            model_name=result.model_name, model_version=result.model_version,
                            probabilities=result.probabilities)  # fmt: skip
            probability_files = {info.name: str(probabilities) for info in result.label_table}
        for name, node in ({} if fractional else outcome.probabilities).items():
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
    report = result.report()
    report["messages"] = [note for read in series if read is not None for note in read.notes] + report["messages"]
    summary = {
        "output": str(output),
        "model": str(model_path),
        "segments_ml": result.volumes_ml(),
        "probabilities": probability_files,
        **report,
    }
    if source is not None:
        summary["dicom_series"] = [_series_summary(read) for read in series if read is not None]
    return summary


def _series_summary(series) -> dict[str, Any]:
    return {"series_uid": series.info.uid, "modality": series.info.modality, "description": series.info.description,
            "images": len(series.images), "shape_kji": list(series.array.shape), "resampled": series.resampled}  # fmt: skip


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "label"


def register_files(
    logic_factory, fixed: Path, moving: Path, output_transform: Path, options, *, output_volume: Path | None = None,
    moving_segmentation: Path | None = None, output_segmentation: Path | None = None, fixed_mask: Path | None = None,
    moving_mask: Path | None = None, inverse_transform: Path | None = None, report: Path | None = None,
    preview: Path | None = None, outputs: OutputSet | None = None, on_event=None, dicom=None,
    fixed_segmentation: Path | None = None,
):
    """One pair: reads the images, registers ``moving`` to ``fixed`` with ``options`` (a
    :class:`~DeepSegModuleLib.registration.presets.RegistrationOptions`), writes the transform (and the extras); all
    or nothing. Either image may be a DICOM series folder (chosen by ``dicom`` where it holds several).
    ``logic_factory(context)`` gives the :class:`DeepSegLogic` (its worker may be shared by cases);
    ``outputs`` holds the checked output paths (by default they are checked here, with no file replaced).

    Returns:
        The summary (plain values, for JSON) and the :class:`~DeepSegModuleLib.registration.results.QualityReport`.
    """
    if outputs is None:
        outputs = OutputSet(inputs=[p for p in (fixed, moving, moving_segmentation, fixed_mask, moving_mask,
                                                fixed_segmentation) if p])  # fmt: skip
        for path in (output_transform, inverse_transform, output_volume, output_segmentation, report, preview):
            if path is not None:
                outputs.claim(path)
    options = options.replace(inverse=inverse_transform is not None)
    reading = _reader_progress(on_event)
    reading(0.0)
    from . import nodes, storage
    from .context import SceneContext

    context = SceneContext.headless()
    fixed_node, fixed_series = load_image(context, fixed, dicom)
    reading(0.5)
    moving_node, _ = load_image(context, moving, dicom)
    reading(1.0)

    def load_labels(path: Path | None):
        if path is None:
            return None
        if suffix(path) == SEGMENTATION_SUFFIX:
            return storage.load_segmentation(context, path)
        return storage.load_volume(context, path, labelmap=True)

    outcome = logic_factory(context).start_register(
        fixed_node, moving_node, options, fixed_mask=load_labels(fixed_mask), moving_mask=load_labels(moving_mask),
        moving_segmentation=load_labels(moving_segmentation), on_event=on_event,
        fixed_segmentation=load_labels(fixed_segmentation),
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
            if suffix(output_segmentation) == SEGMENTATION_SUFFIX:
                storage.save_node(context, outcome.segmentation, outputs.stage(output_segmentation))
            else:
                storage.save_array_like_file(
                    outputs.stage(output_segmentation), outcome.outputs.propagated_labels, outcome.fixed_ijk_to_ras,
                    like=None if fixed_series is not None else fixed,
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
            outputs.stage(report).write_text(json.dumps(summary, indent=2, default=json_default), encoding="utf-8")
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


def _reader_progress(on_event):
    """``report(fraction)`` of the "read" stage (the images, and Slicer's libraries that read them) as a job event."""
    from .jobs import JobEvent

    def report(fraction: float) -> None:
        if on_event is not None:
            on_event(JobEvent("progress", stage="read", fraction=fraction))

    return report
