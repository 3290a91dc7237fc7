"""Where the engines run: one rule for every device argument (segmentation, registration, model loading)."""

from __future__ import annotations

from typing import Any

#: The device names a user picks from ("cuda:N" also selects one GPU of several).
DEVICES = ("auto", "cpu", "cuda")


def check_device_name(device: Any) -> str:
    """``device`` as a lower-case name once it is one DeepSeg runs on (no torch needed).

    Raises:
        ValueError: any other name.
    """
    name = str(device).strip().lower()
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return name


def resolve_device(device: Any = "auto") -> Any:
    """``"auto"`` -> CUDA when PyTorch sees a GPU, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as asked.

    Raises:
        ValueError: a device name DeepSeg does not run on, or ``"cuda"`` without a GPU (the message names the fix).
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = check_device_name(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; choose device 'cpu' or 'auto'")
    return torch.device(name)
