"""Writes the data DeepSegModuleTest runs on into Resources/Testing/.

* ``BrightSphere/``: a tiny TorchScript network that calls voxels brighter than 150 "Sphere", and its DeepSeg
  model card (docs/model_card.md) with the sha256 of the weights;
* ``BrainPair/``: a registration pair made from a real brain, the MNI152 T1 template that nilearn ships
  (ICBM 2009a, skull-stripped), at 4 mm: ``fixed.nrrd`` is the template, ``moving.nrrd`` the same template moved
  by a known rigid motion, written with that motion into ``motion.json``.

Run from the repository root with the project's Python (torch, nilearn, SimpleITK, scipy):
``python Resources/make_test_data.py [output folder]``. The files are committed; the script is kept so they can
be rebuilt rather than hand-edited, and Testing/Python/test_bundled_test_data.py checks that it rebuilds them. The output
is deterministic: the same versions of torch, nilearn and SimpleITK write the same bytes, wherever the
repository is checked out.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parent / "Testing"

MODEL_FOLDER = "BrightSphere"
WEIGHTS_NAME = "bright-sphere.ts"
CARD_NAME = "deepseg.json"
#: The network calls a voxel "Sphere" when it is brighter than this.
THRESHOLD = 150.0

PAIR_FOLDER = "BrainPair"
FIXED_NAME = "fixed.nrrd"
MOVING_NAME = "moving.nrrd"
MOTION_NAME = "motion.json"
#: Voxel size of the pair, mm: small files, and still a brain a rigid registration can lock onto.
PAIR_SPACING_MM = 4.0
#: The known motion: rotations about the RAS axes through the RAS origin (the anterior commissure in MNI space),
#: applied in this order, then a translation.
ROTATION_DEGREES = {"R": 4.0, "A": -3.0, "S": 6.0}
TRANSLATION_MM = (5.0, -4.0, 3.0)

ICBM_COPYRIGHT = (
    "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill "
    "University. Permission to use, copy, modify, and distribute this software and its documentation for any "
    "purpose and without fee is hereby granted, provided that the above copyright notice appear in all copies. The "
    "authors and McGill University make no representations about the suitability of this software for any purpose. "
    'It is provided "as is" without express or implied warranty. The authors are not responsible for any data '
    "loss, equipment damage, property loss, or injury to subjects or patients resulting from the use or misuse of "
    "this software package."
)


# ----------------------------------------------------------------------------------------------- the model


def bright_sphere_card(weights_sha256: str) -> dict:
    """The model card of the bright-sphere network (the card the module test used to write at test time)."""
    return {
        "deepseg_model_card": 1,
        "name": "Bright sphere",
        "description": (
            f"Test model: calls voxels brighter than {THRESHOLD:g} 'Sphere'. Written by Resources/make_test_data.py "
            "for DeepSegModuleTest."
        ),
        "version": "1.0.0",
        "license": "Apache-2.0",
        "weights": WEIGHTS_NAME,
        "sha256": weights_sha256,
        "inputs": [{"name": "CT", "modality": "CT", "normalization": {"mode": "none"}}],
        "orientation": "RAS",
        "spacing": [1.5, 1.5, 1.5],
        "patch_size": [16, 16, 16],
        "overlap": 0.25,
        "activation": "softmax",
        "labels": [{"value": 1, "name": "Sphere", "color": [0.9, 0.2, 0.1]}],
    }


def bright_sphere_weights() -> bytes:
    """The network as a TorchScript archive, without anything that depends on where or when it was written.

    ``torch.jit.save`` stores, next to the program, a debug table of the Python stack that traced it (absolute
    paths of this file and of the installed torch) and an archive id derived from all records. Both are dropped
    or recomputed here so the bytes, hence the card's sha256, depend only on the network and the torch version.
    """
    import torch

    class Threshold(torch.nn.Module):
        # TorchScript names the class in the archive after its module and qualified name: fixed here, so the
        # archive is the same whether this file runs as a script or is imported (as the test of this data does).
        __module__ = "__main__"
        __qualname__ = "Threshold"

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            score = (image[:, :1] - THRESHOLD) / 50.0
            return torch.cat([-score, score], dim=1)  # logits: background, Sphere

    # Tracing needs no source file, so the network can live in this function.
    network = torch.jit.trace(Threshold().eval(), torch.zeros(1, 1, 16, 16, 16))
    saved = io.BytesIO()
    torch.jit.save(network, saved)
    with zipfile.ZipFile(saved) as archive:
        records = {
            info.filename: archive.read(info.filename)
            for info in archive.infolist()
            if not info.filename.endswith((".debug_pkl", "/.data/serialization_id"))
        }
        id_record = next((name for name in archive.namelist() if name.endswith("/.data/serialization_id")), None)
    if id_record is not None:
        digest = hashlib.sha256(b"".join(name.encode() + data for name, data in sorted(records.items()))).digest()
        records[id_record] = str(int.from_bytes(digest[:16], "big")).zfill(40)[:40].encode()
    written = io.BytesIO()
    with zipfile.ZipFile(written, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return written.getvalue()


def write_bright_sphere_model(folder: Path) -> Path:
    """Writes the weights and the card into ``folder``; returns the weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = bright_sphere_weights()
    (folder / WEIGHTS_NAME).write_bytes(weights)
    card = bright_sphere_card(hashlib.sha256(weights).hexdigest())
    (folder / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return folder / WEIGHTS_NAME


# ----------------------------------------------------------------------------------------------- the brain pair


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"R": (1, 2), "A": (2, 0), "S": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def fixed_to_moving_ras() -> np.ndarray:
    """The known motion as a 4x4 RAS matrix: a point of the fixed image to the same anatomy in the moving one."""
    rotation = np.eye(3)
    for axis, degrees in ROTATION_DEGREES.items():
        rotation = _rotation(axis, degrees) @ rotation
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = TRANSLATION_MM
    return matrix


def _pair_grid(template_shape: tuple[int, int, int], template_ijk_to_ras: np.ndarray) -> tuple[tuple, np.ndarray]:
    """A 4 mm grid, axis-aligned in RAS, over the template's field of view. Returns ((k, j, i) shape, IJK->RAS)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, template_shape[0] - 1) for j in (0, template_shape[1] - 1)
                        for k in (0, template_shape[2] - 1)])  # fmt: skip
    ras = (corners @ template_ijk_to_ras.T)[:, :3]
    low, high = ras.min(axis=0), ras.max(axis=0)
    size = np.floor((high - low) / PAIR_SPACING_MM).astype(int) + 1
    ijk_to_ras = np.diag([PAIR_SPACING_MM, PAIR_SPACING_MM, PAIR_SPACING_MM, 1.0])
    ijk_to_ras[:3, 3] = low
    return tuple(int(n) for n in size[::-1]), ijk_to_ras


def _sample(template: np.ndarray, template_ijk_to_ras: np.ndarray, ras_kji: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``template`` ((i, j, k) array) at RAS points ((k, j, i, 3) array); 0 outside."""
    from scipy.ndimage import map_coordinates

    points = np.concatenate([ras_kji.reshape(-1, 3), np.ones((ras_kji[..., 0].size, 1))], axis=1)
    ijk = (points @ np.linalg.inv(template_ijk_to_ras).T)[:, :3]
    values = map_coordinates(template, ijk.T, order=1, mode="constant", cval=0.0)
    return values.reshape(ras_kji.shape[:3])


def _write_nrrd(path: Path, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array_kji)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((ras_to_lps @ ijk_to_ras[:3, 3]).tolist())
    image.SetDirection((ras_to_lps @ (ijk_to_ras[:3, :3] / spacing)).ravel().tolist())
    sitk.WriteImage(image, str(path), useCompression=True)


def write_brain_pair(folder: Path) -> Path:
    """Writes fixed.nrrd, moving.nrrd and motion.json into ``folder``; returns the motion file."""
    from nilearn.datasets import load_mni152_template
    from scipy.ndimage import gaussian_filter

    folder.mkdir(parents=True, exist_ok=True)
    template_image = load_mni152_template(resolution=1)
    template_ijk_to_ras = np.asarray(template_image.affine, dtype=np.float64)
    # Smoothed before it is sampled at 4 mm, so the small images are not aliased.
    template = gaussian_filter(np.asarray(template_image.get_fdata(), dtype=np.float64), sigma=1.5)
    template *= 255.0 / template.max()

    shape, ijk_to_ras = _pair_grid(template_image.shape, template_ijk_to_ras)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ras = (np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64) @ ijk_to_ras.T)[..., :3]

    motion = fixed_to_moving_ras()
    # moving(T x) = fixed(x): the moving image at y shows the template at T^-1 y.
    moving_to_fixed = np.linalg.inv(motion)
    ras_in_template = ras @ moving_to_fixed[:3, :3].T + moving_to_fixed[:3, 3]
    for name, points in ((FIXED_NAME, ras), (MOVING_NAME, ras_in_template)):
        values = np.clip(np.rint(_sample(template, template_ijk_to_ras, points)), 0, 255).astype(np.uint8)
        _write_nrrd(folder / name, values, ijk_to_ras)

    description = {
        "description": (
            "Registration test pair: fixed.nrrd is the MNI152 T1 template (ICBM 2009a, skull-stripped, as nilearn "
            f"ships it) smoothed and resampled to {PAIR_SPACING_MM:g} mm; moving.nrrd is the same template moved "
            "by the rigid motion below, on the same grid. Written by Resources/make_test_data.py."
        ),
        "fixed": FIXED_NAME,
        "moving": MOVING_NAME,
        "fixed_to_moving_ras": [[round(float(value), 9) for value in row] for row in motion],
        "direction": (
            "fixed_to_moving_ras maps a point of the fixed image (RAS, mm) to the point of the moving image that shows "
            "the same anatomy: the resampling transform, which a Slicer transform node holds as its 'from parent' "
            "transform after moving is registered to fixed (put the moving volume under it to see it aligned)."
        ),
        "rotation_degrees_about_ras_axes_in_order": ROTATION_DEGREES,
        "rotation_centre_ras": [0.0, 0.0, 0.0],
        "translation_mm": list(TRANSLATION_MM),
        "source": "nilearn.datasets.load_mni152_template(resolution=1)",
        "license": ICBM_COPYRIGHT,
    }
    (folder / MOTION_NAME).write_text(_json_text(description), encoding="utf-8")
    return folder / MOTION_NAME


def _json_text(value: dict) -> str:
    """Indented JSON with each list of numbers on one line, so the matrix reads as a matrix."""
    text = json.dumps(value, indent=2)
    numbers = re.compile(r"\[\s+((?:-?[0-9.e+-]+,\s+)*-?[0-9.e+-]+)\s+\]")
    return numbers.sub(lambda match: "[" + re.sub(r",\s+", ", ", match.group(1)) + "]", text) + "\n"


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    output = Path(arguments[0]) if arguments else OUTPUT
    for written in (write_bright_sphere_model(output / MODEL_FOLDER), write_brain_pair(output / PAIR_FOLDER)):
        for path in sorted(written.parent.iterdir()):
            print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
