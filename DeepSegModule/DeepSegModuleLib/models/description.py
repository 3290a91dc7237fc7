"""The common model description every supported format is read into.

A :class:`ModelDescription` says what the segmentation engine needs to know to run a model on a
volume it has never seen: the inputs and their modality, the grid the network was trained on
(orientation and spacing), how intensities are normalised, the sliding-window patch, and what the
output channels mean (:class:`~DeepSegModuleLib.labels.LabelInfo`). A :class:`LoadedModel` pairs a
description with a ready network on a device.

Axis conventions: spatial sizes and spacings in a description are in the *model grid's* voxel
order (i, j, k) after reorientation, which is also the order of the network's input tensor
``(N, C, i, j, k)`` unless ``axis_order`` is ``"kji"``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from DeepSegModuleLib.labels import LabelInfo

if TYPE_CHECKING:
    from DeepSegModuleLib.models.monai_bundle import BundleProcessing


class ModelFormat(str, enum.Enum):
    """Where a model came from."""

    TORCHSCRIPT = "torchscript"
    MONAI_BUNDLE = "monai_bundle"
    NNUNET_V2 = "nnunet_v2"


class Tiling(str, enum.Enum):
    """Where sliding windows are placed.

    ``monai``: MONAI's grid (step = int(patch * (1 - overlap)), last window flush with the end).
    ``nnunet``: nnU-Net's grid (as few steps of at most patch * (1 - overlap) as cover the image,
    spread evenly), with nnU-Net's gaussian; used for nnU-Net models so results match its predictor.
    """

    MONAI = "monai"
    NNUNET = "nnunet"


class NormalizationMode(str, enum.Enum):
    """Intensity normalisation applied to one input channel before the network.

    - ``none``: intensities passed through unchanged.
    - ``zscore``: ``(x - mean) / std`` of this image (over non-zero voxels when ``nonzero``), or of
      the given ``mean``/``std`` when both are set.
    - ``ct``: clip to ``[lower, upper]`` then ``(x - mean) / std`` with the stored dataset statistics
      (nnU-Net's CTNormalization).
    - ``range``: linear map of ``[lower, upper]`` onto ``[target_lower, target_upper]``, clipped when
      ``clip`` (MONAI's ScaleIntensityRange).
    - ``unit``: ``(x - min) / (max - min)`` of this image.
    """

    NONE = "none"
    ZSCORE = "zscore"
    CT = "ct"
    RANGE = "range"
    UNIT = "unit"


class OutputActivation(str, enum.Enum):
    """How network output channels turn into probabilities.

    ``softmax``: one channel per class including background (channel 0); the label map is the
    argmax. ``sigmoid``: one independent channel per label; a voxel gets the last label whose
    probability is over 0.5. ``none``: the network already outputs probabilities (treated like
    softmax output for the argmax).
    """

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    NONE = "none"


@dataclass(frozen=True)
class NormalizationSpec:
    """How to normalise one input channel. See :class:`NormalizationMode` for the meaning of fields."""

    mode: NormalizationMode = NormalizationMode.NONE
    mean: float | None = None
    std: float | None = None
    lower: float | None = None
    upper: float | None = None
    target_lower: float = 0.0
    target_upper: float = 1.0
    clip: bool = True
    nonzero: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", NormalizationMode(self.mode))
        if self.mode == NormalizationMode.CT and None in (self.lower, self.upper, self.mean, self.std):
            raise ValueError("'ct' normalisation needs lower, upper, mean and std (the training set's statistics)")
        if self.mode == NormalizationMode.RANGE and None in (self.lower, self.upper):
            raise ValueError("'range' normalisation needs lower and upper (the intensity window to map)")


@dataclass(frozen=True)
class InputSpec:
    """One network input channel: its name shown to the user and its modality (e.g. ``CT``, ``T1``)."""

    name: str
    modality: str = ""
    normalization: NormalizationSpec = field(default_factory=NormalizationSpec)


@dataclass(frozen=True)
class NnunetPlan:
    """What DeepSeg's nnU-Net runner needs from a trained model's plans.json, read once at load.

    Attributes:
        configuration: the configuration's name (``3d_fullres``, ``2d``...).
        folds: the folds ensembled.
        transpose_forward / transpose_backward: nnU-Net's axis permutation of the (k, j, i) array and its inverse.
        use_mask_for_norm: per input channel, z-score inside the non-zero region only.
        slice_wise: a 2D configuration run slice by slice.
        in_plane_spacing: for a 2D configuration, the in-plane target spacing (the slice axis keeps the input's).
    """

    configuration: str
    folds: tuple[str, ...]
    transpose_forward: tuple[int, ...] = (0, 1, 2)
    transpose_backward: tuple[int, ...] = (0, 1, 2)
    use_mask_for_norm: tuple[bool, ...] = ()
    slice_wise: bool = False
    in_plane_spacing: tuple[float, ...] | None = None


@dataclass
class ModelDescription:
    """Everything the engine needs to run a segmentation model, whatever format it came in.

    Attributes:
        name: a short human-readable name.
        format: the file format the model was read from.
        inputs: the input channels, in network channel order.
        labels: the label table (value > 0, name, colour, terminology); background is implicit.
        channel_to_label: output channel index -> label value (channel 0 -> 0 for softmax models).
        spacing: target voxel spacing in mm in model-grid (i, j, k) order; None keeps the input's.
        orientation: three-letter axis code the model grid is reoriented to (``"RAS"``, ``"LPS"``...;
            axis-aligned to the closest direction, no rotation); None keeps the input's voxel order.
        patch_size: sliding-window size in model-grid voxels (i, j, k).
        overlap: sliding-window overlap fraction in [0, 1).
        sw_batch_size: windows per network call.
        activation: how output channels become probabilities.
        mirror_axes: model-grid spatial axes (0, 1, 2 = i, j, k) the model was trained to be mirror
            invariant along; used for mirroring test-time augmentation.
        tiling: how windows are placed (see :class:`Tiling`).
        axis_order: ``"ijk"`` (MONAI convention) or ``"kji"`` (SimpleITK/nnU-Net array order) for the
            network input's spatial axes.
        source: the file or folder the model was read from.
        sha256: checksum of the model's weights file(s) when known.
        expects: what the model expects of its input (modality, body region, field of view, intensity range),
            from its card; checked before a run (see :mod:`~DeepSegModuleLib.segmentation.expectations`).
        nnunet: an nnU-Net model's plan (None for other formats).
        version: the model's own version (its card's or bundle's), "" when it gives none.
    """

    name: str
    format: ModelFormat
    inputs: list[InputSpec]
    labels: list[LabelInfo]
    channel_to_label: list[int]
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    overlap: float = 0.5
    sw_batch_size: int = 1
    activation: OutputActivation = OutputActivation.SOFTMAX
    mirror_axes: tuple[int, ...] = ()
    axis_order: str = "ijk"
    tiling: Tiling = Tiling.MONAI
    source: str = ""
    sha256: str | None = None
    expects: dict[str, Any] | None = None
    nnunet: NnunetPlan | None = None
    version: str = ""

    def __post_init__(self) -> None:
        self.format = ModelFormat(self.format)
        self.activation = OutputActivation(self.activation)
        self.tiling = Tiling(self.tiling)
        if not self.inputs:
            raise ValueError(f"model '{self.name}' declares no inputs")
        if len(self.patch_size) != 3 or any(int(s) < 1 for s in self.patch_size):
            raise ValueError(f"model '{self.name}': patch_size must be three positive integers, got {self.patch_size}")
        self.patch_size = tuple(int(s) for s in self.patch_size)
        if self.spacing is not None:
            if len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing):
                raise ValueError(f"model '{self.name}': spacing must be three positive numbers, got {self.spacing}")
            self.spacing = tuple(float(s) for s in self.spacing)
        if self.orientation is not None:
            self.orientation = validate_orientation(self.orientation)
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"model '{self.name}': overlap must be in [0, 1), got {self.overlap}")
        if self.axis_order not in ("ijk", "kji"):
            raise ValueError(f"model '{self.name}': axis_order must be 'ijk' or 'kji', got {self.axis_order!r}")
        known = {info.value for info in self.labels} | {0}
        unknown = [v for v in self.channel_to_label if v not in known]
        if unknown:
            raise ValueError(
                f"model '{self.name}': output channels map to label values {unknown} that are not in the label "
                "table; add them to the labels list"
            )

    @property
    def num_output_channels(self) -> int:
        return len(self.channel_to_label)


def validate_orientation(code: str) -> str:
    """Checks a three-letter anatomical axis code such as ``"RAS"`` and returns it upper-cased.

    Raises:
        ValueError: when the code does not name each of the three body axes once.
    """
    code = str(code).upper()
    axes = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(code) != 3 or any(c not in axes for c in code) or sorted(axes[c] for c in code) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r} must name each body axis once, like 'RAS' or 'LPS'")
    return code


Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LoadedModel:
    """A model ready to run: its description and a predictor on a device.

    Attributes:
        description: what the model expects and produces.
        predictor: maps a normalised batch ``(N, C, *patch)`` on ``device`` to output channels
            ``(N, num_output_channels, *patch)`` (logits for softmax/sigmoid models).
        device: the torch device the predictor's weights live on.
        networks: the underlying modules (one per fold for ensembles), kept for moving devices.
        to_device: moves the model to another device and returns the new predictor; None when the
            model cannot move.
        load_seconds: how long reading the model took.
        bundle: for MONAI bundles, the bundle's own pre- and post-processing and inferer settings (see
            :class:`~DeepSegModuleLib.models.monai_bundle.BundleProcessing`); None for other formats.
    """

    description: ModelDescription
    predictor: Predictor
    device: torch.device
    networks: Sequence[torch.nn.Module] = ()
    to_device: Callable[[torch.device], Predictor] | None = None
    load_seconds: float = 0.0
    bundle: BundleProcessing | None = None

    @classmethod
    def of_network(
        cls, description: ModelDescription, network: torch.nn.Module, device: torch.device, started: float,
        bundle: BundleProcessing | None = None,
    ) -> LoadedModel:  # fmt: skip
        """A model that is one network on ``device`` (TorchScript, a MONAI bundle), loaded since ``started``
        (``time.perf_counter()``)."""
        import time

        def to_device(target: torch.device) -> torch.nn.Module:
            network.to(target)
            return network

        return cls(
            description=description,
            predictor=network,
            device=device,
            networks=[network],
            to_device=to_device,
            load_seconds=time.perf_counter() - started,
            bundle=bundle,
        )

    def move_to(self, device: torch.device | str) -> None:
        """Moves the weights to ``device`` (used by the out-of-memory fallback).

        Raises:
            RuntimeError: when the model has no way to move.
        """
        device = torch.device(device)
        if device == self.device:
            return
        if self.to_device is None:
            raise RuntimeError(f"model '{self.description.name}' cannot be moved to {device}")
        self.predictor = self.to_device(device)
        self.device = device
