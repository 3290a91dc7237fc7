"""Training targets built from the MNI152 2009 template that ``nilearn`` ships.

nilearn's copy of the template (``mni_icbm152_t1_tal_nlin_sym_09a_converted``) is brain-extracted: T1 is zero
outside the brain. It comes with grey- and white-matter probability maps and no CSF or head labels, so both
are derived here, at the template's 1 mm, before going to 2 mm:

1. ``t1``, ``gm``, ``wm`` are scaled to 0..1 (the files store 0..255).
2. **Intracranial region** (the brain mask the network learns): the template's own brain extraction
   (``t1 > 0``), opened with a 1 mm ball (drops single stray voxels), united with ``gm + wm >= 0.5`` and with
   holes filled in 3D.
3. **Grey / white matter**: intracranial voxels with ``gm + wm >= 0.5``, whichever map is larger. **CSF**:
   the rest of the intracranial region (ventricles, sulci, cisterns; dark on the T1).

   With ``brain="hull"`` (the last two stages of the shipped recipe) the brain ends at the brain's own surface, as
   the brain masks of skull-stripping tools and of our held-out references do: the **brain hull** is the grey
   and white matter closed with a ``hull_closing_mm`` ball (sulci narrower than twice that are bridged) with
   holes filled (ventricles), and the intracranial CSF outside it (the subarachnoid space between the brain and
   the skull, 1 to 3 mm on the template) becomes outer CSF, a generation label that is not brain. With
   ``brain="intracranial"`` (the earlier stages) the whole intracranial region is brain.
4. To 2 mm: the one-hot class maps are averaged over 2x2x2 blocks (the 1 mm grid is padded by one voxel where
   its size is odd) and each 2 mm voxel takes the class with the largest share. The 2 mm grid is then padded
   by ``margin`` voxels of air on every side.
5. **Head**: there is none in the extracted template, so :mod:`.synth` paints one for every sample from
   ``outside_mm``, the distance (mm) of each voxel from the intracranial region: shells of random,
   spatially varying thickness for the outer CSF and meninges, the skull and the scalp (generation labels
   4, 5, 6), then, for most samples, random blobs of two more tissue classes (7, 8) reaching a random
   distance beyond the scalp (face, neck and muscles, which a real head scan shows and the template lacks),
   then air. Their intensities are drawn like the brain's, so bright scalp fat, dark bone (MR) or bright
   bone (CT) all occur.

Generation labels (what :mod:`.synth` paints intensities on): 0 air, 1 CSF, 2 grey matter, 3 white matter,
4 outer CSF / meninges, 5 skull, 6 scalp, 7 and 8 other tissue. Training targets (what the network learns): 0 background (air and
the head), 1 CSF, 2 grey matter, 3 white matter; the brain mask is 1 ∪ 2 ∪ 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

#: Generation label values.
AIR, CSF, GREY_MATTER, WHITE_MATTER = 0, 1, 2, 3
OUTER_CSF, SKULL, SCALP = 4, 5, 6
#: Other non-brain tissue beyond the scalp (face, neck, muscles, fat), painted as random blobs.
OTHER_TISSUE = (7, 8)
GENERATION_CLASSES = 9
#: Network classes: background, CSF, grey matter, white matter.
TARGET_CLASSES = 4


@dataclass
class TemplateLabels:
    """The template's generation labels on a RAS-aligned grid.

    Attributes:
        labels: uint8 array in (i, j, k) order (nibabel's), i towards R, j towards A, k towards S.
        ijk_to_ras: the grid's 4x4 matrix.
        t1: the template T1 on the same grid (0..1), for tests and previews.
        outside_mm: float32 distance (mm) from the intracranial region, 0 inside it.
    """

    labels: np.ndarray
    ijk_to_ras: np.ndarray
    t1: np.ndarray
    outside_mm: np.ndarray

    @property
    def spacing(self) -> float:
        return float(np.linalg.norm(self.ijk_to_ras[:3, 0]))


def generation_to_target(labels: np.ndarray) -> np.ndarray:
    """Maps generation labels to network targets (extra-cerebral classes become background)."""
    lookup = np.zeros(GENERATION_CLASSES, dtype=np.uint8)
    lookup[[CSF, GREY_MATTER, WHITE_MATTER]] = [CSF, GREY_MATTER, WHITE_MATTER]
    return lookup[labels]


def _ball(radius: int) -> np.ndarray:
    grid = np.mgrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
    return (grid**2).sum(axis=0) <= radius * radius


#: What the network learns as brain (module docstring, step 3).
BRAIN_DEFINITIONS = ("intracranial", "hull")


def brain_hull(tissue: np.ndarray, closing_mm: float, spacing_mm: float = 1.0) -> np.ndarray:
    """Grey and white matter closed with a ball of ``closing_mm`` and with holes filled: the brain's surface
    drawn over the sulci, the ventricles inside."""
    radius = max(1, int(round(closing_mm / spacing_mm)))
    # Padded so that the closing does not stick to the array's border.
    padded = np.pad(tissue, radius + 1)
    closed = ndimage.binary_closing(padded, structure=_ball(radius))
    inner = tuple(slice(radius + 1, radius + 1 + n) for n in tissue.shape)
    return ndimage.binary_fill_holes(closed[inner])  # a closing keeps every voxel it closes over


def derive_labels_1mm(
    t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: str = "intracranial", hull_closing_mm: float = 3.0
) -> np.ndarray:
    """Generation labels (0 outside, 1 CSF, 2 grey, 3 white matter, 4 outer CSF with ``brain="hull"``) at the
    template's resolution (module docstring)."""
    if brain not in BRAIN_DEFINITIONS:
        raise ValueError(f"brain must be one of {BRAIN_DEFINITIONS}, not {brain!r}")
    tissue = gm + wm
    extracted = ndimage.binary_opening(t1 > 0, structure=_ball(1))
    intracranial = ndimage.binary_fill_holes(extracted | (tissue >= 0.5))
    brain_tissue = intracranial & (tissue >= 0.5)
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[intracranial] = CSF
    if brain == "hull":
        labels[intracranial & ~brain_hull(brain_tissue, hull_closing_mm)] = OUTER_CSF
    labels[brain_tissue & (gm >= wm)] = GREY_MATTER
    labels[brain_tissue & (wm > gm)] = WHITE_MATTER
    return labels


def downsample_labels(labels: np.ndarray, factor: int, classes: int) -> np.ndarray:
    """Majority class of each ``factor``-cube block (a block-averaged one-hot map's argmax)."""
    padded_shape = [int(np.ceil(n / factor)) * factor for n in labels.shape]
    padded = np.zeros(padded_shape, dtype=labels.dtype)
    padded[tuple(slice(0, n) for n in labels.shape)] = labels
    blocks = [n // factor for n in padded_shape]
    shares = np.zeros((classes, *blocks), dtype=np.float32)
    for value in range(classes):
        one_hot = (padded == value).astype(np.float32)
        shares[value] = one_hot.reshape(blocks[0], factor, blocks[1], factor, blocks[2], factor).mean(axis=(1, 3, 5))
    return np.argmax(shares, axis=0).astype(np.uint8)


def _downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    padded_shape = [int(np.ceil(n / factor)) * factor for n in image.shape]
    padded = np.zeros(padded_shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in image.shape)] = image
    blocks = [n // factor for n in padded_shape]
    return padded.reshape(blocks[0], factor, blocks[1], factor, blocks[2], factor).mean(axis=(1, 3, 5))


def template_labels(
    spacing: int = 2,
    margin: int = 10,
    files: dict[str, Path] | None = None,
    brain: str = "intracranial",
    hull_closing_mm: float = 3.0,
) -> TemplateLabels:
    """The MNI152 2009 brain labels at ``spacing`` mm (an integer multiple of the template's 1 mm).

    Args:
        spacing: output voxel size in mm.
        margin: voxels of air added on every side (room for the synthetic head and for deformations).
        files: ``{"t1", "grey matter", "white matter"}`` paths; defaults to nilearn's copies.
        brain: ``"intracranial"`` or ``"hull"``, what counts as brain (module docstring, step 3).
        hull_closing_mm: closing radius of the brain hull.
    """
    import nibabel

    from DeepSegModuleLib.demo import mni152_files

    files = files or mni152_files()
    t1_image = nibabel.load(str(files["t1"]))
    t1 = np.asarray(t1_image.dataobj, dtype=np.float32) / 255.0
    gm = np.asarray(nibabel.load(str(files["grey matter"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nibabel.load(str(files["white matter"])).dataobj, dtype=np.float32) / 255.0
    affine = np.asarray(t1_image.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
        raise ValueError("expected the MNI152 template on a RAS-aligned grid")
    labels = derive_labels_1mm(t1, gm, wm, brain=brain, hull_closing_mm=hull_closing_mm)
    if spacing != 1:
        labels = downsample_labels(labels, spacing, OUTER_CSF + 1)
        t1 = _downsample_image(t1, spacing)
        # Block (0, 0, 0) covers 1 mm voxels 0..spacing-1: its centre is (spacing - 1) / 2 voxels further.
        ijk_to_ras = affine @ np.diag([spacing, spacing, spacing, 1.0])
        ijk_to_ras[:3, 3] = (affine @ np.array([(spacing - 1) / 2] * 3 + [1.0]))[:3]
    else:
        ijk_to_ras = affine.copy()
    labels = np.pad(labels, margin)
    t1 = np.pad(t1, margin)
    ijk_to_ras[:3, 3] -= ijk_to_ras[:3, :3] @ np.full(3, float(margin))
    outside_mm = ndimage.distance_transform_edt(labels == 0, sampling=float(spacing)).astype(np.float32)
    return TemplateLabels(labels, ijk_to_ras, t1.astype(np.float32), outside_mm)
