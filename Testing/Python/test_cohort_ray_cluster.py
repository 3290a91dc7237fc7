"""A cohort on a real two-node Ray cluster (``ray start`` twice), where the second node has a folder of its own:
a private file system mounted over it in its own mount namespace, as a node-local disk is on a real cluster. A
cohort whose files lie there is refused before any case runs, naming the node and the path.

The cluster lives in network, PID and mount namespaces that the test makes (only a loopback interface: no
traffic leaves them, and every process in them ends with the test). It needs root and ``unshare``; elsewhere it
is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import nibabel
import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'deepseg[ray]'")

from segmentation_helpers import Thresholder, write_torchscript_model  # noqa: E402

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).parent / "ray"

# Runs inside the namespaces: starts the head and a second node (which sees an empty file system over
# NODE_LOCAL), then the deepseg command three times; prints one JSON line per command.
DRIVER = r"""
import json, os, subprocess, sys, time
ray_command, node_local, port, runs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
address = f"127.0.0.1:{port}"
common = ["--num-cpus", "1", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
subprocess.Popen([ray_command, "start", "--head", "--port", port, "--include-dashboard", "false", *common], **quiet)
for _ in range(60):
    if subprocess.run([ray_command, "status", "--address", address], capture_output=True).returncode == 0:
        break
    time.sleep(1)
worker = f"mount -t tmpfs none {node_local} && exec {ray_command} start --address {address} {' '.join(common)}"
subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", worker], **quiet)
import ray
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
for _ in range(60):
    if sum(1 for node in ray.nodes() if node.get("Alive")) == 2:
        break
    time.sleep(1)
nodes = sorted(node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive"))
print(json.dumps({"nodes": nodes}), flush=True)
from DeepSegModuleLib import cli
import contextlib, io
for argv in runs:
    error = io.StringIO()
    with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([*argv, "--ray", address])
    print(json.dumps({"code": code, "err": error.getvalue()}), flush=True)
ray.shutdown()
subprocess.run([ray_command, "stop", "--force"], capture_output=True)
"""


def _can_make_namespaces() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = ["unshare", "-n", "-m", "-p", "-f", "--mount-proc", "sh", "-c", "ip link set lo up && true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def test_a_path_that_one_node_cannot_see_stops_the_cohort_before_any_case(tmp_path):
    if not _can_make_namespaces() or not RAY.exists():
        pytest.skip("needs root, unshare and ip (network, PID and mount namespaces) and the ray command")
    node_local = tmp_path / "node-local"
    node_local.mkdir()
    model = write_torchscript_model(tmp_path / "model", Thresholder()).parent
    shared_cases = tmp_path / "cases"
    shared_cases.mkdir()
    image = np.zeros((12, 12, 12), np.float32)
    image[4:8, 4:8, 4:8] = 400.0
    nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), str(shared_cases / "a.nii.gz"))
    local_cases = node_local / "cases"
    shutil.copytree(shared_cases, local_cases)
    common = ["-m", str(model), "--device", "cpu", "--format", "nii.gz"]
    runs = [
        ["batch", "segment", "--cases", str(local_cases), "--output-dir", str(tmp_path / "out"), *common],
        ["batch", "segment", "--cases", str(shared_cases), "--output-dir", str(node_local / "out"), *common],
        ["batch", "segment", "--cases", str(shared_cases), "--output-dir", str(tmp_path / "out"), *common],
    ]
    # Two nodes (loopback is all there is in the namespace), with Ray's token authentication as on a real cluster.
    environment = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN": uuid.uuid4().hex}  # fmt: skip
    script = f"ip link set lo up && exec {sys.executable} -c \"$0\" \"$@\""
    done = subprocess.run(
        ["unshare", "-n", "-m", "-p", "-f", "--mount-proc", "--propagation", "private", "sh", "-c", script, DRIVER,
         str(RAY), str(node_local), "6390", json.dumps(runs)],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[0]["nodes"] == ["127.0.0.1", "127.0.0.1"], (done.stdout, done.stderr[-3000:])
    inputs_unseen, output_unseen, all_shared = lines[1:4]

    # Inputs only this machine sees: refused before any case, naming the second node and the input.
    assert inputs_unseen["code"] == 1 and "does not see" in inputs_unseen["err"]
    assert str(local_cases / "a.nii.gz") in inputs_unseen["err"] and "node 127.0.0.1" in inputs_unseen["err"]
    assert len(inputs_unseen["err"].strip().splitlines()) == 1
    # An output folder only this machine sees: refused too, naming the folder.
    assert output_unseen["code"] == 1 and f"does not see {node_local / 'out'}" in output_unseen["err"]
    assert not list((node_local / "out").glob("*.nii.gz"))
    # Everything on paths both nodes see: the cohort runs (and leaves no marker behind).
    assert all_shared["code"] == 0, all_shared["err"]
    assert (tmp_path / "out" / "a.nii.gz").exists() and not list((tmp_path / "out").glob(".deepseg-ray-*"))
