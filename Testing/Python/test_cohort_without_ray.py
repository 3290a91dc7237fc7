"""Ray is an optional extra: without it the batch runs as before (and never imports it), and ``--ray`` says in one
line what to install."""

from __future__ import annotations

import subprocess
import sys

import nibabel
import numpy as np

from segmentation_helpers import Thresholder, write_torchscript_model

# Runs the command in a fresh interpreter where `import ray` fails as it does where Ray is not installed.
WITHOUT_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return None
sys.meta_path.insert(0, NoRay())
from DeepSegModuleLib import cli
code = cli.main(sys.argv[1:])
print("RAY-IMPORTED" if "ray" in sys.modules else "RAY-NOT-IMPORTED")
sys.exit(code)
"""


def test_the_batch_runs_without_ray_and_ray_asks_for_its_extra(tmp_path):
    model = write_torchscript_model(tmp_path / "model", Thresholder()).parent
    cases = tmp_path / "cases"
    cases.mkdir()
    image = np.zeros((12, 12, 12), np.float32)
    image[3:9, 3:9, 3:9] = 400.0
    nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), str(cases / "a.nii.gz"))
    common = ["batch", "segment", "-m", str(model), "--cases", str(cases), "--device", "cpu", "--format", "nii.gz"]

    local = subprocess.run([sys.executable, "-c", WITHOUT_RAY, *common, "--output-dir", str(tmp_path / "local")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert local.returncode == 0, local.stderr
    assert "RAY-NOT-IMPORTED" in local.stdout and (tmp_path / "local" / "a.nii.gz").exists()

    on_ray = subprocess.run([sys.executable, "-c", WITHOUT_RAY, *common, "--output-dir", str(tmp_path / "ray"),
                             "--ray"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert on_ray.returncode == 1
    assert on_ray.stderr.strip().splitlines() == ['deepseg: error: --ray needs Ray: pip install "deepseg[ray]" (or pip '
                                                  'install ray)']  # fmt: skip
    assert not (tmp_path / "ray" / "a.nii.gz").exists()
