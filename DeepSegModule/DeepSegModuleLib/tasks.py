"""What the worker runs: engine calls on plain arrays, named for :mod:`DeepSegModuleLib.jobs`.

Each task takes ``(inputs, params, progress)``: ``inputs`` holds numpy arrays (passed through shared memory),
``params`` plain values. It returns arrays and plain values. Nothing here touches MRML; models loaded here stay
in the engines' process-wide cache, so a persistent worker keeps them warm between runs.
"""

from __future__ import annotations

from typing import Any

SEGMENT = "DeepSegModuleLib.tasks:segment"
REGISTER = "DeepSegModuleLib.tasks:register"


def segment(inputs: dict[str, Any], params: dict[str, Any], progress) -> dict[str, Any]:
    """Segments ``inputs["image0"], ["image1"], ...`` (grids in ``params["ijk_to_ras"]``) with ``params["model"]``."""
    from .segmentation import SegmentationOptions, VolumeArray
    from .segmentation import segment as run_segmentation

    images = [VolumeArray(inputs[f"image{index}"], grid) for index, grid in enumerate(params["ijk_to_ras"])]
    options = SegmentationOptions(**params.get("options", {}))
    result = run_segmentation(images, params["model"], options, progress=progress)
    return {
        "labels": result.labels,
        "ijk_to_ras": result.ijk_to_ras,
        "label_table": list(result.label_table),
        "probabilities": {int(value): array for value, array in result.probabilities.items()},
        "report": {
            "timings_s": dict(result.timings),
            "peak_memory_bytes": dict(result.peak_memory),
            "model_from_cache": result.model_from_cache,
            "device": result.device,
            "messages": list(result.messages),
        },
    }


def register(inputs: dict[str, Any], params: dict[str, Any], progress) -> dict[str, Any]:
    """Registers ``inputs["moving"]`` to ``inputs["fixed"]``; optional masks and moving labels."""
    from .registration import register as run_registration

    result = run_registration(
        inputs["fixed"],
        params["fixed_ijk_to_ras"],
        inputs["moving"],
        params["moving_ijk_to_ras"],
        params.get("preset", "deformable fast"),
        fixed_mask=inputs.get("fixed_mask"),
        moving_mask=inputs.get("moving_mask"),
        moving_labels=inputs.get("moving_labels"),
        fixed_labels=inputs.get("fixed_labels"),
        device=params.get("device", "auto"),
        progress=progress,
        **params.get("overrides", {}),
    )
    outputs: dict[str, Any] = {
        "fixed_to_moving_ras": result.fixed_to_moving_ras,
        "resampled_moving": result.resampled_moving,
        "quality": result.quality.as_dict(),
        "device": result.device,
    }
    if result.displacement_ras is not None:
        outputs["total_displacement_ras"] = result.total_displacement_ras()
        if params.get("inverse"):
            outputs["inverse_total_displacement_ras"] = result.inverse_total_displacement_ras()
    if result.propagated_labels is not None:
        outputs["propagated_labels"] = result.propagated_labels
    return outputs
