"""Runs engine calls in a persistent worker, streams progress, cancels, and survives worker crashes.

A *task* is a plain function ``task(inputs, params, progress) -> outputs`` named by ``"module:function"``:
``inputs`` and ``outputs`` are dicts (or dataclasses) whose numpy arrays cross between processes through shared memory (no
file round trips) and whose other values are pickled; ``progress(stage, fraction, message="")`` reports
progress and raises :class:`JobCancelled` once the job has been cancelled.

* :class:`ProcessWorker` (the default) keeps one worker process alive between jobs, so whatever a task caches
  at module level (a loaded model, cuDNN's autotuning) is still there for the next job. A job that does not
  stop within ``cancel_grace_s`` of a cancel, or a worker that dies (out of memory, a CUDA error), ends the
  job with an error message; the next job starts a fresh worker.
* :class:`InProcessWorker` runs the same tasks in a thread of the calling process, for tests and debugging.

Neither touches MRML: the caller polls :meth:`Job.poll` on its main thread (a ``QTimer`` in Slicer, a loop in
scripts) and writes results into the scene there.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .shared_arrays import SHARED_MEMORY_PREFIX, pack, release_shared_memory, unpack

logger = logging.getLogger(__name__)

__all__ = ["SHARED_MEMORY_PREFIX", "InProcessWorker", "Job", "JobCancelled", "JobEvent", "JobFailed", "JobState",
           "ProcessWorker", "kill_all_workers", "release_shared_memory", "resolve_task"]



class JobCancelled(Exception):
    """Raised inside a task (from its progress callback) when the user cancelled the job."""


class JobFailed(RuntimeError):
    """A job ended with an error; the message is written for the user."""


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class JobEvent:
    """Something a job reports: ``kind`` is "progress", "log", "done", "failed" or "cancelled"."""

    kind: str
    stage: str = ""
    fraction: float = 0.0
    message: str = ""


ProgressCallback = Callable[..., None]


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"2 h 05 min"``: a time left as a person reads it, no more precise than an
    estimate is (the panel's status line and the batch's case lines)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def resolve_task(task: str) -> Callable:
    """Imports ``"package.module:function"``."""
    module_name, _, function_name = task.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"a task is named 'package.module:function', got {task!r}")
    return getattr(importlib.import_module(module_name), function_name)


# ------------------------------------------------------------------------------------ the job handle


@dataclass
class Job:
    """A submitted job: poll it from the main thread, wait for it, or cancel it."""

    id: str
    task: str
    state: JobState = JobState.QUEUED
    stage: str = ""
    fraction: float = 0.0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _outputs: Any = field(default=None, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: Callable[[], None] | None = field(default=None, repr=False)
    log: list[str] = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def poll(self) -> list[JobEvent]:
        """Events since the last poll (call from the main thread; never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def cancel(self) -> None:
        """Asks the job to stop; :meth:`wait` then raises :class:`JobCancelled`."""
        if not self.finished and self._cancel is not None:
            self._cancel()

    def wait_until_finished(self, timeout: float | None = None) -> bool:
        """Blocks up to ``timeout`` seconds for the job to end; True once it has ended."""
        return self._finished.wait(timeout)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Blocks until the job ends and returns its outputs.

        Raises:
            JobCancelled: the job was cancelled.
            JobFailed: the task raised, or the worker died; the message says what happened.
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.task} still running after {timeout} s")
        if self.state == JobState.CANCELLED:
            raise JobCancelled(self.error or "cancelled")
        if self.state == JobState.FAILED:
            raise JobFailed(self.error or "failed")
        return self._outputs

    def seconds_left(self) -> float | None:
        """A rough estimate of the time left from the progress so far (None before any progress)."""
        if self.fraction <= 0.02 or self.finished:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed * (1.0 - self.fraction) / self.fraction

    # called by workers (any thread)
    def _report(self, event: JobEvent) -> None:
        if event.kind == "progress":
            self.stage, self.fraction = event.stage or self.stage, event.fraction
            self.state = JobState.RUNNING
        elif event.kind == "log":
            self.log.append(event.message)
        self._events.put(event)

    def _finish(self, state: JobState, outputs: Any = None, error: str | None = None) -> None:
        if self.finished:
            return
        self.state, self._outputs, self.error = state, outputs, error
        if state == JobState.DONE:
            self.fraction = 1.0
        self._events.put(JobEvent(kind=state.value, stage=self.stage, fraction=self.fraction, message=error or ""))
        self._finished.set()


# ------------------------------------------------------------------------------------ in-process worker


class InProcessWorker:
    """Runs tasks one at a time in a background thread of this process (tests, debugging, no GPU isolation)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def submit(self, task: str, inputs: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Job:
        job = Job(id=uuid.uuid4().hex[:8], task=task)
        cancelled = threading.Event()
        job._cancel = cancelled.set

        def progress(stage: str, fraction: float, message: str = "") -> None:
            if cancelled.is_set():
                raise JobCancelled("cancelled by the user")
            job._report(JobEvent("progress", stage, float(fraction), message))
            if message:
                job._report(JobEvent("log", stage, float(fraction), message))

        def run() -> None:
            with self._lock:
                try:
                    function = resolve_task(task)
                    outputs = function(dict(inputs or {}), dict(params or {}), progress)
                    if cancelled.is_set():
                        raise JobCancelled("cancelled by the user")
                    job._finish(JobState.DONE, outputs)
                except JobCancelled:
                    job._finish(JobState.CANCELLED, error="cancelled by the user")
                except Exception as error:  # noqa: BLE001 - reported to the user, never swallowed
                    logger.debug("task %s failed:\n%s", task, traceback.format_exc())
                    job._finish(JobState.FAILED, error=_user_message(error))

        threading.Thread(target=run, name=f"deepseg-{job.id}", daemon=True).start()
        return job

    def shutdown(self) -> None:
        pass


def _user_message(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    lowered = text.lower()
    if "out of memory" in lowered or isinstance(error, MemoryError):
        return f"out of memory: {text}. Try device='cpu', a smaller window batch, or close other GPU programs"
    return text


# ------------------------------------------------------------------------------------ persistent process


def _worker_main(task_connection, event_connection) -> None:  # pragma: no cover - runs in the child process
    """The worker process: receives jobs, runs them one at a time, streams events back.

    It exits when its parent is gone (the pipe closes, or it is re-parented), first unlinking the shared-memory
    blocks of every job it was given, so a killed Slicer or CLI leaves no orphan worker and no ``/dev/shm`` block.
    """
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent decides, and stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cancelled_jobs: set[str] = set()
    owners: set[str] = set()
    pending: queue.Queue = queue.Queue()
    parent = os.getppid()

    def orphaned() -> None:
        for owner in list(owners):
            release_shared_memory(owner)
        os._exit(0)

    def listen() -> None:
        while True:
            try:
                if not task_connection.poll(1.0):
                    if os.getppid() != parent:
                        orphaned()
                    continue
                message = task_connection.recv()
            except (EOFError, OSError):
                orphaned()
                return
            if message[0] == "cancel":
                cancelled_jobs.add(message[1])
            else:
                if message[0] == "run":
                    owners.add(message[2])
                pending.put(message)
                if message[0] == "stop":
                    return

    threading.Thread(target=listen, daemon=True).start()
    while True:
        message = pending.get()
        if message is None or message[0] == "stop":
            return
        _, job_id, owner, task, packed_inputs, params = message
        if job_id in cancelled_jobs:  # cancelled while queued: its inputs are already freed by the parent
            event_connection.send(("cancelled", job_id, "cancelled by the user"))
            owners.discard(owner)
            continue
        event_connection.send(("started", job_id))

        def progress(stage: str, fraction: float, message: str = "", _job_id: str = job_id) -> None:
            if _job_id in cancelled_jobs:
                raise JobCancelled("cancelled by the user")
            event_connection.send(("progress", _job_id, stage, float(fraction), message))

        try:
            inputs = unpack(packed_inputs, unlink=False)
            outputs = resolve_task(task)(inputs, params, progress)
            if job_id in cancelled_jobs:
                raise JobCancelled("cancelled by the user")
            event_connection.send(("done", job_id, pack(outputs, owner, "o")))
        except JobCancelled:
            event_connection.send(("cancelled", job_id, "cancelled by the user"))
        except BaseException as error:  # noqa: BLE001 - every failure goes back as a message
            event_connection.send(("failed", job_id, _user_message(error), traceback.format_exc()))
        finally:
            inputs = outputs = None  # drop references before the next job
            owners.discard(owner)


_LIVE_WORKERS: weakref.WeakSet = weakref.WeakSet()


def kill_all_workers() -> None:
    """Kills every worker process this process started and frees their jobs' shared memory (an interrupt)."""
    for worker in list(_LIVE_WORKERS):
        worker.kill()
        with worker._lock:
            worker._fail_all("interrupted", JobState.CANCELLED)
            worker._discard_process()


class ProcessWorker:
    """A persistent worker process; the first job starts it, a crash or a forced cancel restarts it lazily.

    Args:
        python: the interpreter for the worker (Slicer's Python inside Slicer; this one by default).
        cancel_grace_s: how long a cancelled job may take to stop by itself before the worker is killed.
        environment: extra environment variables for the worker (e.g. ``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(self, python: str | None = None, cancel_grace_s: float = 0.75, environment: dict[str, str] | None = None):
        self._context = multiprocessing.get_context("spawn")
        if python:
            self._context.set_executable(python)
        self._environment = dict(environment or {})
        self.cancel_grace_s = cancel_grace_s
        self._process = None
        self._task_connection = None
        self._event_connection = None
        self._reader = None
        self._jobs: dict[str, tuple[Job, str]] = {}
        self._running: str | None = None  # the job the worker has started, if any
        self._lock = threading.RLock()
        self._serial = itertools.count()
        self.starts = 0
        _LIVE_WORKERS.add(self)

    # lifecycle

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self._discard_process()
        parent_tasks, child_tasks = self._context.Pipe(duplex=False)
        child_events, parent_events = self._context.Pipe(duplex=False)
        saved = {key: os.environ.get(key) for key in self._environment}
        os.environ.update(self._environment)
        try:
            process = self._context.Process(
                target=_worker_main, args=(parent_tasks, parent_events), name="deepseg-worker", daemon=True
            )
            process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        parent_tasks.close()
        parent_events.close()
        self._process, self._task_connection, self._event_connection = process, child_tasks, child_events
        self.starts += 1
        self._reader = threading.Thread(target=self._read_events, args=(process, child_events), daemon=True)
        self._reader.start()

    def _discard_process(self) -> None:
        for connection in (self._task_connection, self._event_connection):
            if connection is not None:
                try:
                    connection.close()
                except OSError:
                    pass
        self._process = self._task_connection = self._event_connection = None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the worker (a running job is cancelled)."""
        with self._lock:
            process = self._process
            if process is None:
                return
            try:
                self._task_connection.send(("stop",))
            except OSError:
                pass
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(timeout)
            self._fail_all("the worker was shut down", JobState.CANCELLED)
            self._discard_process()

    def kill(self) -> None:
        """Kills the worker process at once (what a crash looks like; used by forced cancel and tests)."""
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            process.join(5)

    # jobs

    def submit(self, task: str, inputs: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Job:
        """Starts ``task`` with ``inputs`` (arrays go through shared memory) and ``params`` (pickled)."""
        with self._lock:
            self._ensure_started()
            job = Job(id=uuid.uuid4().hex[:8], task=task)
            owner = f"{os.getpid()}x{next(self._serial)}"
            job._cancel = lambda: self._cancel(job)
            packed = pack(dict(inputs or {}), owner, "i")
            self._jobs[job.id] = (job, owner)
            try:
                self._task_connection.send(("run", job.id, owner, task, packed, dict(params or {})))
            except (OSError, pickle.PicklingError, TypeError, AttributeError) as error:
                self._jobs.pop(job.id, None)
                release_shared_memory(owner)
                raise JobFailed(f"could not send the job to the worker: {error}") from error
            return job

    def _cancel(self, job: Job) -> None:
        with self._lock:
            if job.finished or job.id not in self._jobs:
                return
            try:
                self._task_connection.send(("cancel", job.id))
            except OSError:
                pass
            if self._running != job.id:
                # still queued behind another job: it ends now, and the worker skips it; the running job is
                # not touched
                self._finish(job, JobState.CANCELLED, error="cancelled by the user")
                return
        # A task that checks its progress callback stops by itself; one stuck in a long kernel is killed.
        threading.Timer(self.cancel_grace_s, self._force_cancel, args=(job,)).start()

    def _force_cancel(self, job: Job) -> None:
        if job.finished:
            return
        logger.info("job %s did not stop within %.1f s: restarting the worker", job.task, self.cancel_grace_s)
        with self._lock:
            if job.finished or self._running != job.id:
                return
            self._finish(job, JobState.CANCELLED, error="cancelled by the user")
            process = self._process
            self.kill()
            # the next job starts a fresh worker at once; jobs queued in the killed one cannot run there
            if self._process is process:
                self._fail_all("the worker was restarted to stop a cancelled job; run this one again")
                self._discard_process()

    def _finish(self, job: Job, state: JobState, outputs: Any = None, error: str | None = None) -> None:
        if self._running == job.id:
            self._running = None
        entry = self._jobs.pop(job.id, None)
        if entry is not None:
            release_shared_memory(entry[1])
        job._finish(state, outputs, error)

    def _fail_all(self, message: str, state: JobState = JobState.FAILED) -> None:
        for job, _ in list(self._jobs.values()):
            self._finish(job, state, error=message)

    def _read_events(self, process, connection) -> None:
        """Reader thread: turns the worker's messages into job events; notices a dead worker."""
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                break
            kind, job_id = message[0], message[1]
            entry = self._jobs.get(job_id)
            if entry is None:
                if kind == "done":  # a job cancelled meanwhile: free what it sent back
                    unpack(message[2], unlink=True)
                continue
            job = entry[0]
            if kind == "started":
                with self._lock:
                    self._running = job_id
                continue
            if kind == "progress":
                _, _, stage, fraction, text = message
                job._report(JobEvent("progress", stage, fraction, text))
                if text:
                    job._report(JobEvent("log", stage, fraction, text))
            elif kind == "done":
                try:
                    outputs = unpack(message[2], unlink=True)
                except Exception as error:  # noqa: BLE001
                    self._finish(job, JobState.FAILED, error=f"could not read the job's results: {error}")
                else:
                    self._finish(job, JobState.DONE, outputs)
            elif kind == "cancelled":
                self._finish(job, JobState.CANCELLED, error=message[2])
            elif kind == "failed":
                logger.debug("worker traceback:\n%s", message[3])
                self._finish(job, JobState.FAILED, error=message[2])
        process.join(1.0)
        with self._lock:
            if self._process is process:
                code = process.exitcode
                reason = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                self._fail_all(
                    f"the DeepSeg worker stopped unexpectedly ({reason}; often out of memory or a GPU error). "
                    "Nothing was changed; the next run starts a fresh worker"
                )
                self._discard_process()

    def memory_bytes(self) -> int | None:
        """Resident memory of the worker process (Linux), for leak checks and the status line."""
        pid = self.pid
        if pid is None:
            return None
        try:
            resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
            return None
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
