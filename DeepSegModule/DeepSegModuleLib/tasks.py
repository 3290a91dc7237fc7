"""What the worker runs: engine calls on plain arrays, named for :mod:`DeepSegModuleLib.jobs`.

Each task takes ``(inputs, params, progress)``: ``inputs`` holds numpy arrays (passed through shared memory),
``params`` the run's options object and the images' grids. It returns a typed result whose arrays travel back
through shared memory: :class:`~DeepSegModuleLib.segmentation.results.SegmentationResult` or
:class:`~DeepSegModuleLib.registration.results.RegistrationOutputs` (both importable without torch, so the Slicer
side reads them without loading the engines). Nothing here touches MRML; models loaded here stay in the engines'
process-wide cache, so a persistent worker keeps them warm between runs.
"""

from __future__ import annotations

from typing import Any

SEGMENT = "DeepSegModuleLib.tasks:segment"
REGISTER = "DeepSegModuleLib.tasks:register"


def segment(inputs: dict[str, Any], params: dict[str, Any], progress):
    """Segments ``inputs["image0"], ["image1"], ...`` (grids in ``params["ijk_to_ras"]``) with ``params["model"]``
    and ``params["options"]`` (a :class:`~DeepSegModuleLib.segmentation.options.SegmentationOptions`)."""
    from .segmentation.pipeline import segment as run_segmentation
    from .segmentation.volume import VolumeArray

    images = [VolumeArray(inputs[f"image{index}"], grid) for index, grid in enumerate(params["ijk_to_ras"])]
    return run_segmentation(images, params["model"], params["options"], progress=progress)


def register(inputs: dict[str, Any], params: dict[str, Any], progress):
    """Registers ``inputs["moving"]`` to ``inputs["fixed"]`` (optional ``fixed_mask``, ``moving_mask``,
    ``moving_labels``) with ``params["options"]`` (a :class:`~DeepSegModuleLib.registration.presets.RegistrationOptions`)."""
    from .registration.engine import register as run_registration
    from .registration.results import RegistrationOutputs

    options = params["options"]
    result = run_registration(
        inputs["fixed"],
        params["fixed_ijk_to_ras"],
        inputs["moving"],
        params["moving_ijk_to_ras"],
        options.config(),
        fixed_mask=inputs.get("fixed_mask"),
        moving_mask=inputs.get("moving_mask"),
        moving_labels=inputs.get("moving_labels"),
        fixed_labels=inputs.get("fixed_labels"),
        device=options.device,
        progress=progress,
    )
    deformable = result.displacement_ras is not None
    return RegistrationOutputs(
        fixed_to_moving_ras=result.fixed_to_moving_ras,
        resampled_moving=result.resampled_moving,
        quality=result.quality,
        device=result.device,
        total_displacement_ras=result.total_displacement_ras() if deformable else None,
        inverse_total_displacement_ras=result.inverse_total_displacement_ras() if deformable and options.inverse else None,
        propagated_labels=result.propagated_labels,
    )
