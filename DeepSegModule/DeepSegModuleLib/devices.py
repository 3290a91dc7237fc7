"""Where the engines run: one rule for every device argument (segmentation, registration, model loading)."""

from __future__ import annotations

from typing import Any


def resolve_device(device: Any = "auto") -> Any:
    """``"auto"`` -> CUDA when PyTorch sees a GPU, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as asked.

    Raises:
        ValueError: a device name DeepSeg does not run on, or ``"cuda"`` without a GPU (the message names the fix).
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; choose device 'cpu' or 'auto'")
    return torch.device(name)
