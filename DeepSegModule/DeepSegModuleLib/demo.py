"""The offline demo: a real brain MRI in, a Slicer scene with named, coded tissue segments out.

The MRI is the MNI152 2009 T1 template with its grey- and white-matter probability maps, which the ``nilearn``
package ships (no download). Until DeepSeg's engines and default model land, the tissue segments come from
those maps (each voxel gets the most probable of background, grey and white matter), so the demo exercises
the whole path a model's output takes: files read through Slicer's storage nodes, labels written as
segments with standard terminology, probabilities as volumes, and a ``.mrb`` scene Slicer opens.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import nodes, storage
from .context import SceneContext
from .labels import BRAIN_TERMS, LabelInfo
from .preview import write_preview

TISSUE_LABELS = [
    LabelInfo(1, "grey matter", (0.55, 0.55, 0.75), BRAIN_TERMS["grey matter"]),
    LabelInfo(2, "white matter", (0.95, 0.92, 0.80), BRAIN_TERMS["white matter"]),
]


def mni152_files() -> dict[str, Path]:
    """Paths of the MNI152 2009 T1 template and its tissue maps inside the installed nilearn package."""
    try:
        import nilearn.datasets
    except ImportError as error:
        raise RuntimeError("the demo's sample MRI comes from the nilearn package: pip install nilearn") from error
    data = Path(nilearn.datasets.__file__).parent / "data"
    files = {
        "t1": data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "grey matter": data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "white matter": data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    }
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        raise RuntimeError(f"nilearn's MNI152 files are missing ({', '.join(missing)}): reinstall nilearn")
    return files


def run_demo(output: Path) -> dict:
    """Builds the demo scene and writes it into ``output``; returns what was written and how long each step took."""
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the output folder {output} ({error.strerror}): choose another --output") from None
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(now - clock, 3)
        clock = now

    context = SceneContext.headless()
    lap("scene")
    files = mni152_files()
    t1 = storage.load_volume(context, files["t1"], name="MNI152 T1")
    grey = storage.load_volume(context, files["grey matter"], name="p(grey matter)")
    white = storage.load_volume(context, files["white matter"], name="p(white matter)")
    lap("read MRI and tissue maps")

    t1_array, ijk_to_ras = nodes.volume_to_array(t1)
    probabilities = np.stack([nodes.volume_to_array(grey)[0], nodes.volume_to_array(white)[0]]).astype(np.float32)
    probabilities = np.clip(probabilities / max(float(probabilities.max()), 1e-6), 0.0, 1.0)
    background = np.clip(1.0 - probabilities.sum(axis=0), 0.0, 1.0)
    labels = np.argmax(np.concatenate([background[None], probabilities]), axis=0).astype(np.uint8)
    for node, probability in zip((grey, white), probabilities):
        nodes.probability_to_volume(context, probability, ijk_to_ras, node=node)
    segmentation = nodes.labels_to_segmentation(
        context, labels, TISSUE_LABELS, reference_volume=t1, name="MNI152 tissues"
    )
    lap("labels to segments")

    written = {
        "volume": storage.save_node(context, t1, output / "MNI152_T1.nrrd"),
        "segmentation": storage.save_node(context, segmentation, output / "MNI152_tissues.seg.nrrd"),
        "label map": output / "MNI152_tissues.nii.gz",
        "scene": output / "deepseg-demo.mrb",
    }
    label_node = nodes.array_to_volume(context, labels, ijk_to_ras, name="MNI152 tissue labels", labelmap=True)
    storage.save_node(context, label_node, written["label map"])
    storage.save_scene_bundle(context, written["scene"])
    lap("write files and scene")
    written["preview"] = write_preview(
        output / "preview.png", t1_array, ijk_to_ras, labels, TISSUE_LABELS, title="MNI152 T1 with tissue segments"
    )
    lap("preview picture")

    voxel_ml = abs(np.linalg.det(ijk_to_ras[:3, :3])) / 1000.0
    return {
        "input": str(files["t1"]),
        "grid": list(t1_array.shape),
        "segments": {info.name: round(float((labels == info.value).sum() * voxel_ml), 1) for info in TISSUE_LABELS},
        "segment_volumes_unit": "ml",
        "files": {kind: str(path) for kind, path in written.items()},
        "timings_s": timings,
    }
