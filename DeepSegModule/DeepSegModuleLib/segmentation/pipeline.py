"""The segmentation engine: images + model in, label map + label table out.

One run is: check inputs -> (load model, or take it from the cache) -> preprocess (reorient and
resample to the model grid, normalise) -> sliding-window inference -> resample the network's
outputs (logits, never labels) back to the first input's grid -> argmax -> clean-up -> keep the
requested labels. Nothing here knows about MRML: images are (k, j, i) arrays with an IJK-to-RAS
matrix, and the result is the same.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from DeepSegModuleLib.labels import LabelInfo
from DeepSegModuleLib.models.cache import ModelCache, default_cache
from DeepSegModuleLib.models.description import LoadedModel, ModelDescription, ModelFormat, OutputActivation, Tiling
from DeepSegModuleLib.devices import resolve_device
from DeepSegModuleLib.segmentation.expectations import check_expectations
from DeepSegModuleLib.segmentation import postprocess
from DeepSegModuleLib.segmentation.grid import ModelGrid, resized_labels
from DeepSegModuleLib.segmentation.inference import (
    SegmentationCancelled,
    is_out_of_memory,
    resolve_precision,
    sliding_window_predict,
)
from DeepSegModuleLib.segmentation.normalization import normalize
from DeepSegModuleLib.segmentation.options import SegmentationOptions
from DeepSegModuleLib.segmentation.results import SegmentationResult
from DeepSegModuleLib.segmentation.volume import VolumeArray, as_volume, resample_onto

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


class Preprocessor(Protocol):
    """Turns input volumes into the network's input and maps outputs back. One per run."""

    def prepare(self, volumes: list[VolumeArray], device: torch.device) -> torch.Tensor:
        """Returns the normalised network input ``(1, C, *model grid)``."""

    def to_input_grid(self, channels: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
        """Maps ``(G, *model grid)`` outputs to ``(G, i, j, k)`` on the first input's grid; voxels the model
        never saw get ``fill[g]``."""

    def labels_to_input_grid(
        self, channels: torch.Tensor, to_labels: Callable[[torch.Tensor], torch.Tensor], background: int
    ) -> torch.Tensor:
        """Maps ``(C, *model grid)`` outputs to an ``(i, j, k)`` label map on the first input's grid, resampling
        as :meth:`to_input_grid` does and reducing with ``to_labels`` (``(n, C, ...)`` -> ``(n, ...)``) slab by
        slab; voxels the model never saw get ``background``."""


class GridPreprocessor:
    """Reorient + resample with :class:`ModelGrid`, normalise per channel (TorchScript models)."""

    def __init__(self, description: ModelDescription) -> None:
        self.description = description
        self.grid: ModelGrid | None = None

    def prepare(self, volumes: list[VolumeArray], device: torch.device) -> torch.Tensor:
        reference = volumes[0]
        self.grid = ModelGrid.plan(
            reference.array.shape[::-1], reference.ijk_to_ras, self.description.orientation, self.description.spacing
        )
        channels = []
        for volume, spec in zip(volumes, self.description.inputs):
            data = torch.from_numpy(np.ascontiguousarray(volume.array)).to(device=device, dtype=torch.float32)
            on_model_grid = self.grid.to_model(data.permute(2, 1, 0)[None])[0]
            channels.append(normalize(on_model_grid, spec.normalization))
        return torch.stack(channels)[None]

    def to_input_grid(self, channels: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
        assert self.grid is not None, "prepare() first"
        return self.grid.to_input(channels)

    def labels_to_input_grid(
        self, channels: torch.Tensor, to_labels: Callable[[torch.Tensor], torch.Tensor], background: int
    ) -> torch.Tensor:
        assert self.grid is not None, "prepare() first"
        labels = resized_labels(channels, self.grid.oriented_shape, to_labels)
        return self.grid.unorient(labels[None])[0]


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
        if min(volume.array.shape) < 2 and not description.extra.get("slice_wise"):
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


def make_preprocessor(model: LoadedModel) -> Preprocessor:
    """The preprocessing a model's format asks for."""
    if model.description.format == ModelFormat.NNUNET_V2:
        from DeepSegModuleLib.segmentation.nnunet_preprocessing import NnunetPreprocessor

        return NnunetPreprocessor(model.description)
    return GridPreprocessor(model.description)


def _labels_from_outputs(
    outputs: torch.Tensor, description: ModelDescription, preprocessor: Preprocessor
) -> torch.Tensor:
    """Resamples the output channels back (slab by slab) and reduces them to a label map (i, j, k) of label values."""
    mapping = list(description.channel_to_label)
    # int16 label maps halve/quarter the memory of int64 ones on CT-sized grids (labels < 32768).
    small = torch.int16
    if description.activation == OutputActivation.SIGMOID:

        def overlapping_labels(planes: torch.Tensor) -> torch.Tensor:
            labels = torch.zeros((planes.shape[0], *planes.shape[2:]), dtype=small, device=planes.device)
            for channel, value in enumerate(mapping):  # later channels win where labels overlap
                labels[planes[:, channel] > 0] = value
            return labels

        return preprocessor.labels_to_input_grid(outputs, overlapping_labels, 0)

    def best_channel(planes: torch.Tensor) -> torch.Tensor:
        # max(dim).indices, not argmax(dim): the same first-maximum answer, 7x faster across channels on a CPU.
        return planes.max(dim=1).indices.to(small)

    background = next((channel for channel, value in enumerate(mapping) if value == 0), 0)
    channels = preprocessor.labels_to_input_grid(outputs, best_channel, background)
    if mapping == list(range(len(mapping))):
        return channels
    lookup = torch.tensor(mapping, dtype=small, device=channels.device)
    return lookup[channels.long()]


def _probabilities(
    outputs: torch.Tensor, description: ModelDescription, preprocessor: Preprocessor, values: list[int]
) -> dict[int, np.ndarray]:
    """float32 probability maps of the kept labels on the input grid, one channel at a time: a softmax over
    all channels needs only a per-voxel maximum and sum, so no all-channel float copy of ``outputs`` is made."""
    softmax = description.activation == OutputActivation.SOFTMAX
    if softmax and values:
        peak = outputs.amax(dim=0).float()
        total = torch.zeros_like(peak)
        for channel in range(outputs.shape[0]):
            total += torch.exp(outputs[channel].float() - peak)
    maps = {}
    for value in values:
        channel = description.channel_to_label.index(value)
        plane = outputs[channel].float()
        if softmax:
            plane = torch.exp(plane - peak) / total
        elif description.activation == OutputActivation.SIGMOID:
            plane = torch.sigmoid(plane)
        on_input = preprocessor.to_input_grid(plane[None], [0.0])[0]
        maps[value] = np.ascontiguousarray(on_input.clamp(0, 1).permute(2, 1, 0).cpu().numpy().astype(np.float32))
    return maps


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
    description = loaded.description
    if description.tiling != Tiling.NNUNET and "monai.inferers" not in sys.modules:
        # MONAI's sliding window (about 2 s of imports on a first run) counts as loading, not as inference
        started = time.perf_counter()
        import monai.inferers  # noqa: F401

        timings["load"] += time.perf_counter() - started
    report("load", 1.0)

    check_inputs(volumes, description)
    expects = (description.extra.get("card") or {}).get("expects")
    messages += check_expectations(volumes[0].array, volumes[0].ijk_to_ras, expects, description.name)
    kept = _label_values(options.labels, description.labels, "labels to keep")
    largest = _label_values(options.keep_largest_component, description.labels, "keep_largest_component")
    holes = _label_values(options.fill_holes, description.labels, "fill_holes")
    if cancel is not None and cancel():
        raise SegmentationCancelled("segmentation cancelled by the user")

    if loaded.bundle_workflow is not None:
        labels_ijk, probabilities = loaded.bundle_workflow.run(
            volumes,
            device=device,
            options=options,
            progress=report,
            cancel=cancel,
            timings=timings,
            log=messages.append,
        )
        labels_ijk = torch.as_tensor(labels_ijk)
    else:
        step = time.perf_counter()
        report("preprocess", 0.0)
        reference = volumes[0]
        volumes = [reference] + [resample_onto(v, reference) for v in volumes[1:]]
        preprocessor = make_preprocessor(loaded)
        try:
            network_input = preprocessor.prepare(volumes, device)
        except Exception as error:
            if device.type != "cuda" or not is_out_of_memory(error):
                raise
            messages.append("Out of GPU memory while preparing the image: preparing it on the CPU instead.")
            torch.cuda.empty_cache()
            network_input = preprocessor.prepare(volumes, torch.device("cpu"))
        timings["preprocess"] = time.perf_counter() - step
        report("preprocess", 1.0)

        step = time.perf_counter()
        overlap = description.overlap if options.overlap is None else float(options.overlap)
        sw_batch = description.sw_batch_size if options.sw_batch_size is None else int(options.sw_batch_size)
        outputs = sliding_window_predict(
            network_input,
            loaded,
            overlap=overlap,
            sw_batch_size=max(sw_batch, 1),
            mirror_axes=description.mirror_axes if options.mirroring else (),
            precision=options.precision,
            progress=report,
            cancel=cancel,
            log=messages.append,
        )[0]
        del network_input
        timings["inference"] = time.perf_counter() - step

        step = time.perf_counter()
        try:
            labels_ijk = _labels_from_outputs(outputs, description, preprocessor)
            probabilities = (
                _probabilities(outputs, description, preprocessor, kept) if options.probabilities else {}
            )
        except Exception as error:
            if outputs.device.type != "cuda" or not is_out_of_memory(error):
                raise
            messages.append("Out of GPU memory while resampling the result: finishing on the CPU.")
            outputs = outputs.cpu()
            torch.cuda.empty_cache()
            labels_ijk = _labels_from_outputs(outputs, description, preprocessor)
            probabilities = (
                _probabilities(outputs, description, preprocessor, kept) if options.probabilities else {}
            )
        del outputs
        timings["resample"] = time.perf_counter() - step

    step = time.perf_counter()
    report("postprocess", 0.0)
    max_value = max([info.value for info in description.labels] + [0])
    dtype = np.uint8 if max_value < 256 else np.uint16
    # Narrow and transpose in torch (multi-threaded, on the device) before the copy to numpy.
    narrow = labels_ijk.to(torch.uint8 if dtype == np.uint8 else torch.int32).permute(2, 1, 0).contiguous()
    labels = narrow.cpu().numpy().astype(dtype, copy=False)
    all_values = [info.value for info in description.labels]
    dropped = [v for v in all_values if v not in kept]
    if dropped:
        labels[np.isin(labels, dropped)] = 0
    if options.min_component_mm3 > 0:
        voxel_mm3 = abs(float(np.linalg.det(volumes[0].ijk_to_ras[:3, :3])))
        postprocess.remove_small_components(labels, kept, int(np.ceil(options.min_component_mm3 / voxel_mm3)))
    if largest:
        postprocess.keep_largest_component(labels, [v for v in largest if v in kept])
    if holes:
        postprocess.fill_holes(labels, [v for v in holes if v in kept])
    timings["postprocess"] = time.perf_counter() - step
    report("postprocess", 1.0)

    timings["total"] = time.perf_counter() - started
    peak = {"process_peak_rss_bytes": _peak_rss_bytes()}
    if device.type == "cuda":
        peak["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    table = sorted((info for info in description.labels if info.value in kept), key=lambda info: info.value)
    for line in messages:
        logger.info(line)
    return SegmentationResult(
        labels=labels,
        ijk_to_ras=volumes[0].ijk_to_ras.copy(),
        label_table=table,
        probabilities=probabilities,
        timings=timings,
        peak_memory=peak,
        model_from_cache=from_cache,
        device=str(loaded.device),
        messages=messages,
        model_name=description.name,
    )


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
