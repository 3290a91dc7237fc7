"""A built wheel (what `pip install .` installs) carries the bundled model and every resource, so `deepseg segment`
without --model works from it, not only from a source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel
import numpy as np

REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_resources_and_segments_without_a_model_argument(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPOSITORY)], check=True, capture_output=True, timeout=600)  # fmt: skip
    wheel = next(wheels.glob("deepseg-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for resource in ("models/deepseg-brain/deepseg-brain.ts", "models/deepseg-brain/manifest.json",
                     "UI/DeepSegModule.ui", "Icons/DeepSegModule.png", "requirements.txt"):  # fmt: skip
        assert f"DeepSegModuleLib/Resources/{resource}" in names, resource

    installed = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(installed),
                    str(wheel)], check=True, capture_output=True, timeout=600)  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    image = work / "head.nii.gz"
    rng = np.random.default_rng(0)
    volume = np.zeros((40, 48, 40), np.float32)
    volume[8:32, 10:38, 8:32] = 80 + 10 * rng.random((24, 28, 24))
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), str(image))
    environment = {**os.environ, "PYTHONPATH": str(installed), "DEEPSEG_MODEL_DIR": str(tmp_path / "store")}
    code = ("import sys, DeepSegModuleLib; assert DeepSegModuleLib.__file__.startswith(sys.argv[1]), "
            "DeepSegModuleLib.__file__; from DeepSegModuleLib.cli import main; sys.exit(main(sys.argv[2:]))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(installed), "segment", "-i", str(image), "-o",
                             str(work / "head.seg.nrrd"), "--device", "cpu", "--json"], cwd=work, env=environment,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (work / "head.seg.nrrd").is_file()
    assert "deepseg-brain" in result.stdout


def test_the_test_install_kept_the_cpu_torch_the_constraints_pin():
    """`pip install -e ".[test]" -c Testing/constraints.txt` must not replace the torch installed first (the newest
    torchvision, which timm pulls in, would bring a newer torch, a CUDA build)."""
    import torch

    pinned = next(line.split("==")[1].strip() for line in (REPOSITORY / "Testing" / "constraints.txt").read_text()
                  .splitlines() if line.startswith("torch=="))  # fmt: skip
    assert torch.__version__.split("+")[0] == pinned
