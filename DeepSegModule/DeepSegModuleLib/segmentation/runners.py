"""One runner per model format: how a run gets from the input volumes to a label map for that format.

:func:`~DeepSegModuleLib.segmentation.pipeline.segment` does the same for every model: load, check, then
``runner.prepare(volumes)`` -> ``runner.infer(prepared)`` -> ``runner.to_labels(outputs, kept)``, then the shared
clean-up. What differs between formats lives here, behind :class:`Runner`:

* :class:`TorchScriptRunner` -- DeepSeg's own model grid (reorient, resample, normalise per the model card),
  sliding window, logits resampled back and reduced to labels;
* :class:`NnunetRunner` -- nnU-Net's preprocessing (crop, transpose, normalise, resample like nnU-Net), nnU-Net's
  window grid, the same way back;
* :class:`MonaiBundleRunner` -- the bundle's own transforms around DeepSeg's sliding window, the bundle's own
  post-processing.

A new format (TotalSegmentator's multi-part tasks, a cascade) is a new runner in :data:`RUNNERS`, not a branch in
``segment()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from DeepSegModuleLib.models.description import LoadedModel, ModelDescription, ModelFormat, OutputActivation
from DeepSegModuleLib.segmentation.grid import ModelGrid, resized_labels
from DeepSegModuleLib.segmentation.inference import sliding_window_predict, with_cpu_fallback
from DeepSegModuleLib.segmentation.normalization import normalize
from DeepSegModuleLib.segmentation.options import SegmentationOptions
from DeepSegModuleLib.segmentation.volume import VolumeArray


@dataclass
class RunSettings:
    """What every step of one run needs besides its data: where it runs, the user's options, and the callbacks."""

    device: torch.device
    options: SegmentationOptions
    progress: Callable[[str, float], None]
    cancel: Callable[[], bool] | None
    log: Callable[[str], None]


class Runner(Protocol):
    """One model format's way through a run; one instance per run (it may keep the run's grids)."""

    def prepare(self, volumes: list[VolumeArray], run: RunSettings) -> Any:
        """The network's input from volumes already on the first one's grid."""

    def infer(self, prepared: Any, run: RunSettings) -> Any:
        """The network's outputs for the prepared input (progress and cancel through ``run``)."""

    def to_labels(self, outputs: Any, kept: list[int], run: RunSettings) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
        """An ``(i, j, k)`` map of label values on the first input's grid, and float32 ``(k, j, i)`` probability
        maps of the ``kept`` labels when ``run.options.probabilities`` asks for them."""


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


class SlidingWindowRunner:
    """Preprocessing onto a model grid, DeepSeg's sliding window, outputs resampled back and reduced to labels;
    :class:`TorchScriptRunner` and :class:`NnunetRunner` differ only in their preprocessor."""

    def __init__(self, model: LoadedModel, preprocessor: Preprocessor) -> None:
        self.model = model
        self.preprocessor = preprocessor

    def prepare(self, volumes: list[VolumeArray], run: RunSettings) -> torch.Tensor:
        return with_cpu_fallback(
            lambda device: self.preprocessor.prepare(volumes, device), run.device, run.log,
            "Out of GPU memory while preparing the image: preparing it on the CPU instead.",
        )  # fmt: skip

    def infer(self, prepared: torch.Tensor, run: RunSettings) -> torch.Tensor:
        return _sliding_window(self.model, prepared, run)

    def to_labels(self, outputs: torch.Tensor, kept: list[int], run: RunSettings) -> tuple[torch.Tensor, dict]:
        description = self.model.description

        def reduce(device: torch.device) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
            on_device = outputs.to(device)
            labels = _labels_from_outputs(on_device, description, self.preprocessor)
            wanted = run.options.probabilities
            return labels, (_probabilities(on_device, description, self.preprocessor, kept) if wanted else {})

        return with_cpu_fallback(
            reduce, outputs.device, run.log, "Out of GPU memory while resampling the result: finishing on the CPU."
        )


class TorchScriptRunner(SlidingWindowRunner):
    """A TorchScript model with a DeepSeg model card."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model, GridPreprocessor(model.description))


class NnunetRunner(SlidingWindowRunner):
    """An nnU-Net v2 trained-model folder, run the way nnU-Net's predictor runs it."""

    def __init__(self, model: LoadedModel) -> None:
        from DeepSegModuleLib.segmentation.nnunet_preprocessing import NnunetPreprocessor

        super().__init__(model, NnunetPreprocessor(model.description))


class MonaiBundleRunner:
    """A MONAI bundle: its own pre-processing, DeepSeg's sliding window with the bundle's inferer settings (or the
    bundle's own inferer when it is not a sliding window), its own post-processing."""

    def __init__(self, model: LoadedModel) -> None:
        assert model.bundle is not None, "a MONAI bundle model carries its processing"
        self.model = model
        self.bundle = model.bundle
        self.reference: VolumeArray | None = None

    def prepare(self, volumes: list[VolumeArray], run: RunSettings) -> dict[str, Any]:
        self.reference = volumes[0]
        self.bundle.check_resampled_size(volumes[0])
        return self.bundle.preprocessing(self.bundle.input_dict(volumes))

    def infer(self, prepared: dict[str, Any], run: RunSettings) -> dict[str, Any]:
        from monai.data import MetaTensor
        from monai.inferers import SlidingWindowInferer

        image = prepared[self.bundle.image_key]
        inferer = self.bundle.inferer
        if isinstance(inferer, SlidingWindowInferer) or inferer is None:
            # The bundle's own window blending and padding (a bundle that pads by replicating its border gets
            # other logits near the image's edges with zero padding).
            prediction = _sliding_window(
                self.model, image[None].as_tensor(), run, blend_mode=_plain(getattr(inferer, "mode", "gaussian")),
                sigma_scale=getattr(inferer, "sigma_scale", 0.125),
                padding_mode=_plain(getattr(inferer, "padding_mode", "constant")), cval=float(getattr(inferer, "cval", 0.0)),
            )  # fmt: skip
        else:
            with torch.inference_mode():
                prediction = inferer(image[None].to(self.model.device), self.model.predictor)[0]
        prepared["pred"] = MetaTensor(prediction.float().cpu(), affine=image.affine, meta=dict(image.meta))
        prepared["pred"].applied_operations = []
        return prepared

    def to_labels(self, outputs: dict[str, Any], kept: list[int], run: RunSettings) -> tuple[torch.Tensor, dict]:
        if self.bundle.postprocessing is not None:
            outputs = self.bundle.postprocessing(outputs)
        pred = outputs["pred"]
        labels = torch.as_tensor(pred)
        if labels.ndim == 4:
            labels = labels.argmax(0) if labels.shape[0] > 1 else labels[0]
        labels = labels.round().to(torch.int64)
        assert self.reference is not None, "prepare() first"
        if tuple(labels.shape) != tuple(self.reference.array.shape[::-1]):
            run.log("The bundle's post-processing does not invert its resampling: mapping labels back to the input grid.")
            labels = self.bundle.labels_to_input_grid(labels, pred, self.reference)
        lookup = torch.tensor(self.model.description.channel_to_label, dtype=torch.int64)
        return lookup[labels.clamp(0, len(lookup) - 1)], {}


def _plain(value: Any) -> str:
    """A MONAI enum setting (``BlendMode.GAUSSIAN``) or a string as its plain value."""
    return str(getattr(value, "value", value))


def _sliding_window(model: LoadedModel, image: torch.Tensor, run: RunSettings, **blending: Any) -> torch.Tensor:
    """DeepSeg's sliding window over ``(1, C, ...)`` with the user's overlap, window batch and mirroring where set,
    the model's own otherwise; returns the ``(channels, ...)`` outputs."""
    description, options = model.description, run.options
    overlap = description.overlap if options.overlap is None else float(options.overlap)
    sw_batch = description.sw_batch_size if options.sw_batch_size is None else int(options.sw_batch_size)
    return sliding_window_predict(
        image,
        model,
        overlap=overlap,
        sw_batch_size=max(sw_batch, 1),
        mirror_axes=description.mirror_axes if options.mirroring else (),
        precision=options.precision,
        progress=run.progress,
        cancel=run.cancel,
        log=run.log,
        **blending,
    )[0]


#: The runner of each model format.
RUNNERS: dict[ModelFormat, Callable[[LoadedModel], Runner]] = {
    ModelFormat.TORCHSCRIPT: TorchScriptRunner,
    ModelFormat.NNUNET_V2: NnunetRunner,
    ModelFormat.MONAI_BUNDLE: MonaiBundleRunner,
}


def runner_for(model: LoadedModel) -> Runner:
    """A new runner for one run of ``model``."""
    return RUNNERS[ModelFormat(model.description.format)](model)


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
