"""The persistent worker: models stay loaded, cancel is quick and clean, crashes are survived, memory is flat."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepSegModuleLib.jobs import (
    SHARED_MEMORY_PREFIX,
    InProcessWorker,
    JobCancelled,
    JobFailed,
    JobState,
    ProcessWorker,
)


def shared_blocks() -> set[str]:
    folder = Path("/dev/shm")
    return {path.name for path in folder.glob(f"{SHARED_MEMORY_PREFIX}_*")} if folder.is_dir() else set()


WORKER_TMP = Path(tempfile.mkdtemp(prefix="deepseg-worker-tmp-"))


def temporary_files() -> set[str]:
    """What the worker left in its temporary folder (its TMPDIR points here)."""
    return set(os.listdir(WORKER_TMP))


@pytest.fixture(scope="module")
def worker():
    process_worker = ProcessWorker(cancel_grace_s=0.5, environment={"TMPDIR": str(WORKER_TMP)})
    yield process_worker
    process_worker.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.ts"
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Softmax(dim=1)).eval()
    torch.jit.save(torch.jit.script(model), str(path))
    return str(path)


def test_arrays_and_parameters_cross_without_files(worker):
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    before_blocks, before_files = shared_blocks(), temporary_files()
    outputs = worker.submit("worker_tasks:echo", {"image": image}, {"model": "x", "overlap": 0.5}).wait(60)
    np.testing.assert_array_equal(outputs["doubled"], image * 2)
    np.testing.assert_array_equal(outputs["nested"][0], image[:1])
    assert outputs["params"] == {"model": "x", "overlap": 0.5}
    assert outputs["pid"] == worker.pid != os.getpid()
    assert shared_blocks() == before_blocks
    assert temporary_files() == before_files


def test_second_run_with_the_same_model_does_not_load_it_again(worker, tiny_model):
    image = np.random.default_rng(0).normal(size=(1, 1, 8, 8, 8)).astype(np.float32)
    first = worker.submit("worker_tasks:model_run", {"image": image}, {"model": tiny_model}).wait(60)
    second = worker.submit("worker_tasks:model_run", {"image": image}, {"model": tiny_model}).wait(60)
    assert first["pid"] == second["pid"]
    assert second["loads"] == first["loads"]  # the model was already in the worker
    np.testing.assert_allclose(first["output"], second["output"])


def test_progress_streams_to_the_main_thread(worker):
    job = worker.submit("worker_tasks:slow", {}, {"steps": 30})
    seen = []
    while not job.finished:
        seen.extend(job.poll())
        time.sleep(0.02)
    seen.extend(job.poll())
    fractions = [event.fraction for event in seen if event.kind == "progress"]
    assert len(fractions) >= 10 and fractions == sorted(fractions)
    assert any(event.kind == "log" and event.message == "step 20" for event in seen)
    assert seen[-1].kind == "done" and job.wait(1) == {"steps": 30}


def test_cancel_mid_run_returns_quickly_and_leaves_nothing(worker):
    before_blocks, before_files = shared_blocks(), temporary_files()
    image = np.ones((32, 32, 32), np.float32)
    job = worker.submit("worker_tasks:slow", {"image": image}, {"steps": 1200})
    while job.fraction < 0.01:
        time.sleep(0.02)
    pid = worker.pid
    start = time.monotonic()
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(5)
    assert time.monotonic() - start < 2.0
    assert job.state == JobState.CANCELLED
    assert worker.pid == pid  # a task that checks progress stops without losing the worker
    assert shared_blocks() == before_blocks
    assert temporary_files() == before_files


def test_cancel_of_a_stuck_task_kills_and_replaces_the_worker(worker):
    job = worker.submit("worker_tasks:stuck", {"image": np.zeros((8, 8, 8), np.float32)})
    while job.stage != "stuck":
        time.sleep(0.02)
    old_pid = worker.pid
    start = time.monotonic()
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(5)
    assert time.monotonic() - start < 2.0
    outputs = worker.submit("worker_tasks:echo", {"image": np.ones((2, 2, 2), np.float32)}).wait(60)
    assert outputs["pid"] != old_pid


def test_killed_worker_gives_a_clear_error_and_the_next_run_succeeds(worker):
    before_blocks = shared_blocks()
    job = worker.submit("worker_tasks:crash", {"image": np.zeros((16, 16, 16), np.float32)})
    with pytest.raises(JobFailed, match="stopped unexpectedly.*signal 9.*next run starts a fresh worker"):
        job.wait(30)
    assert shared_blocks() == before_blocks
    outputs = worker.submit("worker_tasks:echo", {"image": np.ones((2, 2, 2), np.float32)}).wait(60)
    np.testing.assert_array_equal(outputs["doubled"], 2)


def test_task_errors_reach_the_user_word_for_word(worker):
    pid = worker.pid
    with pytest.raises(JobFailed, match="the input volume is empty: load an image into it first"):
        worker.submit("worker_tasks:fail").wait(30)
    assert worker.pid == pid


def test_twenty_runs_do_not_grow_the_worker(worker):
    image = np.ones((64, 128, 128), np.float32)
    for seed in range(2):  # warm up allocator pools
        worker.submit("worker_tasks:big_output", {"image": image}, {"seed": seed}).wait(60)
    baseline = worker.memory_bytes()
    pid = worker.pid
    for seed in range(20):
        outputs = worker.submit("worker_tasks:big_output", {"image": image}, {"seed": seed}).wait(60)
        assert outputs["volume"].shape == (64, 128, 128)
    assert worker.pid == pid
    assert worker.memory_bytes() <= baseline * 1.05, (baseline, worker.memory_bytes())


def test_in_process_worker_runs_the_same_tasks():
    worker = InProcessWorker()
    image = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    outputs = worker.submit("worker_tasks:echo", {"image": image}, {"a": 1}).wait(30)
    np.testing.assert_array_equal(outputs["doubled"], image * 2)
    assert outputs["pid"] == os.getpid()

    job = worker.submit("worker_tasks:slow", {}, {"steps": 1000})
    while job.fraction < 0.005:
        time.sleep(0.01)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(2)
    with pytest.raises(JobFailed, match="input volume is empty"):
        worker.submit("worker_tasks:fail").wait(30)
