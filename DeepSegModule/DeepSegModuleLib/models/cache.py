"""Keeps loaded models warm between runs.

Reading weights and building a network is often the slowest part of a short run (and what users
of other tools complain about, e.g. TotalSegmentator#383). :class:`ModelCache` keeps the most
recently used models loaded, keyed by the model's path, its files' sizes and modification times,
and the device, so a changed file is reloaded and an unchanged one never is.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from DeepSegModuleLib.models.description import LoadedModel

logger = logging.getLogger(__name__)


def _fingerprint(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


class ModelCache:
    """A small LRU cache of :class:`LoadedModel` objects.

    Args:
        max_models: how many models to keep loaded at once (each holds its weights in memory).

    Attributes:
        loads: how many times a model was actually read from disk.
        hits: how many requests were served from memory.
    """

    def __init__(self, max_models: int = 1) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0
        self.hits = 0

    def get(
        self,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        loader: Callable[[Path, torch.device], LoadedModel] | None = None,
        trust_code: bool = False,
    ) -> tuple[LoadedModel, bool]:
        """Returns the loaded model for ``path`` on ``device``, loading it when needed.

        Args:
            path: anything :func:`~DeepSegModuleLib.models.loader.load_model` accepts.
            device: the device the weights should be on.
            loader: overrides how a model is read (defaults to ``load_model``).
            trust_code: load a MONAI bundle in trusted mode (a model loaded untrusted is never reused for a
                trusted run, nor the other way round).

        Returns:
            ``(model, from_cache)``: ``from_cache`` is True when nothing was read from disk.
        """
        from DeepSegModuleLib.models.loader import load_model

        path = Path(path).resolve()
        device = torch.device(device)
        key = (str(path), str(device), bool(trust_code))
        fingerprint = _fingerprint(path)
        with self._lock:
            entry = self._models.get(key)
            if entry is not None and entry.fingerprint == fingerprint:  # type: ignore[attr-defined]
                self._models.move_to_end(key)
                self.hits += 1
                if entry.device != device:
                    # The out-of-memory fallback may have moved it to the CPU; bring it back.
                    entry.move_to(device)
                return entry, True
            if entry is not None:
                logger.info("Model files changed since they were loaded; reading %s again", path)
                del self._models[key]
            model = loader(path, device) if loader is not None else load_model(path, device, trust_code=trust_code)
            model.fingerprint = fingerprint  # type: ignore[attr-defined]
            self.loads += 1
            self._models[key] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return model, False

    def clear(self) -> None:
        """Forgets every loaded model and frees GPU memory they held."""
        with self._lock:
            self._models.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __len__(self) -> int:
        return len(self._models)


#: The process-wide cache used by the engine unless it is given another.
default_cache = ModelCache(max_models=1)
