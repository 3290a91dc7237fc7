"""A cohort on Ray: the cases of ``deepseg batch`` spread over the GPUs (or CPU cores) of one machine or a cluster.

- One actor per GPU of the cluster, or, without GPUs, one per ``cpus_per_actor`` cores; each loads the model
  once (its process keeps it, as the local batch's worker does) and runs cases with the local batch's own code
  (:mod:`~DeepSegModuleLib.cohort`, :func:`~DeepSegModuleLib.batch.run_case`): the same output files, byte for byte
  for label maps, and the same ``.done.json`` records, so a cohort resumes the same way whichever ran it.
- Cases are handed out one at a time to whichever actor is free, so a slow case does not hold up a queue.
- A case whose actor dies (a crash, killed for memory) is retried once on a new actor, and so is a case that
  failed with an unexpected error; a refusal of bad input is not retried. Either way the rest go on.
- A local Ray (``--ray`` alone) listens on the loopback address only (see :data:`LOOPBACK_ONLY`).
- Paths are the same for every node: on a cluster of more than one node, every node is asked first whether it
  sees the output folder (a marker file written there), the model and every input; a path one node cannot see
  stops the cohort before any case runs, naming the node and the path.

Ray is an optional extra (``pip install "deepseg[ray]"``); nothing else in DeepSeg imports it.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .batch import Case, CaseResult, finished, run_case

MAX_ATTEMPTS = 2


class RayUnavailable(ValueError):
    """Ray is not installed, or the cluster cannot be reached; the message says what to do."""


#: Read by Ray when it is imported: with "0" a Ray started on this machine takes the loopback address (as it does
#: on macOS and Windows) instead of the machine's network address, so a local cohort opens no port to the network.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _ray(local: bool = False):
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError:
        raise RayUnavailable('--ray needs Ray: pip install "deepseg[ray]" (or pip install ray)') from None
    return ray


class CaseActor:
    """One worker of the cohort (a Ray actor): a process that keeps the model loaded and runs one case at a time."""

    def __init__(self, job: Any, threads: int) -> None:
        import torch

        from .jobs import InProcessWorker

        torch.set_num_threads(max(1, threads))
        self.job = job
        self.worker = InProcessWorker()

    def run(self, case: Case, outputs: dict[str, Path]) -> CaseResult:
        return run_case(case, outputs, self.job.output_dir, lambda c, o: self.job(c, o, self.worker))

    def ready(self) -> bool:
        return True


def _missing_paths(paths: list[str], marker: str, token: str) -> list[str]:
    """On one node: the paths it does not see (the output folder counts as unseen when its marker is not the
    driver's)."""
    missing = [path for path in paths if not os.path.exists(path)]
    try:
        with open(marker, encoding="utf-8") as handle:
            if handle.read().strip() != token:
                missing.insert(0, os.path.dirname(marker))
    except OSError:
        missing.insert(0, os.path.dirname(marker))
    return missing


def check_paths_on_every_node(paths: list[Path], output_dir: Path, timeout_s: float = 120.0) -> int:
    """On a cluster of more than one node, asks each node whether it sees ``paths`` and ``output_dir``; returns the
    number of nodes.

    Raises:
        ValueError: a node does not see one of them (naming the node, the path and what to do).
    """
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) <= 1:
        return len(alive)
    token = uuid.uuid4().hex
    marker = output_dir / f".deepseg-ray-{token}"
    marker.write_text(token, encoding="utf-8")
    try:
        check = ray.remote(num_cpus=0)(_missing_paths)
        # One answer per node, by node ID (several nodes may share an address: one machine, or one NAT).
        asked = [
            (f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})", check.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote([str(p) for p in paths], str(marker), token))
            for node in alive
        ]  # fmt: skip
        for address, answer in asked:
            missing = ray.get(answer, timeout=timeout_s)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ValueError(
                    f"node {address} of the Ray cluster does not see {missing[0]}{more}: a cohort on {len(alive)} "
                    "nodes needs its model, inputs and --output-dir on a file system that every node mounts at the "
                    "same path (NFS, a shared volume); node-local paths such as /tmp are not shared"
                )  # fmt: skip
    finally:
        marker.unlink(missing_ok=True)
    return len(alive)


def run_on_ray(
    cases: list[Case],
    job: Any,
    *,
    address: str | None = None,
    cpus_per_actor: int = 1,
    on_result: Callable[[CaseResult], None] | None = None,
    round_trips: dict[str, float] | None = None,
) -> list[CaseResult]:
    """Runs ``job`` (a :mod:`~DeepSegModuleLib.cohort` job) over ``cases`` on Ray; returns one result per case, in
    order (see the module docstring).

    Args:
        address: None or "local" starts a Ray on this machine (stopped again at the end); otherwise the address of
            a running cluster ("auto", "ray://head:10001", "10.0.0.1:6379").
        cpus_per_actor: cores per actor when the cluster has no GPUs.
        on_result: called as each case ends (progress).
        round_trips: if given, filled with each run case's seconds from hand-out to result (Ray's overhead is
            this less the case's own seconds).
    """
    ray = _ray(local=address in (None, "", "local"))
    output_dir = job.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    started_here = False
    if not ray.is_initialized():
        try:
            if address in (None, "", "local"):
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            else:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {' '.join(str(error).split())[:200]}; "
                                 "start it (ray start --head) or check the address") from None  # fmt: skip
        started_here = True
    try:
        check_paths_on_every_node(job.paths(cases), output_dir)
        return _schedule(ray, cases, job, cpus_per_actor, on_result, round_trips)
    finally:
        if started_here:
            ray.shutdown()


def _schedule(ray, cases, job, cpus_per_actor, on_result, round_trips) -> list[CaseResult]:
    from ray.exceptions import GetTimeoutError, RayActorError, RayError

    results: dict[str, CaseResult] = {}
    pending: deque[tuple[Case, dict[str, Path], int]] = deque()
    for case in cases:
        outputs = job.outputs_of(case)
        done = finished(case, outputs, job.output_dir)
        if done is not None:
            results[case.name] = done
            if on_result is not None:
                on_result(done)
        else:
            pending.append((case, outputs, 1))
    if not pending:
        return [results[case.name] for case in cases]

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        count, options = gpus, {"num_gpus": 1, "num_cpus": cpus_per_actor}
    else:
        count, options = max(1, int(resources.get("CPU", 1)) // cpus_per_actor), {"num_cpus": cpus_per_actor}
    count = min(count, len(pending))
    actor_class = ray.remote(max_restarts=0, max_task_retries=0)(CaseActor).options(**options)

    def new_actor():
        return actor_class.remote(job, cpus_per_actor)

    actors = [new_actor() for _ in range(count)]
    # Started together (each imports torch and Slicer's libraries once); an actor that cannot start fails here.
    try:
        ray.get([actor.ready.remote() for actor in actors])
    except RayError as error:
        raise RayUnavailable(f"DeepSeg's Ray workers did not start: {_first_line(error)}") from None
    idle = list(range(count))
    running: dict[Any, tuple[int, Case, dict[str, Path], int, float]] = {}
    while pending or running:
        while pending and idle:
            slot = idle.pop(0)
            case, outputs, attempt = pending.popleft()
            running[actors[slot].run.remote(case, outputs)] = (slot, case, outputs, attempt, time.perf_counter())
        ready, _ = ray.wait(list(running), num_returns=1)
        slot, case, outputs, attempt, handed_out = running.pop(ready[0])
        seconds = time.perf_counter() - handed_out
        try:
            result = ray.get(ready[0])
            idle.append(slot)
        except RayActorError as error:
            ray.kill(actors[slot], no_restart=True)
            actors[slot] = new_actor()
            idle.append(slot)
            result = CaseResult(case.name, "failed", seconds, retryable=True,
                                error=f"its worker process died ({_first_line(error)})")  # fmt: skip
        except (RayError, GetTimeoutError) as error:
            idle.append(slot)
            result = CaseResult(case.name, "failed", seconds, error=_first_line(error), retryable=True)
        if round_trips is not None and result.status == "done":
            round_trips[case.name] = seconds
        result.attempts = attempt
        if result.status == "failed" and result.retryable and attempt < MAX_ATTEMPTS:
            pending.appendleft((case, outputs, attempt + 1))
            continue
        if result.status == "failed" and attempt > 1:
            result.error = f"{result.error} (failed {attempt} times)"
        results[case.name] = result
        if on_result is not None:
            on_result(result)
    return [results[case.name] for case in cases]


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
