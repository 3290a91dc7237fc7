"""Intensity normalisation of one input channel, as a model description specifies it."""

from __future__ import annotations

import torch

from DeepSegModuleLib.models.description import NormalizationMode, NormalizationSpec


def normalize(channel: torch.Tensor, spec: NormalizationSpec, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the normalised channel (float32, same device).

    Args:
        channel: one input channel, any shape.
        spec: what to do (see :class:`~DeepSegModuleLib.models.description.NormalizationMode`).
        mask: voxels the statistics are computed over for ``zscore`` (defaults to all, or non-zero
            voxels when ``spec.nonzero``).
    """
    values = channel.float()
    mode = spec.mode
    if mode == NormalizationMode.NONE:
        return values
    if mode == NormalizationMode.CT:
        values = values.clamp(float(spec.lower), float(spec.upper))
        return (values - float(spec.mean)) / max(float(spec.std), 1e-8)
    if mode == NormalizationMode.RANGE:
        lower, upper = float(spec.lower), float(spec.upper)
        scaled = (values - lower) / (upper - lower) if upper != lower else values - lower
        scaled = scaled * (spec.target_upper - spec.target_lower) + spec.target_lower
        if spec.clip:
            scaled = scaled.clamp(min(spec.target_lower, spec.target_upper), max(spec.target_lower, spec.target_upper))
        return scaled
    if mode == NormalizationMode.UNIT:
        low, high = values.min(), values.max()
        return (values - low) / torch.clamp(high - low, min=1e-8)
    if mode == NormalizationMode.ZSCORE:
        if spec.mean is not None and spec.std is not None:
            return (values - float(spec.mean)) / max(float(spec.std), 1e-8)
        if mask is None and spec.nonzero:
            mask = values != 0
        selected = values[mask] if mask is not None else values
        if selected.numel() == 0:
            return values
        mean = selected.mean()
        std = selected.std(unbiased=False) if selected.numel() > 1 else torch.zeros((), device=values.device)
        normalized = (values - mean) / torch.clamp(std, min=1e-8)
        if mask is not None and spec.nonzero:
            normalized = torch.where(mask, normalized, torch.zeros_like(normalized))
        return normalized
    raise ValueError(f"unknown normalisation mode {mode!r}")
