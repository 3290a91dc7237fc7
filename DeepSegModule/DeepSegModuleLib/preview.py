"""PNG previews: three orthogonal slices through a volume with its segments drawn over it, labelled.

Slices are shown the way Slicer's default views show them: axial from below (patient's right on the
screen's left), coronal from the front, sagittal from the patient's left, anterior and superior up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .labels import LabelInfo, as_label_table


def _to_ras_axes(array: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permutes/flips a (k, j, i) array so its axes run along +R, +A, +S (nearest axes); returns (x, y, z) array."""
    from nibabel import orientations

    volume_ijk = np.transpose(array, (2, 1, 0))
    orientation = orientations.io_orientation(ijk_to_ras)
    reoriented = orientations.apply_orientation(volume_ijk, orientation)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)[orientation[:, 0].astype(int)]
    return reoriented, spacing


def write_preview(
    path: str | Path,
    volume: np.ndarray,
    ijk_to_ras: np.ndarray,
    labels: np.ndarray | None = None,
    label_table: Sequence[LabelInfo] | None = None,
    title: str = "",
) -> Path:
    """Writes a PNG with axial, coronal and sagittal slices through the centre of the labelled region.

    Args:
        path: the PNG file to write.
        volume: the image (k, j, i).
        ijk_to_ras: its geometry.
        labels: optional label array on the same grid, drawn as coloured, semi-transparent overlays.
        label_table: names and colours of the labels (a legend is drawn).
        title: a line of text above the slices.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image, spacing = _to_ras_axes(np.asarray(volume, dtype=np.float32), ijk_to_ras)
    label_image = _to_ras_axes(labels, ijk_to_ras)[0] if labels is not None else None
    table = as_label_table(label_table or [])

    focus = label_image > 0 if label_image is not None and label_image.any() else image > np.percentile(image, 60)
    centre = [int(np.round(np.mean(np.nonzero(focus)[axis]))) for axis in range(3)]
    low, high = np.percentile(image, [1, 99.5])

    views = [
        ("axial", lambda a: a[:, :, centre[2]], (spacing[0], spacing[1])),
        ("coronal", lambda a: a[:, centre[1], :], (spacing[0], spacing[2])),
        ("sagittal", lambda a: a[centre[0], :, :], (spacing[1], spacing[2])),
    ]
    colors = np.zeros((max([info.value for info in table] + [0]) + 1, 4))
    for info in table:
        colors[info.value] = (*info.rgb(), 0.45)
    overlay_map = ListedColormap(colors)

    figure, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    for axis, (name, take, (width_mm, height_mm)) in zip(axes, views):
        plane = take(image).T  # rows: second axis (A or S), columns: first axis (R or A)
        # Axial and coronal: patient's right on the screen's left, as in Slicer; sagittal: anterior on the right.
        flip_columns = name in ("axial", "coronal")
        shown = plane[::-1, ::-1] if flip_columns else plane[::-1, :]
        aspect = height_mm / width_mm
        axis.imshow(shown, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="bilinear")
        if label_image is not None:
            label_plane = take(label_image).T
            label_shown = label_plane[::-1, ::-1] if flip_columns else label_plane[::-1, :]
            axis.imshow(
                np.ma.masked_equal(label_shown, 0), cmap=overlay_map, vmin=0, vmax=len(colors) - 1,
                aspect=aspect, interpolation="nearest",
            )
        axis.set_title(name, color="white")
        axis.axis("off")
    if table:
        handles = [Patch(color=info.rgb(), label=info.name) for info in table]
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")
    if title:
        figure.suptitle(title, color="white")
    path = Path(path)
    figure.savefig(path, dpi=80, facecolor="black", bbox_inches="tight")
    plt.close(figure)
    return path


def write_checkerboard(
    path: str | Path, fixed: np.ndarray, registered: np.ndarray, ijk_to_ras: np.ndarray, title: str = "", squares: int = 8
) -> Path:
    """A PNG of the fixed image and the registered moving image interleaved as a 3D checkerboard.

    Where the registration is right, edges run straight across the squares' borders. Both images are scaled to
    their own 1st..99th percentiles first, so different contrasts can be compared.
    """
    fixed = np.asarray(fixed, dtype=np.float32)
    registered = np.asarray(registered, dtype=np.float32)
    if fixed.shape != registered.shape:
        raise ValueError(f"checkerboard needs two images on one grid, got {fixed.shape} and {registered.shape}")

    def scaled(image: np.ndarray) -> np.ndarray:
        low, high = np.percentile(image, [1, 99])
        return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)

    block = max(1, max(fixed.shape) // squares)
    k, j, i = np.indices(fixed.shape)
    checker = ((k // block + j // block + i // block) % 2).astype(bool)
    composed = np.where(checker, scaled(fixed), scaled(registered))
    return write_preview(path, composed, ijk_to_ras, title=title)
