"""The offline demo: two real brain MRIs in, a Slicer scene with a registration and named tissue segments out.

* The MNI152 2009 T1 template with its grey- and white-matter probability maps, as the ``nilearn`` package ships
  them. Its tissue segments are each voxel's most probable class of background, grey and white matter.
* A subject's T1 (2 mm, a block around the ventricles) as the ``nibabel`` package ships it for its own tests
  (``nibabel/tests/data/anatomical.nii``).

DeepSeg registers the template to the subject (affine + diffeomorphic deformable, on the CPU when there is no
GPU) and carries the template's tissue segments onto the subject. It also segments the whole template with the
default model that ships with DeepSeg (``deepseg-brain``: CSF, grey and white matter) and reports how well the
model's tissues agree with the template's own maps. (The model needs a whole head or brain in view; the subject
scan is a small block of the central brain, on which it is not meant to run. The template is what the model's
synthetic training scans were drawn from, so this shows the model working, not how well it generalises: its
card gives figures on real scans it never saw.) Files are read through Slicer's storage nodes, the transform is a grid transform node and an
``.h5`` file ITK reads, segments carry standard terminology, the ``.mrb`` scene opens in Slicer, and pictures
show each result. No download.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np

from . import nodes, segments, storage
from .context import SceneContext
from .labels import BRAIN_TERMS, LabelInfo
from .models.store import DEFAULT_MODEL_ID
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


def subject_t1_file() -> Path:
    """The subject T1 that nibabel ships with its tests (a real 2 mm scan of the central brain)."""
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    if not path.exists():
        raise RuntimeError(f"nibabel's sample T1 is missing ({path}): reinstall nibabel")
    return path


def _value_of(table, name: str) -> int:
    return next((info.value for info in table if info.name == name), -1)


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum() + b.sum())
    return round(2.0 * float(np.logical_and(a, b).sum()) / total, 3) if total else None


def run_demo(
    output: Path, preset: str = "deformable fast", device: str = "auto", overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Builds the demo scene and writes it into ``output``; returns what was written and how long each step took.

    Files already in ``output`` are never replaced unless ``overwrite`` (the output rule of
    :mod:`~DeepSegModuleLib.outputs`); nothing is written unless the whole demo succeeds.
    """
    from .outputs import OutputError, output_set

    output = Path(output)
    names = {
        "subject": "subject_T1.nrrd", "template": "MNI152_T1.nrrd", "template segmentation": "MNI152_tissues.seg.nrrd",
        "transform": "MNI152_to_subject.h5", "registered template": "MNI152_on_subject.nrrd",
        "subject segmentation": "subject_tissues.seg.nrrd", "model segmentation": "MNI152_tissues_model.seg.nrrd",
        "scene": "deepseg-demo.mrb", "preview": "preview.png", "segmentation preview": "segmentation.png",
        "registration preview": "registration.png",
    }  # fmt: skip
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file; the demo writes a folder of files: choose another name")
    with output_set(overwrite=overwrite, root=output if output.is_dir() else None) as outputs:
        outputs.claim_folder(output, "--output")
        claimed = {kind: outputs.claim(output / name, f"the demo's {name}") for kind, name in names.items()}
        return _build_demo(output, claimed, outputs, preset, device, on_step or (lambda step: None))


def _build_demo(
    output: Path, claimed: dict[str, Path], outputs: Any, preset: str, device: str, on_step: Callable[[str], None]
) -> dict:
    from .jobs import InProcessWorker
    from .logic import DeepSegLogic
    from .models.store import ModelStore
    from .registration.presets import RegistrationOptions
    from .segmentation.options import SegmentationOptions

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    on_step("building a scene")

    def lap(step: str, upcoming: str | None = None) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(now - clock, 3)
        clock = now
        if upcoming:
            on_step(upcoming)

    context = SceneContext.headless()
    lap("scene", "reading the MRIs and the template's tissue maps")
    files = mni152_files()
    template = storage.load_volume(context, files["t1"], name="MNI152 T1")
    grey = storage.load_volume(context, files["grey matter"], name="p(grey matter)")
    white = storage.load_volume(context, files["white matter"], name="p(white matter)")
    subject = storage.load_volume(context, subject_t1_file(), name="subject T1")
    lap("read MRIs and tissue maps", "making the template's tissue segments")

    labels, template_tissues = _template_tissues(context, template, grey, white)
    lap("template tissue segments", f"registering the template to the subject ({preset})")

    logic = DeepSegLogic(context, InProcessWorker())
    outcome = logic.register(
        subject, template, RegistrationOptions(preset=preset, device=device), moving_segmentation=template_tissues
    )
    subject_tissues = outcome.segmentation
    subject_tissues.SetName("subject tissues (from the template)")
    lap("register template to subject", f"segmenting the template with the {DEFAULT_MODEL_ID} model")

    model_path = ModelStore().verify(DEFAULT_MODEL_ID).model_path  # checksums of the shipped files
    segmented = logic.segment(template, str(model_path), SegmentationOptions(device=device))
    model_tissues = segmented.segmentation
    model_tissues.SetName(f"MNI152 tissues ({DEFAULT_MODEL_ID} model)")
    lap(f"segment the template with the {DEFAULT_MODEL_ID} model", "writing the files and the scene")

    saved = {
        "subject": subject, "template": template, "template segmentation": template_tissues,
        "transform": outcome.transform, "registered template": outcome.volume,
        "subject segmentation": subject_tissues, "model segmentation": model_tissues,
    }  # fmt: skip
    for kind, node in saved.items():
        storage.save_node(context, node, outputs.stage(claimed[kind]))
    storage.save_scene_bundle(context, outputs.stage(claimed["scene"]))
    written = {kind: claimed[kind] for kind in (*saved, "scene")}
    lap("write files and scene", "drawing the pictures")
    _write_pictures(outputs, claimed, subject, template, outcome, segmented)
    written.update({kind: claimed[kind] for kind in ("preview", "segmentation preview", "registration preview")})
    lap("pictures")

    summary = _summary(labels, outcome, segmented)
    return {
        "inputs": {"subject": str(subject_t1_file()), "template": str(files["t1"])},
        "preset": preset,
        "model": str(model_path),
        **summary,
        "files": {kind: str(path) for kind, path in written.items()},
        "timings_s": timings,
    }


def _template_tissues(context: SceneContext, template: Any, grey: Any, white: Any) -> tuple[np.ndarray, Any]:
    """The template's grey and white matter maps as a label map (the larger probability, above the rest) and as a
    segmentation on the template; the maps become 0..1 probability volumes."""
    _, template_grid = nodes.volume_to_array(template)
    probabilities = np.stack([nodes.volume_to_array(grey)[0], nodes.volume_to_array(white)[0]]).astype(np.float32)
    probabilities = np.clip(probabilities / max(float(probabilities.max()), 1e-6), 0.0, 1.0)
    background = np.clip(1.0 - probabilities.sum(axis=0), 0.0, 1.0)
    labels = np.argmax(np.concatenate([background[None], probabilities]), axis=0).astype(np.uint8)
    for node, probability in zip((grey, white), probabilities):
        nodes.probability_to_volume(context, probability, template_grid, node=node)
    tissues = segments.labels_to_segmentation(
        context, labels, TISSUE_LABELS, reference_volume=template, name="MNI152 tissues"
    )
    return labels, tissues


def _write_pictures(outputs: Any, claimed: dict[str, Path], subject: Any, template: Any, outcome: Any, segmented: Any) -> None:
    """The subject with the carried-over tissues, the template with the model's, and the registration's checkerboard."""
    from .preview import write_checkerboard

    subject_array, subject_grid = nodes.volume_to_array(subject)
    template_array, template_grid = nodes.volume_to_array(template)
    write_preview(
        outputs.stage(claimed["preview"]), subject_array, subject_grid, outcome.outputs.propagated_labels,
        outcome.label_table, title="Subject T1 with tissue segments carried over from the MNI152 template",
    )  # fmt: skip
    write_preview(
        outputs.stage(claimed["segmentation preview"]), template_array, template_grid, segmented.result.labels,
        segmented.result.label_table, title=f"MNI152 T1 segmented by DeepSeg's bundled {DEFAULT_MODEL_ID} model",
    )  # fmt: skip
    registered, _ = nodes.volume_to_array(outcome.volume)
    write_checkerboard(
        outputs.stage(claimed["registration preview"]), subject_array, registered, subject_grid,
        title="Checkerboard: subject T1 and the registered MNI152 template",
    )


def _summary(labels: np.ndarray, outcome: Any, segmented: Any) -> dict:
    """Segment volumes on both images, the model's agreement with the template's own tissue maps, folding, device."""
    subject_labels, table = outcome.outputs.propagated_labels, outcome.label_table
    model_labels, model_table = segmented.result.labels, segmented.result.label_table
    # The grids are the ones the results lie on: the subject's (the fixed image) and the template's.
    voxel_ml = abs(np.linalg.det(outcome.fixed_ijk_to_ras[:3, :3])) / 1000.0
    template_ml = abs(np.linalg.det(segmented.result.ijk_to_ras[:3, :3])) / 1000.0
    return {
        "subject_segments_ml": {info.name: round(float((subject_labels == info.value).sum() * voxel_ml), 1) for info in table},
        "template_segments_ml": {
            info.name: round(float((model_labels == info.value).sum() * template_ml), 1) for info in model_table
        },
        # How well the model's tissues agree with the template's own maps (and its brain with theirs).
        "agreement_dice": {
            **{
                info.name: _dice(labels == info.value, model_labels == _value_of(model_table, info.name))
                for info in TISSUE_LABELS
            },
            "brain": _dice(labels > 0, model_labels > 0),
        },
        "folding_percent": outcome.quality.folding_percent,
        "device": outcome.outputs.device,
    }
