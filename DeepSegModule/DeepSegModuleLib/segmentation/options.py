"""What a user chooses for one segmentation run, as one object (no torch: the panel and the command line build it).

The same :class:`SegmentationOptions` travels unchanged from the panel's parameter node or the command line's flags
through :class:`~DeepSegModuleLib.logic.DeepSegLogic` and the worker to
:func:`~DeepSegModuleLib.segmentation.pipeline.segment`; it pickles. Every setting has one name everywhere: the
field here, the panel's parameter (camelCase of the same words) and the command line's flag (``--mirroring``,
``--probabilities``, ``--precision``...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from DeepSegModuleLib.devices import check_device_name

#: The network arithmetic a user can ask for (see :attr:`SegmentationOptions.precision`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class SegmentationOptions:
    """What the user can choose for one run.

    Attributes:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` for one GPU of several).
        overlap: sliding-window overlap in [0, 1); None uses the model's.
        sw_batch_size: windows per network call; None uses the model's.
        mirroring: mirroring test-time augmentation along the model's mirror axes (up to 8x slower).
        precision: the network's arithmetic. ``"auto"`` (default): float16 autocast on CUDA, bfloat16
            autocast on CPUs with native bfloat16 (AVX512-BF16/AMX), float32 elsewhere; ``$DEEPSEG_PRECISION``
            overrides it. ``"fp32"``: exact float32 everywhere (what nnU-Net does on a CPU). ``"bf16"``,
            ``"fp16"`` (CUDA only): force that autocast dtype. docs/segmentation.md has the measured agreement.
        labels: label values or names to keep (None: all); others become background after the argmax.
        keep_largest_component: True for every label, or the values/names to apply it to.
        fill_holes: True for every label, or the values/names to apply it to.
        min_component_mm3: connected components smaller than this volume (mm^3) are removed.
        probabilities: also return a float32 probability map per kept label on the input grid.
        trust_code: a MONAI bundle's config may run code outside DeepSeg's allow-list (the user's explicit
            choice; see :mod:`~DeepSegModuleLib.models.bundle_config`).
    """

    device: str = "auto"
    overlap: float | None = None
    sw_batch_size: int | None = None
    mirroring: bool = False
    precision: str = "auto"
    labels: Sequence[int | str] | None = None
    keep_largest_component: bool | Sequence[int | str] = False
    fill_holes: bool | Sequence[int | str] = False
    min_component_mm3: float = 0.0
    probabilities: bool = False
    trust_code: bool = False

    def checked(self) -> SegmentationOptions:
        """Returns self once every field holds a value the engine accepts.

        Raises:
            ValueError: the first field that does not, with the values it takes.
        """
        check_device_name(self.device)
        if str(self.precision).lower() not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must be in 0..1 (e.g. 0.5), not {self.overlap!r}")
        if self.sw_batch_size is not None and int(self.sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be 1 or more, not {self.sw_batch_size!r}")
        if self.min_component_mm3 < 0:
            raise ValueError(f"min_component_mm3 must be 0 or more, not {self.min_component_mm3!r}")
        return self

    def replace(self, **changes) -> SegmentationOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def label_names(text: str | None) -> list[str] | None:
    """Label names typed as one line (the panel's field, ``--labels``): comma-separated, blanks ignored; None (all
    labels) when there are none."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None
