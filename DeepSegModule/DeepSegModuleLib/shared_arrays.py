"""Numpy arrays between processes through named shared-memory blocks: :func:`pack` replaces every array in a job's
inputs or outputs (inside dicts, lists, tuples and dataclasses) by a :class:`SharedArray` reference, :func:`unpack`
takes them back; what is left is pickled. No file round trips."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHARED_MEMORY_PREFIX = "deepseg"


@dataclass(frozen=True)
class SharedArray:
    """A picklable reference to a numpy array held in a named shared-memory block."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _block_name(owner: str, index: str) -> str:
    # Short names: macOS limits shared-memory names to 31 characters.
    return f"{SHARED_MEMORY_PREFIX}_{owner}_{index}"


def _open_block(name: str, size: int = 0) -> shared_memory.SharedMemory:
    """Creates (``size`` > 0) or attaches a block that Python's resource tracker does not own.

    DeepSeg frees every block itself (the receiver unlinks it; a job's leftovers are unlinked when it ends),
    and the tracker would otherwise warn about, or unlink, blocks that have changed hands between processes.
    """
    create = size > 0
    try:
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    except TypeError:  # Python < 3.13: no track argument
        block = shared_memory.SharedMemory(name=name, create=create, size=size)
        try:
            from multiprocessing import resource_tracker

            resource_tracker.unregister(block._name, "shared_memory")  # the name the tracker knows
        except Exception as error:  # noqa: BLE001 - tracking is only a safety net
            logger.debug("could not untrack shared memory %s: %s", name, error)
        return block


def _share(array: np.ndarray, name: str) -> SharedArray:
    array = np.ascontiguousarray(array)
    block = _open_block(name, size=max(array.nbytes, 1))
    try:
        np.ndarray(array.shape, dtype=array.dtype, buffer=block.buf)[...] = array
    finally:
        block.close()
    return SharedArray(name, tuple(array.shape), array.dtype.str)


def _take(reference: SharedArray, unlink: bool) -> np.ndarray:
    block = _open_block(reference.name)
    try:
        array = np.ndarray(reference.shape, dtype=np.dtype(reference.dtype), buffer=block.buf).copy()
    finally:
        block.close()
        if unlink:
            _unlink(reference.name)
    return array


def _unlink(name: str) -> None:
    path = Path("/dev/shm") / name
    if path.parent.is_dir():
        path.unlink(missing_ok=True)
        return
    try:  # pragma: no cover - not Linux
        block = _open_block(name)
        block.close()
        block.unlink()
    except FileNotFoundError:  # pragma: no cover
        pass


def _with_fields(value: Any, convert: Callable[[Any], Any]) -> Any:
    """A shallow copy of dataclass instance ``value`` with ``convert`` applied to each field (frozen ones too)."""
    copied = copy.copy(value)
    for item in dataclasses.fields(value):
        object.__setattr__(copied, item.name, convert(getattr(value, item.name)))
    return copied


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def pack(values: Any, owner: str, direction: str) -> Any:
    """Moves every numpy array (also inside lists, tuples, dicts and dataclasses) into shared memory blocks of
    ``owner``; what is left is pickled."""
    counter = itertools.count()

    def pack(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.dtype != object:
            return _share(value, _block_name(owner, f"{direction}{next(counter)}"))
        if isinstance(value, dict):
            return {key: pack(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(pack(item) for item in value)
        if _is_dataclass_instance(value):
            return _with_fields(value, pack)
        return value

    return pack(values)


def unpack(values: Any, unlink: bool) -> Any:
    if isinstance(values, SharedArray):
        return _take(values, unlink)
    if isinstance(values, dict):
        return {key: unpack(item, unlink) for key, item in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(unpack(item, unlink) for item in values)
    if _is_dataclass_instance(values):
        return _with_fields(values, lambda item: unpack(item, unlink))
    return values


def release_shared_memory(owner: str) -> int:
    """Unlinks every leftover shared-memory block of job ``owner`` (e.g. a job killed mid-transfer)."""
    folder = Path("/dev/shm")
    if not folder.is_dir():  # pragma: no cover - not Linux: blocks are unlinked one by one as they are read
        return 0
    removed = 0
    for path in folder.glob(f"{SHARED_MEMORY_PREFIX}_{owner}_*"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
