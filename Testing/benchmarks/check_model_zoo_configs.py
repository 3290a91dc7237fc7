"""Runs the real MONAI Model Zoo bundle configs through DeepSeg's untrusted config builder (by hand, not in CI).

The configs are not part of this repository: point the script at a checkout of Project-MONAI/model-zoo. For each
3D segmentation bundle it builds ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` through
:class:`~DeepSegModuleLib.models.bundle_config.SafeBundleConfig` (random weights are not needed: nothing is run)
and prints what built, what needs trusted mode (by name) and what failed for another reason.

    python Testing/benchmarks/check_model_zoo_configs.py /path/to/model-zoo
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_zoo", type=Path, help="a checkout of Project-MONAI/model-zoo")
    arguments = parser.parse_args()
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
    print(f"{untrusted_ok} of {len(SEGMENTATION_BUNDLES)} bundles build untrusted")


if __name__ == "__main__":
    main()
