"""Runs the real MONAI Model Zoo bundle configs through DeepSeg's untrusted config builder (by hand, not in CI).

The configs are not part of this repository: point the script at a checkout of Project-MONAI/model-zoo. For each
3D segmentation bundle it builds ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` through
:class:`~DeepSegModuleLib.models.bundle_config.SafeBundleConfig` (random weights are not needed: nothing is run)
and prints what built, what needs trusted mode (by name) and what failed for another reason.

    python Testing/benchmarks/check_model_zoo_configs.py /path/to/model-zoo
    python Testing/benchmarks/check_model_zoo_configs.py /path/to/model-zoo --run     # and segment with each

``--run`` goes on for every bundle that builds untrusted: it copies the bundle, writes seeded random weights of
its real ``network_def`` (the repository holds no weights), and segments a synthetic volume (a bright sphere in a
64 mm cube of 1.5 mm voxels, one channel per input the metadata names) through DeepSeg's whole path
(``segment()``: the safe config builder, the bundle's transforms, DeepSeg's sliding window), printing the labels
found or the one line a user would get.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

SEGMENTATION_BUNDLES = (
    "brats_mri_segmentation", "multi_organ_segmentation", "pancreas_ct_dints_segmentation",
    "pediatric_abdominal_ct_segmentation", "prostate_mri_anatomy", "renalStructures_CECT_segmentation",
    "renalStructures_UNEST_segmentation", "spleen_ct_segmentation", "spleen_deepedit_annotation",
    "swin_unetr_btcv_segmentation", "ventricular_short_axis_3label", "vista3d", "wholeBody_ct_segmentation",
    "wholeBrainSeg_Large_UNEST_segmentation",
)  # fmt: skip
PARTS = ("network_def", "preprocessing", "inferer", "postprocessing")


def check(bundle: Path) -> dict[str, str]:
    from DeepSegModuleLib.models.bundle_config import SafeBundleConfig, UntrustedCodeError, read_bundle_config
    from DeepSegModuleLib.models.errors import ModelError

    config_path = next(p for p in (bundle / "configs" / f"inference.{s}" for s in ("json", "yaml")) if p.exists())
    metadata = read_bundle_config(bundle / "configs" / "metadata.json")
    config = SafeBundleConfig(read_bundle_config(config_path), metadata, bundle, {"bundle_root": str(bundle),
                                                                                  "device": "cpu"})  # fmt: skip
    outcome = {}
    for part in PARTS:
        if part not in config:
            outcome[part] = "absent"
            continue
        try:
            config.resolve(part)
            outcome[part] = "built"
        except UntrustedCodeError as error:
            outcome[part] = "needs trust: " + "; ".join(error.findings)
        except ModelError as error:
            outcome[part] = f"failed: {str(error)[:160]}"
    return outcome


def run(bundle: Path, work: Path) -> str:
    """Segments a synthetic volume with a copy of ``bundle`` and random weights; a line on what came out."""
    import shutil

    import numpy as np
    import torch

    from DeepSegModuleLib.models import ModelCache
    from DeepSegModuleLib.models.bundle_config import SafeBundleConfig, read_bundle_config
    from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment

    copy = work / bundle.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("*.pt", "*.ts", "*.pth", "docs"))
    config_path = next(p for p in (copy / "configs" / f"inference.{s}" for s in ("json", "yaml")) if p.exists())
    metadata = read_bundle_config(copy / "configs" / "metadata.json")
    config = SafeBundleConfig(read_bundle_config(config_path), metadata, copy, {"bundle_root": str(copy),
                                                                                "device": "cpu"})  # fmt: skip
    torch.manual_seed(0)
    network = config.resolve("network_def")
    (copy / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), copy / "models" / "model.pt")
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    channels = int((inputs.get("image") or next(iter(inputs.values()), {})).get("num_channels", 1))
    coordinates = np.stack(np.meshgrid(*[np.arange(43)] * 3, indexing="ij"), axis=-1)
    sphere = (np.linalg.norm(coordinates - 21, axis=-1) < 12).astype(np.float32)
    grid = np.diag([1.5, 1.5, 1.5, 1.0])
    volumes = [VolumeArray(sphere * 300.0 + 20.0 * channel, grid) for channel in range(channels)]
    started = time.perf_counter()
    try:
        result = segment(volumes, copy, SegmentationOptions(device="cpu"), cache=ModelCache())
    except Exception as error:  # noqa: BLE001 - reported, as a user would see it
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    present = sorted(int(v) for v in np.unique(result.labels) if v)
    return (f"ran in {time.perf_counter() - started:.1f} s; labels {[(i.value, i.name) for i in result.label_table]}"
            f", present {present}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_zoo", type=Path, help="a checkout of Project-MONAI/model-zoo")
    parser.add_argument("--run", action="store_true", help="also segment a synthetic volume with random weights")
    arguments = parser.parse_args()
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="deepseg-zoo-"))
    ran = 0
    warnings.filterwarnings("ignore")
    untrusted_ok = 0
    for name in SEGMENTATION_BUNDLES:
        started = time.perf_counter()
        outcome = check(arguments.model_zoo / "models" / name)
        seconds = time.perf_counter() - started
        ok = all(state in ("built", "absent") for state in outcome.values())
        untrusted_ok += ok
        print(f"{name:42s} {'untrusted: all parts built' if ok else ''} ({seconds:.2f} s)")
        for part, state in outcome.items():
            if state not in ("built", "absent"):
                print(f"    {part:15s} {state}")
        if ok and arguments.run:
            line = run(arguments.model_zoo / "models" / name, work)
            ran += line.startswith("ran")
            print(f"    segment         {line}")
    print(f"{untrusted_ok} of {len(SEGMENTATION_BUNDLES)} bundles build untrusted")
    if arguments.run:
        print(f"{ran} of {len(SEGMENTATION_BUNDLES)} bundles segment untrusted (random weights)")


if __name__ == "__main__":
    main()
