"""The segmentation engine: images + model in, label map + label table out.

One run is: check inputs -> (load model, or take it from the cache) -> the model format's runner
(:mod:`~DeepSegModuleLib.segmentation.runners`: prepare the network input, infer, map the outputs back to the first
input's grid as labels) -> clean-up -> keep the requested labels. Nothing here knows about MRML: images are
(k, j, i) arrays with an IJK-to-RAS matrix, and the result is the same.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from DeepSegModuleLib.devices import resolve_device
from DeepSegModuleLib.labels import LabelInfo
from DeepSegModuleLib.models.cache import ModelCache, default_cache
from DeepSegModuleLib.models.description import LoadedModel, ModelDescription, Tiling
from DeepSegModuleLib.segmentation import postprocess
from DeepSegModuleLib.segmentation.expectations import check_expectations
from DeepSegModuleLib.segmentation.inference import SegmentationCancelled, resolve_precision
from DeepSegModuleLib.segmentation.options import SegmentationOptions
from DeepSegModuleLib.segmentation.results import SegmentationResult
from DeepSegModuleLib.segmentation.runners import RunSettings, runner_for
from DeepSegModuleLib.segmentation.volume import VolumeArray, as_volume, resample_onto

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _label_values(selection: bool | Sequence[int | str] | None, table: list[LabelInfo], what: str) -> list[int]:
    if selection is None or selection is True:
        return [info.value for info in table]
    if selection is False:
        return []
    by_name = {info.name.lower(): info.value for info in table}
    known = {info.value for info in table}
    values = []
    for item in selection:
        if isinstance(item, str) and not item.isdigit():
            if item.lower() not in by_name:
                raise ValueError(f"{what}: no label named {item!r}; the model's labels are {[i.name for i in table]}")
            values.append(by_name[item.lower()])
        else:
            if int(item) not in known:
                raise ValueError(f"{what}: no label with value {item}; the model's label values are {sorted(known)}")
            values.append(int(item))
    return values


def check_inputs(volumes: list[VolumeArray], description: ModelDescription) -> None:
    """Raises ValueError naming the fix when the images cannot be fed to the model."""
    expected = len(description.inputs)
    if len(volumes) != expected:
        names = ", ".join(
            f"{spec.name} ({spec.modality})" if spec.modality else spec.name for spec in description.inputs
        )
        raise ValueError(
            f"model '{description.name}' takes {expected} input volume(s) ({names}) but {len(volumes)} were given; "
            "select one volume for each input"
        )
    for index, volume in enumerate(volumes):
        slice_wise = description.nnunet is not None and description.nnunet.slice_wise
        if min(volume.array.shape) < 2 and not slice_wise:
            raise ValueError(
                f"input {index + 1} has shape {volume.array.shape} (k, j, i): it is a 2D image, and this model segments "
                "3D volumes; select a 3D volume"
            )
        if not np.issubdtype(volume.array.dtype, np.number) or np.issubdtype(volume.array.dtype, np.complexfloating):
            raise ValueError(f"input {index + 1} has voxel type {volume.array.dtype}; a scalar volume is needed")
        if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
            raise ValueError(
                f"input {index + 1} contains NaN or infinite voxel values; fix or threshold the volume before segmenting"
            )


def segment(
    images: VolumeArray | Sequence[Any],
    model: LoadedModel | str | os.PathLike,
    options: SegmentationOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    cache: ModelCache | None = None,
) -> SegmentationResult:
    """Segments one case.

    Args:
        images: one :class:`VolumeArray` (or ``(array, ijk_to_ras)`` pair) per model input, in the model's
            input order; all are resampled onto the first one's grid.
        model: a loaded model, or a path that is loaded through ``cache`` (the default process-wide cache,
            so a second run with the same model skips loading).
        options: run options; defaults to :class:`SegmentationOptions` ().
        progress: called as ``progress(stage, fraction)`` with stages ``load``, ``preprocess``, ``inference``,
            ``postprocess``.
        cancel: polled between windows; return True to stop (raises :class:`SegmentationCancelled`).
        cache: the model cache to use for a path.

    Returns:
        The label map on the first input's grid, the label table, and the run's figures.

    Raises:
        ValueError: inputs that do not fit the model (wrong count, 2D, NaN), unknown label names.
        ModelError: the model cannot be read or does not match its description.
        MemoryError: out of memory after every fallback.
        SegmentationCancelled: ``cancel()`` returned True.
    """
    options = (options or SegmentationOptions()).checked()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    messages: list[str] = []
    report = progress or (lambda stage, fraction: None)
    if isinstance(images, tuple) and len(images) == 2 and isinstance(images[0], np.ndarray):
        images = [images]  # one (array, ijk_to_ras) pair
    volumes = [as_volume(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
    device = resolve_device(options.device)
    resolve_precision(options.precision, device)  # a bad name fails before any work
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    loaded, from_cache = _loaded_model(model, device, options, cache, timings, report)
    description = loaded.description
    check_inputs(volumes, description)
    messages += check_expectations(volumes[0].array, volumes[0].ijk_to_ras, description.expects, description.name)
    kept = _label_values(options.labels, description.labels, "labels to keep")
    largest = _label_values(options.keep_largest_component, description.labels, "keep_largest_component")
    holes = _label_values(options.fill_holes, description.labels, "fill_holes")
    if cancel is not None and cancel():
        raise SegmentationCancelled("segmentation cancelled by the user")

    run = RunSettings(device=device, options=options, progress=report, cancel=cancel, log=messages.append)
    runner = runner_for(loaded)
    with _stage("preprocess", timings, report):
        reference = volumes[0]
        prepared = runner.prepare([reference] + [resample_onto(v, reference) for v in volumes[1:]], run)
    with _stage("inference", timings):
        outputs = runner.infer(prepared, run)
        del prepared
    with _stage("resample", timings):
        labels_ijk, probabilities = runner.to_labels(outputs, kept, run)
        del outputs
    with _stage("postprocess", timings, report):
        labels = _cleaned_labels(labels_ijk, reference, description, options, kept, largest, holes)

    timings["total"] = time.perf_counter() - started
    peak = {"process_peak_rss_bytes": _peak_rss_bytes()}
    if device.type == "cuda":
        peak["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    table = sorted((info for info in description.labels if info.value in kept), key=lambda info: info.value)
    for line in messages:
        logger.info(line)
    return SegmentationResult(
        labels=labels,
        ijk_to_ras=reference.ijk_to_ras.copy(),
        label_table=table,
        probabilities=probabilities,
        timings=timings,
        peak_memory=peak,
        model_from_cache=from_cache,
        device=str(loaded.device),
        messages=messages,
        model_name=description.name,
        model_version=description.version,
    )


@contextmanager
def _stage(name: str, timings: dict[str, float], report: ProgressCallback | None = None):
    """Times one stage of a run into ``timings[name]``; with ``report``, its progress at 0 and 1."""
    if report is not None:
        report(name, 0.0)
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started
    if report is not None:
        report(name, 1.0)


def _loaded_model(
    model: LoadedModel | str | os.PathLike, device: torch.device, options: SegmentationOptions,
    cache: ModelCache | None, timings: dict[str, float], report: ProgressCallback,
) -> tuple[LoadedModel, bool]:  # fmt: skip
    """The model on ``device``, from the cache when it is there; ``timings["load"]`` counts only real loading."""
    report("load", 0.0)
    from_cache = False
    if isinstance(model, LoadedModel):
        loaded = model
        if loaded.device != device:
            loaded.move_to(device)
    else:
        loaded, from_cache = (cache if cache is not None else default_cache).get(
            model, device, trust_code=options.trust_code
        )
    timings["load"] = 0.0 if from_cache else loaded.load_seconds
    if loaded.description.tiling != Tiling.NNUNET and "monai.inferers" not in sys.modules:
        # MONAI's sliding window (about 2 s of imports on a first run) counts as loading, not as inference
        started = time.perf_counter()
        import monai.inferers  # noqa: F401

        timings["load"] += time.perf_counter() - started
    report("load", 1.0)
    return loaded, from_cache


def _cleaned_labels(
    labels_ijk: torch.Tensor, reference: VolumeArray, description: ModelDescription, options: SegmentationOptions,
    kept: list[int], largest: list[int], holes: list[int],
) -> np.ndarray:  # fmt: skip
    """The ``(i, j, k)`` label map as a ``(k, j, i)`` uint8/uint16 array with only the kept labels, small components
    removed, largest components kept and holes filled as the options ask."""
    max_value = max([info.value for info in description.labels] + [0])
    dtype = np.uint8 if max_value < 256 else np.uint16
    # Narrow and transpose in torch (multi-threaded, on the device) before the copy to numpy.
    labels_ijk = torch.as_tensor(labels_ijk)
    narrow = labels_ijk.to(torch.uint8 if dtype == np.uint8 else torch.int32).permute(2, 1, 0).contiguous()
    labels = narrow.cpu().numpy().astype(dtype, copy=False)
    dropped = [info.value for info in description.labels if info.value not in kept]
    if dropped:
        labels[np.isin(labels, dropped)] = 0
    if options.min_component_mm3 > 0:
        voxel_mm3 = abs(float(np.linalg.det(reference.ijk_to_ras[:3, :3])))
        postprocess.remove_small_components(labels, kept, int(np.ceil(options.min_component_mm3 / voxel_mm3)))
    if largest:
        postprocess.keep_largest_component(labels, [v for v in largest if v in kept])
    if holes:
        postprocess.fill_holes(labels, [v for v in holes if v in kept])
    return labels


def segment_with_models(
    images: VolumeArray | Sequence[Any],
    models: Sequence[LoadedModel | str | os.PathLike],
    options: SegmentationOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    cache: ModelCache | None = None,
) -> SegmentationResult:
    """Runs several models on the same images and merges their labels into one label map.

    This is how several task folders (e.g. TotalSegmentator's organ, vessel and bone tasks) become one
    segmentation. Label values are renumbered 1..N in model order; a name that an earlier model already
    used gets the later model's name in front (``"<model>: <label>"``). Where two models label the same
    voxel, the earlier model wins. ``options.labels`` (by name) selects across all models.

    Args:
        images: as for :func:`segment`.
        models: loaded models or paths, in priority order.
        options: as for :func:`segment`; label selections are by name.
        progress: called as ``progress(stage, fraction)``; stages are prefixed with ``"model i/n: "``.
        cancel: as for :func:`segment`.
        cache: the model cache; it is enlarged to hold every model so repeated runs load nothing.

    Returns:
        One :class:`SegmentationResult`; timings are summed per stage.
    """
    if not models:
        raise ValueError("give at least one model")
    options = options or SegmentationOptions()
    cache = cache if cache is not None else default_cache
    cache.max_models = max(cache.max_models, len(models))
    wanted = {str(name).lower() for name in options.labels} if options.labels is not None else None
    merged: np.ndarray | None = None
    table: list[LabelInfo] = []
    probabilities: dict[int, np.ndarray] = {}
    timings: dict[str, float] = {}
    messages: list[str] = []
    peak: dict[str, int] = {}
    all_cached = True
    result = None
    names: list[str] = []
    for index, model in enumerate(models):
        prefix = f"model {index + 1}/{len(models)}: "
        run_options = options.replace(labels=None)
        result = segment(
            images,
            model,
            run_options,
            progress=(lambda stage, fraction, p=prefix: progress(p + stage, fraction)) if progress else None,
            cancel=cancel,
            cache=cache,
        )
        all_cached = all_cached and result.model_from_cache
        model_name = result.model_name or f"model {index + 1}"
        names.append(model_name)
        if merged is None:
            merged = np.zeros(result.labels.shape, dtype=np.uint16)
        taken = {info.name for info in table}
        for info in result.label_table:
            name = info.name if info.name not in taken else f"{model_name}: {info.name}"
            if wanted is not None and info.name.lower() not in wanted and name.lower() not in wanted:
                continue
            value = len(table) + 1
            table.append(LabelInfo(value=value, name=name, color=info.color, terminology=info.terminology))
            merged[(result.labels == info.value) & (merged == 0)] = value
            if info.value in result.probabilities:
                probabilities[value] = result.probabilities[info.value]
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        for key, value in result.peak_memory.items():
            peak[key] = max(peak.get(key, 0), value)
        messages.extend(prefix + line for line in result.messages)
    if wanted is not None:
        found = {info.name.lower() for info in table} | {info.name.split(": ", 1)[-1].lower() for info in table}
        missing = sorted(wanted - found)
        if missing:
            raise ValueError(f"no model has labels named {missing}")
    dtype = np.uint8 if len(table) < 256 else np.uint16
    return SegmentationResult(
        labels=merged.astype(dtype),
        ijk_to_ras=result.ijk_to_ras,
        label_table=table,
        probabilities=probabilities,
        timings=timings,
        peak_memory=peak,
        model_from_cache=all_cached,
        device=result.device,
        messages=messages,
        model_name=" + ".join(names),
    )
