"""Tasks for the worker tests; imported by name inside the worker process (see DeepSegModuleLib.jobs)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

_loaded_models: dict[str, object] = {}
_load_count = 0


def echo(inputs, params, progress):
    progress("echo", 0.5)
    return {"doubled": inputs["image"] * 2, "params": params, "pid": os.getpid(), "nested": [inputs["image"][:1]]}


def model_run(inputs, params, progress):
    """Loads a TorchScript model once per process (as the engines' model cache does) and runs it."""
    global _load_count
    import torch

    path = params["model"]
    if path not in _loaded_models:
        _loaded_models[path] = torch.jit.load(path)
        _load_count += 1
    model = _loaded_models[path]
    with torch.no_grad():
        output = model(torch.from_numpy(inputs["image"])).numpy()
    progress("inference", 1.0)
    return {"output": output, "loads": _load_count, "pid": os.getpid()}


def slow(inputs, params, progress):
    """Reports progress every 50 ms for up to a minute; stops at the first check after a cancel."""
    steps = int(params.get("steps", 1200))
    for step in range(steps):
        progress("working", step / steps, f"step {step}" if step % 20 == 0 else "")
        time.sleep(0.05)
    return {"steps": steps}


def stuck(inputs, params, progress):
    """Never calls progress again: cancel has to kill the worker."""
    progress("stuck", 0.1)
    time.sleep(60)
    return {}


def crash(inputs, params, progress):
    progress("about to crash", 0.3)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def fail(inputs, params, progress):
    raise ValueError("the input volume is empty: load an image into it first")


def big_output(inputs, params, progress):
    """Allocates and returns a fresh 8 MB array (for the memory-growth check)."""
    rng = np.random.default_rng(int(params.get("seed", 0)))
    return {"volume": rng.normal(size=(64, 128, 128)).astype(np.float32) + inputs["image"].mean()}
