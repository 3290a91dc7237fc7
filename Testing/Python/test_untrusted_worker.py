"""The worker as a careless or unlucky user meets it: cancels at the wrong moment, a parent that is killed,
an interrupted command, temporary folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from DeepSegModuleLib.jobs import SHARED_MEMORY_PREFIX, JobCancelled, ProcessWorker

HERE = Path(__file__).resolve().parent


def _blocks(owner_prefix: str) -> list[str]:
    folder = Path("/dev/shm")
    return sorted(p.name for p in folder.glob(f"{SHARED_MEMORY_PREFIX}_{owner_prefix}*")) if folder.is_dir() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_cancelling_a_queued_job_leaves_the_running_one_alone():
    worker = ProcessWorker(cancel_grace_s=0.3)
    try:
        running = worker.submit("worker_tasks:slow", {"image": np.zeros((4, 4, 4), np.float32)}, {"steps": 30})
        queued = worker.submit("worker_tasks:echo", {"image": np.ones((2, 2, 2), np.float32)})
        while running.stage != "working":
            time.sleep(0.02)
        pid = worker.pid
        queued.cancel()
        with pytest.raises(JobCancelled):
            queued.wait(5)
        time.sleep(0.6)  # past the grace period a forced cancel would have used
        assert running.wait(30) == {"steps": 30}
        assert worker.pid == pid
        assert worker.submit("worker_tasks:echo", {"image": np.ones((2, 2, 2), np.float32)}).wait(30)["pid"] == pid
    finally:
        worker.shutdown()


PARENT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    sys.path[:0] = {paths!r}
    from DeepSegModuleLib.jobs import ProcessWorker
    if __name__ == "__main__":
        worker = ProcessWorker()
        job = worker.submit("worker_tasks:slow", {{"image": np.zeros((64, 64, 64), np.float32)}}, {{"steps": 1200}})
        while job.stage != "working" and not job.finished:
            time.sleep(0.02)
        print(worker.pid if not job.finished else job.error, flush=True)
        time.sleep(60)
    """
)


def test_a_killed_parent_leaves_no_worker_and_no_shared_memory(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(paths=[str(HERE), *sys.path]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        owner_prefix = f"{parent.pid}x"
        assert _blocks(owner_prefix), "the parent's input block should exist while the job runs"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker_pid), "the worker outlived its parent"
        assert _blocks(owner_prefix) == []
    finally:
        if parent.poll() is None:
            parent.kill()


def test_interrupt_stops_within_two_seconds_and_writes_nothing(tmp_path):
    """Ctrl-C during a run: exit 130, one line, no output, no worker left behind."""
    import nibabel

    from scipy.ndimage import gaussian_filter, zoom

    images = []
    for seed in (0, 1):  # two unrelated smooth 192^3 fields: the deformable stage takes about ten seconds
        volume = zoom(gaussian_filter(np.random.default_rng(seed).random((48, 48, 48)), 2), 4, order=1)
        images.append(tmp_path / f"scan{seed}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(images[-1]))
    output = tmp_path / "out.nii.gz"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-c", "from DeepSegModuleLib.cli import entry_point; entry_point()", "register", "--fixed", str(images[0]),
               "--moving", str(images[1]), "--preset", "deformable accurate", "--output-transform", str(tmp_path / "t.h5"),
               "--output-volume", str(output), "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    seen = []
    while not any("deformable" in line for line in seen):  # the engine is in its longest stage
        line = process.stderr.readline()
        assert line, f"the command ended before it started working: {seen}"
        seen.append(line)
    time.sleep(1.0)
    assert process.poll() is None
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=10)
    err = "".join(seen) + rest
    assert time.monotonic() - started < 2.0
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "deepseg: interrupted; nothing was written"
    assert "Traceback" not in err and "terminate called" not in err
    assert not output.exists() and not (tmp_path / "t.h5").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".deepseg", "deepseg-cache"))] == []


def test_no_temporary_folder_outlives_a_run(tmp_path):
    import nibabel

    image = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), str(image))
    temporary = Path(tempfile.mkdtemp(dir=tmp_path))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(temporary)}
    result = subprocess.run([sys.executable, "-m", "DeepSegModuleLib.cli", "register", "--fixed", str(image),
                             "--moving", str(image), "--preset", "rigid", "--output-transform", str(tmp_path / "t.h5"),
                             "--device", "cpu"], env=environment, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert os.listdir(temporary) == []
