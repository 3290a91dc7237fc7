"""Sliding-window inference with gaussian blending, mirroring TTA and an out-of-memory fallback chain."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from DeepSegModuleLib.models.description import LoadedModel, ModelDescription, Tiling
from DeepSegModuleLib.models.errors import ModelMismatchError
from DeepSegModuleLib.segmentation.options import PRECISIONS

logger = logging.getLogger(__name__)


T = TypeVar("T")


class SegmentationCancelled(Exception):
    """The user cancelled the run; nothing was written."""


PRECISION_ENVIRONMENT_VARIABLE = "DEEPSEG_PRECISION"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bfloat16() -> bool:
    """True when this CPU computes bfloat16 convolutions natively (AVX512-BF16 or AMX) through oneDNN.

    Without such instructions torch emulates bfloat16 on the CPU, which is slower than float32
    (the reason nnU-Net never autocasts on CPUs), so ``"auto"`` precision stays float32 there.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    checks = (
        lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        lambda: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
    )
    for check in checks:
        try:
            return bool(check())
        except (AttributeError, RuntimeError):
            continue
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the network runs in on ``device``, or None for plain float32.

    ``"auto"`` takes ``$DEEPSEG_PRECISION`` when set, else float16 on CUDA, bfloat16 on CPUs with native
    bfloat16 (about 2x faster than float32 there) and float32 elsewhere. ``"fp32"`` is exact float32
    everywhere; ``"bf16"``/``"fp16"`` force that autocast dtype (``"fp16"`` only on CUDA).

    Raises:
        ValueError: an unknown precision name, or ``"fp16"`` on the CPU.
    """
    name = str(precision).lower()
    if name == "auto":
        name = os.environ.get(PRECISION_ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_has_native_bfloat16():
            return torch.bfloat16
        return None
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on the CPU")
    return torch.bfloat16 if name == "bf16" else torch.float16


def with_cpu_fallback(step: Callable[[torch.device], T], device: torch.device, log: Callable[[str], None],
                      message: str) -> T:  # fmt: skip
    """``step(device)``; when that runs out of GPU memory, ``log(message)`` and ``step`` once more on the CPU.

    The one out-of-memory retry of a single step (preparing the image, resampling the outputs);
    :func:`sliding_window_predict` walks the longer ladder of :func:`fallback_attempts` the same way.
    """
    try:
        return step(device)
    except Exception as error:
        if device.type != "cuda" or not is_out_of_memory(error):
            raise
    log(message)
    torch.cuda.empty_cache()
    return step(torch.device("cpu"))


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA and CPU allocation failures (which torch reports as different exception types)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _float32_forward(forward: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    with torch.autocast(args[0].device.type, enabled=False):
        return forward(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))


def keep_float32_ends(network: torch.nn.Module, input_channels: int, output_channels: int) -> None:
    """Makes the network's first convolution(s) and its 1x1x1 segmentation head(s) ignore autocast (in place).

    Under bfloat16 autocast these two layers cost the most accuracy and little time. The first one's output
    feeds an instance normalisation that subtracts its mean: rounded to bfloat16's 8 significant bits
    before that subtraction, most of what is left is rounding error (measured: with only the head kept in
    float32 a small structure still loses 1-3% Dice; with both, labels match float32 at Dice >= 0.99).
    The head's output is the logits whose argmax is the answer. Cost: about 10% of the bfloat16 speed-up
    (one float32 convolution on one channel, and bfloat16 <-> float32 copies of two full-resolution
    feature maps). Idempotent; harmless without autocast.
    """
    for module in network.modules():
        if getattr(module, "_deepseg_float32_ends", False) or not isinstance(module, torch.nn.modules.conv._ConvNd):
            continue
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            continue
        first = module.in_channels == input_channels
        head = module.out_channels == output_channels and all(int(k) == 1 for k in module.kernel_size)
        if first or head:
            module.forward = functools.partial(_float32_forward, module.forward)
            module._deepseg_float32_ends = True


def nnunet_steps(image_shape: Sequence[int], patch: Sequence[int], step_fraction: float) -> list[list[int]]:
    """Window start positions per axis on nnU-Net's grid: the fewest steps of at most patch * step_fraction
    that cover the (padded) image, spread evenly. A window one voxel deep (a 2d configuration's slice axis)
    visits every slice once, as nnU-Net's 2D predictor does."""
    steps = []
    for size, window in zip(image_shape, patch):
        if window == 1:
            steps.append(list(range(size)))
            continue
        count = int(np.ceil((size - window) / (window * step_fraction))) + 1
        stride = (size - window) / (count - 1) if count > 1 else 0.0
        steps.append([int(np.round(stride * i)) for i in range(count)])
    return steps


@functools.lru_cache(maxsize=4)
def _nnunet_gaussian_array(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    # Axes one voxel deep (a 2d configuration's slice axis) are left out: nnU-Net's 2D map is over the 2D patch.
    extent = tuple(n for n in patch if n > 1) or (1,)
    delta = np.zeros(extent)
    delta[tuple(n // 2 for n in extent)] = 1.0
    weights = gaussian_filter(delta, [n * sigma_scale for n in extent], 0, mode="constant", cval=0)
    weights = (weights / weights.max()).astype(np.float32)
    weights[weights == 0] = weights[weights > 0].min()
    weights = weights.reshape(patch)
    weights.setflags(write=False)
    return weights


def nnunet_gaussian(patch: tuple[int, ...], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """nnU-Net's importance map: a blurred delta at the patch centre, max-normalised, zeros lifted to the minimum
    (over the axes longer than one voxel, so a ``(1, px, py)`` patch gets nnU-Net's 2D map)."""
    return torch.tensor(_nnunet_gaussian_array(tuple(patch), float(sigma_scale)))


def _prefetched_windows(image: torch.Tensor, batches: list, device: torch.device):
    """Yields ``(regions, windows)``, cutting the next batch in a helper thread while the network runs.

    Besides overlapping copies with compute, this measurably speeds up CPU convolutions (about 1.5x on
    2 cores for nnU-Net-sized windows; nnU-Net's predictor does the same), so it is not optional.
    """
    pending: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            for regions in batches:
                if stop.is_set():
                    return
                windows = torch.cat([image[(slice(None), slice(None), *region)] for region in regions]).to(device)
                pending.put((regions, windows))
        except Exception as error:  # surfaced in the consumer
            pending.put(error)
            return
        pending.put(None)

    worker = threading.Thread(target=produce, name="deepseg-windows", daemon=True)
    worker.start()
    try:
        while (item := pending.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                pending.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


FLOAT16_LIMIT = float(torch.finfo(torch.float16).max)
#: Channels of a window converted to float16 at a time (a small staging buffer, whatever the label count).
_STAGING_CHANNELS = 10


def nnunet_tiled_inference(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    patch: Sequence[int],
    step_fraction: float,
    sw_batch_size: int,
    window_device: torch.device,
    stitch_device: torch.device,
    accumulation_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Gaussian-blended sliding window on nnU-Net's grid; ``image`` is (1, C, X, Y, Z).

    The blended outputs are kept in ``accumulation_dtype``: float16 by default, as nnU-Net's own predictor
    keeps them, which halves the run's largest buffer (4.8 GB -> 2.4 GB for 100 labels on a CT-sized model
    grid). Each window is weighted by its share of the gaussian weights at every voxel (the weight sums of
    all windows are known before the first one runs), so the buffer only ever holds convex combinations of
    logits: float16 cannot overflow unless a logit does, no division pass is needed, and the rounding is
    float16's relative 2^-11 of the logits (labels agree with float32 sums at Dice >= 0.99). A window whose
    logits float16 cannot hold turns the buffer into float32. The predictor's outputs are consumed (scaled
    in place).

    Returns:
        ``(1, num_output_channels, X, Y, Z)`` blended outputs in ``accumulation_dtype`` (or float32).
    """
    spatial = list(image.shape[2:])
    padded_shape = [max(s, p) for s, p in zip(spatial, patch)]
    below = [(p - s) // 2 for s, p in zip(spatial, padded_shape)]
    if padded_shape != spatial:
        pads = []
        for s, p, b in reversed(list(zip(spatial, padded_shape, below))):
            pads += [b, p - s - b]
        image = F.pad(image, pads, mode="constant", value=0.0)
    image = image.to(stitch_device)
    weights = nnunet_gaussian(tuple(int(p) for p in patch)).to(stitch_device)
    starts = list(itertools.product(*nnunet_steps(padded_shape, patch, step_fraction)))
    regions = [tuple(slice(o, o + p) for o, p in zip(origin, patch)) for origin in starts]
    batches = [regions[first : first + sw_batch_size] for first in range(0, len(regions), sw_batch_size)]
    weight_sum = torch.zeros(padded_shape, dtype=torch.float32, device=stitch_device)
    for region in regions:
        weight_sum[region] += weights
    logits = None
    staging = None
    for regions_of_batch, windows in _prefetched_windows(image, batches, window_device):
        outputs = predictor(windows).to(stitch_device)
        if logits is None:
            logits = torch.zeros((outputs.shape[1], *padded_shape), dtype=accumulation_dtype, device=stitch_device)
        if logits.dtype != torch.float32:
            low, high = torch.aminmax(outputs)
            if max(-float(low), float(high)) >= FLOAT16_LIMIT:
                logger.warning("the network's logits exceed float16's range: blending windows in float32")
                logits, staging = logits.float(), None
        for output, region in zip(outputs, regions_of_batch):
            share = weights / weight_sum[region]  # this window's part of the blend at each voxel
            if logits.dtype == torch.float32:
                # In place: no window-sized temporary (5x faster than `+= output * share` on a CPU).
                logits[(slice(None), *region)].addcmul_(output, share)
                continue
            # Mixed float32 -> float16 arithmetic is ~10x slower on a CPU than converting a few channels at
            # a time into a staging buffer and adding float16 to float16.
            output.mul_(share)
            if staging is None:
                staging = torch.empty((min(_STAGING_CHANNELS, output.shape[0]), *output.shape[1:]),
                                      dtype=logits.dtype, device=stitch_device)  # fmt: skip
            for first in range(0, output.shape[0], staging.shape[0]):
                part = staging[: min(staging.shape[0], output.shape[0] - first)]
                part.copy_(output[first : first + part.shape[0]])
                logits[(slice(first, first + part.shape[0]), *region)].add_(part)
        del outputs, output  # before the next window runs: 0.8 GB for 100 labels at 128^3
    crop = tuple(slice(b, b + s) for b, s in zip(below, spatial))
    return logits[(slice(None), *crop)][None]


def count_windows(image_shape: Sequence[int], roi: Sequence[int], overlap: float, tiling: str = "monai") -> int:
    """How many windows the sliding window visits (image padded up to the roi first)."""
    if Tiling(tiling) == Tiling.NNUNET:
        padded = [max(s, r) for s, r in zip(image_shape, roi)]
        return math.prod(len(axis) for axis in nnunet_steps(padded, roi, 1.0 - overlap))
    total = 1
    for size, window in zip(image_shape, roi):
        size = max(size, window)
        if size == window:
            continue
        interval = max(int(window * (1 - overlap)), 1)
        total *= math.ceil((size - window) / interval) + 1
    return total


@dataclass
class InferenceAttempt:
    """One rung of the fallback ladder: windows per call, where windows run, where they are stitched."""

    sw_batch_size: int
    window_device: torch.device
    stitch_device: torch.device
    message: str = ""


def fallback_attempts(sw_batch_size: int, device: torch.device) -> list[InferenceAttempt]:
    """The ladder tried in order when memory runs out: fewer windows, CPU stitching, CPU."""
    cpu = torch.device("cpu")
    attempts = [InferenceAttempt(sw_batch_size, device, device)]
    if sw_batch_size > 1:
        attempts.append(
            InferenceAttempt(
                1, device, device,
                f"Out of {'GPU' if device.type == 'cuda' else 'main'} memory with {sw_batch_size} windows at a time: "
                "retrying one window at a time.",
            )
        )  # fmt: skip
    if device.type != "cpu":
        attempts.append(
            InferenceAttempt(
                1, device, cpu, "Still out of GPU memory: stitching the result in main memory instead (slower)."
            )
        )
        attempts.append(
            InferenceAttempt(1, cpu, cpu, "Still out of GPU memory: running this model on the CPU (much slower).")
        )
    return attempts


class WindowPredictor:
    """Wraps a model's predictor for one run: axis order, mirroring, progress, cancel and checks."""

    def __init__(
        self,
        model: LoadedModel,
        mirror_axes: Sequence[int],
        total_calls: int,
        progress: Callable[[str, float], None] | None,
        cancel: Callable[[], bool] | None,
        precision: str,
    ) -> None:
        self.model = model
        self.mirror_axes = tuple(mirror_axes)
        self.total_calls = max(total_calls, 1)
        self.progress = progress
        self.cancel = cancel
        self.precision = precision
        self.calls = 0

    def _forward(self, windows: torch.Tensor) -> torch.Tensor:
        description = self.model.description
        if description.axis_order == "kji":
            windows = windows.permute(0, 1, 4, 3, 2)
        try:
            output = self.model.predictor(windows)
        except Exception as error:
            if is_out_of_memory(error):
                raise
            expected = len(description.inputs)
            raise ModelMismatchError(
                f"the network of model '{description.name}' failed on a window of shape {tuple(windows.shape)} "
                f"({expected} input channel(s) as its description says): {str(error).splitlines()[0]}. "
                "Check the model's inputs and patch size in its description."
            ) from error
        if isinstance(output, (tuple, list)):
            output = output[0]  # deep-supervision networks return the full-resolution head first
        if isinstance(output, dict):
            raise ModelMismatchError(f"model '{description.name}' returned a dict; its predictor must return a tensor")
        if output.shape[1] != description.num_output_channels or output.shape[2:] != windows.shape[2:]:
            raise ModelMismatchError(
                f"model '{description.name}' returned shape {tuple(output.shape)} for windows of shape "
                f"{tuple(windows.shape)}, but its description expects {description.num_output_channels} output "
                "channels of the window's size. Fix the labels in the model card or use the matching weights."
            )
        if description.axis_order == "kji":
            output = output.permute(0, 1, 4, 3, 2)
        return output.float()

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if self.cancel is not None and self.cancel():
            raise SegmentationCancelled("segmentation cancelled by the user")
        dtype = resolve_precision(self.precision, windows.device)
        autocast = torch.autocast(windows.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            prediction = self._forward(windows)
            combos = [
                c for r in range(1, len(self.mirror_axes) + 1) for c in itertools.combinations(self.mirror_axes, r)
            ]
            for axes in combos:
                dims = [a + 2 for a in axes]
                prediction += torch.flip(self._forward(torch.flip(windows, dims)), dims)
            if combos:
                prediction /= len(combos) + 1
        self.calls += 1
        if self.progress is not None:
            self.progress("inference", min(self.calls / self.total_calls, 1.0))
        return prediction


def sliding_window_predict(
    image: torch.Tensor,
    model: LoadedModel,
    *,
    overlap: float,
    sw_batch_size: int,
    mirror_axes: Sequence[int] = (),
    precision: str = "auto",
    progress: Callable[[str, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    blend_mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
) -> torch.Tensor:
    """Runs the network over a whole normalised image with gaussian-weighted sliding windows.

    Args:
        image: ``(1, C, X, Y, Z)`` in model-grid axis order (any device).
        model: the loaded model; may be moved to the CPU by the fallback chain.
        overlap: window overlap fraction.
        sw_batch_size: windows per network call.
        mirror_axes: spatial axes to mirror for test-time augmentation (empty: none).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :func:`resolve_precision`).
        progress: ``progress("inference", fraction)``.
        cancel: returns True to stop.
        log: receives user-readable lines about fallbacks.
        blend_mode: ``"gaussian"`` (default) or ``"constant"`` window blending (MONAI's BlendMode).
        sigma_scale: gaussian sigma as a fraction of the window size.
        padding_mode: how an image smaller than a window is padded (MONAI's: ``"constant"`` with ``cval``,
            ``"replicate"``, ``"reflect"``...); nnU-Net's window grid pads with zeros, as nnU-Net does.
        cval: the constant of ``"constant"`` padding.

    Returns:
        ``(1, num_output_channels, X, Y, Z)`` blended network outputs on the stitching device: float16 for
        models on nnU-Net's window grid (see :func:`nnunet_tiled_inference`), float32 otherwise.

    Raises:
        MemoryError: when even the last fallback runs out of memory (the message says what to try).
        SegmentationCancelled: when ``cancel()`` returned True.
    """
    description = model.description
    roi = description.patch_size
    tiling = Tiling(description.tiling)
    total = count_windows(image.shape[2:], roi, overlap, tiling)
    last_error: BaseException | None = None
    for attempt in fallback_attempts(sw_batch_size, model.device):
        if attempt.message:
            logger.warning(attempt.message)
            if log is not None:
                log(attempt.message)
        if attempt.window_device != model.device:
            model.move_to(attempt.window_device)
        calls = math.ceil(total / attempt.sw_batch_size)
        if resolve_precision(precision, attempt.window_device) is not None:
            for network in model.networks:
                keep_float32_ends(network, len(description.inputs), description.num_output_channels)
        predictor = WindowPredictor(model, mirror_axes, calls, progress, cancel, precision)
        try:
            with torch.inference_mode():
                return _tiled(image, predictor, description, tiling, overlap, attempt,
                              dict(mode=blend_mode, sigma_scale=sigma_scale, padding_mode=padding_mode, cval=cval))
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            last_error = error
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise MemoryError(
        "out of memory even with one window at a time"
        + (" on the CPU" if model.device.type == "cpu" else "")
        + ": close other programs, crop the volume to the region of interest, or use a lower-resolution model"
    ) from last_error


def _tiled(
    image: torch.Tensor,
    predictor: WindowPredictor,
    description: ModelDescription,
    tiling: Tiling,
    overlap: float,
    attempt: InferenceAttempt,
    blending: dict,
) -> torch.Tensor:
    """One attempt of :func:`sliding_window_predict`: nnU-Net's window grid, or MONAI's sliding window."""
    roi = description.patch_size
    if tiling == Tiling.NNUNET:
        return nnunet_tiled_inference(
            image, predictor, roi, 1.0 - overlap, attempt.sw_batch_size, attempt.window_device, attempt.stitch_device
        )
    from monai.inferers import SlidingWindowInferer  # 2 s of imports: paid when a window first runs

    inferer = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=attempt.sw_batch_size,
        overlap=overlap,
        **blending,
        sw_device=attempt.window_device,
        device=attempt.stitch_device,
        cache_roi_weight_map=True,
    )
    output = inferer(image.to(attempt.stitch_device), predictor)
    return output.as_tensor() if hasattr(output, "as_tensor") else output
