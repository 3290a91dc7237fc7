"""Brain-mask Dice of an exported model on real scans it never saw, through DeepSeg's normal pipeline.

Cases (from the project's shared sample data, ``../shared/data`` beside the repository; see its README):

* ``mr_brain_seg3d``: a T1-like head MRI (skull and scalp in view) against its ``Brain.nrrd`` mask;
* ``mr_stroke``: the same subject's brain-extracted T1, T2 and FLAIR, each against its own non-zero region.

Each scan goes through :func:`DeepSegModuleLib.segmentation.segment` exactly as a user's would (model card,
resampling to 2 mm and back, sliding window). The brain mask is every voxel labelled CSF, grey or white
matter. Two figures per case: ``raw`` (that mask as it is) and ``cleaned`` (its largest connected component
with holes filled, what a user would keep). When the data folder is absent, nothing is run and the result says
why, so a fresh clone is not an error.

    python -m DeepSegModuleLib.training.evaluate --model Resources/models/deepseg-brain [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment

REPOSITORY = Path(__file__).resolve().parents[3]
DEFAULT_DATA = REPOSITORY.parent / "shared" / "data"

#: (case name, image file, reference: a mask file in the same folder, or None for the image's non-zero region)
CASES = (
    ("mr_brain_seg3d T1", "mr_brain_seg3d/MR.nii.gz", "mr_brain_seg3d/Brain.nrrd"),
    ("mr_stroke T1", "mr_stroke/T1.nii.gz", None),
    ("mr_stroke T2", "mr_stroke/T2.nii.gz", None),
    ("mr_stroke FLAIR", "mr_stroke/FLAIR.nii.gz", None),
)

def read_volume(path: Path) -> tuple[VolumeArray, sitk.Image]:
    """A file as a (k, j, i) array with its IJK-to-RAS matrix (SimpleITK reads in LPS)."""
    from DeepSegModuleLib.nodes import sitk_to_array

    image = sitk.ReadImage(str(path))
    array, ijk_to_ras = sitk_to_array(image)
    return VolumeArray(array.astype(np.float32), ijk_to_ras), image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """The largest connected component, holes filled."""
    components, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def brain_mask_scores(volume: VolumeArray, reference: np.ndarray, model: str | Path, device: str = "cpu") -> dict:
    """Runs the model on one volume; Dice of its brain mask (raw and cleaned) against ``reference`` (k, j, i)."""
    started = time.perf_counter()
    result = segment(volume, str(model), SegmentationOptions(device=device))
    brain = result.labels > 0
    voxel_ml = abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) / 1000.0
    return {
        "dice_raw": round(dice(brain, reference), 4),
        "dice_cleaned": round(dice(clean_mask(brain), reference), 4),
        "brain_ml": round(float(brain.sum() * voxel_ml), 1),
        "reference_ml": round(float(reference.astype(bool).sum() * voxel_ml), 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def evaluate(model: str | Path, data: Path = DEFAULT_DATA, device: str = "cpu") -> dict:
    """Scores every case whose files are present; ``{"skipped": reason}`` when the data folder is absent."""
    data = Path(data)
    if not data.is_dir():
        return {"skipped": f"no sample data at {data} (a fresh clone has none); nothing was measured"}
    scores: dict[str, dict] = {}
    for name, image_file, reference_file in CASES:
        if not (data / image_file).is_file():
            scores[name] = {"skipped": f"{data / image_file} is missing"}
            continue
        volume, image = read_volume(data / image_file)
        if reference_file is None:
            reference = volume.array != 0
        else:
            reference_image = sitk.ReadImage(str(data / reference_file))
            # Same grid in the sample data; resampling (nearest) makes that an assumption we do not rely on.
            reference_image = sitk.Resample(reference_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            reference = sitk.GetArrayFromImage(reference_image) > 0
        scores[name] = brain_mask_scores(volume, reference, model, device=device)
    return scores


def figures_text(scores: dict) -> str:
    """One line of measured figures for the model card."""
    measured = {name: score for name, score in scores.items() if "dice_raw" in score}
    if not measured:
        return "not measured"
    return ", ".join(
        f"{name} {score['dice_raw']:.3f} (cleaned {score['dice_cleaned']:.3f})" for name, score in measured.items()
    )


def record_in_card(model: Path, scores: dict) -> Path:
    """Writes the measured figures into the model card's description (the card's weights stay as they are)."""
    from DeepSegModuleLib.models.torchscript import find_card

    card_path = find_card(model)
    if card_path is None:
        raise FileNotFoundError(f"no model card for {model}")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    marker = " Measured brain-mask Dice"
    stem = card.get("description", "").split(marker)[0]
    card["description"] = (
        f"{stem}{marker} on real scans it never saw (DeepSegModuleLib.training.evaluate; raw mask, and its largest "
        f"component with holes filled): {figures_text(scores)}."
    )
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model card, TorchScript file or their folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--record", action="store_true", help="write the figures into the model card")
    arguments = parser.parse_args(argv)
    scores = evaluate(arguments.model, arguments.data, arguments.device)
    text = json.dumps(scores, indent=2)
    print(text)
    if arguments.json:
        arguments.json.write_text(text + "\n", encoding="utf-8")
    if arguments.record and "skipped" not in scores:
        print(f"figures recorded in {record_in_card(arguments.model, scores)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
