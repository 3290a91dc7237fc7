"""What the trust boundary costs on the normal path (by hand, not in CI): end-to-end ``deepseg segment`` wall time
with the bundled model on a real head MRI and with a MONAI bundle on a real CT, for one or more DeepSeg
checkouts side by side (e.g. this one and the commit before the trust boundary), plus the checks on their own.

    git worktree add /tmp/deepseg-before 0c6b51b
    python Testing/benchmarks/bench_untrusted_overhead.py --checkout /tmp/deepseg-before --checkout . --repeats 3

Each run is a fresh process (imports included), alternating between checkouts so that load on the machine hits
both alike; the table gives the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
HEAD_MRI = SHARED / "mr_brain_seg3d" / "MR.nii.gz"
CT = SHARED / "ct_abdomen_small" / "example_ct_sm.nii.gz"

NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [16, 32, 64, 128],
           "strides": [2, 2, 2], "num_res_units": 2, "norm": "batch"}  # fmt: skip
INFERENCE = {
    "image_key": "image",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -57, "a_max": 164, "b_min": 0,
         "b_max": 1, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
}  # fmt: skip
METADATA = {"name": "benchmark bundle", "network_data_format": {
    "inputs": {"image": {"modality": "CT", "num_channels": 1, "spatial_shape": [96, 96, 96]}},
    "outputs": {"pred": {"num_channels": 3, "channel_def": {"0": "background", "1": "liver", "2": "spleen"}}}}}


def make_bundle(folder: Path) -> Path:
    import torch
    from monai.networks.nets import UNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(INFERENCE))
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA))
    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def timed_run(checkout: Path, argv: list[str]) -> float:
    code = (f"import sys; sys.path.insert(0, {str(checkout / 'DeepSegModule')!r}); "
            "from DeepSegModuleLib.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            env={**os.environ, "DEEPSEG_PRECISION": "fp32"})  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{checkout}: {' '.join(argv)} failed: {result.stderr.strip()[-400:]}")
    return seconds


def check_timings() -> dict[str, float]:
    """The new checks alone, in this process (this checkout only)."""
    from DeepSegModuleLib.image_checks import check_image_file
    from DeepSegModuleLib.models.torchscript_check import check_torchscript

    timings = {}
    for name, call in (
        ("check_image_file(head MRI)", lambda: check_image_file(HEAD_MRI)),
        ("check_image_file(CT)", lambda: check_image_file(CT)),
        ("check_torchscript(deepseg-brain.ts)", lambda: check_torchscript(
            Path(__file__).resolve().parents[2] / "Resources/models/deepseg-brain/deepseg-brain.ts")),
    ):  # fmt: skip
        call()
        started = time.perf_counter()
        for _ in range(5):
            call()
        timings[name] = (time.perf_counter() - started) / 5
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, action="append", required=True, help="a DeepSeg checkout")
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        bundle = make_bundle(work / "bundle")
        cases = {
            "bundled deepseg-brain, head MRI": ["segment", "-i", str(HEAD_MRI), "--device", "cpu"],
            "MONAI bundle (UNet 4 levels), CT": ["segment", "-m", str(bundle), "-i", str(CT), "--device", "cpu"],
        }
        times: dict[tuple[str, str], list[float]] = {}
        serial = 0
        for repeat in range(arguments.repeats):
            for case, argv in cases.items():
                for index, checkout in enumerate(arguments.checkout):
                    serial += 1
                    output = work / f"out-{serial}.nii.gz"
                    seconds = timed_run(checkout.resolve(), [*argv, "-o", str(output)])
                    times.setdefault((case, str(checkout)), []).append(seconds)
    print(f"{'case':40s} " + " ".join(f"{str(c)[-28:]:>30s}" for c in arguments.checkout))
    for case in cases:
        row = [statistics.median(times[(case, str(c))]) for c in arguments.checkout]
        spread = [f"{statistics.median(times[(case, str(c))]):6.2f} s ({min(times[(case, str(c))]):.2f}-"
                  f"{max(times[(case, str(c))]):.2f})" for c in arguments.checkout]  # fmt: skip
        ratio = f"  ratio {row[-1] / row[0]:.3f}" if len(row) > 1 else ""
        print(f"{case:40s} " + " ".join(f"{s:>30s}" for s in spread) + ratio)
    for name, seconds in check_timings().items():
        print(f"{name:40s} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
