"""PNG previews: three orthogonal slices through a volume with its segments drawn over it, labelled.

Slices are shown the way Slicer's default views show them (radiological convention): axial from below and
coronal from the front, both with the patient's right on the screen's left; sagittal from the patient's left,
anterior on the screen's left; anterior (axial) and superior (coronal, sagittal) up. Each view carries its
orientation letters, and the axial view a scale bar.
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


#: 12 x 4.6 inch figure at this resolution: over 1200 pixels wide after trimming, enough for a README.
PREVIEW_DPI = 130


def screen_views(
    image: np.ndarray, spacing: np.ndarray, centre: Sequence[int]
) -> dict[str, tuple[np.ndarray, tuple[float, float], tuple[str, str, str, str]]]:
    """The three slices through ``centre`` of an (R, A, S)-ordered array as they appear on the screen.

    Returns, per view: the 2D array in screen order (row 0 at the top, column 0 on the left), the pixel size
    (width, height) in mm, and the orientation letters (left, right, top, bottom) of the screen's edges.
    """
    x, y, z = (int(c) for c in centre)
    planes = {
        # plane[column axis, row axis] before turning: axial (R, A), coronal (R, S), sagittal (A, S)
        "axial": (image[:, :, z], (spacing[0], spacing[1]), ("R", "L", "A", "P")),
        "coronal": (image[:, y, :], (spacing[0], spacing[2]), ("R", "L", "S", "I")),
        "sagittal": (image[x, :, :], (spacing[1], spacing[2]), ("A", "P", "S", "I")),
    }
    # rows from top: the +second axis first (A, S); columns from the left: the -first axis first (R on the
    # left for axial and coronal, because the screen's left is the patient's right; A on the left for sagittal)
    return {name: (plane.T[::-1, ::-1], size, letters) for name, (plane, size, letters) in planes.items()}


def _save(figure, path: str | Path, title: str) -> Path:
    """Titles, writes and closes a preview figure (black background, trimmed to its content)."""
    import matplotlib.pyplot as plt

    if title:
        figure.suptitle(title, color="white")
    path = Path(path)
    figure.savefig(path, dpi=PREVIEW_DPI, facecolor="black", bbox_inches="tight")
    plt.close(figure)
    return path


def _orientation_letters(axis, shape: tuple[int, int], letters: tuple[str, str, str, str]) -> None:
    """The patient directions at the view's left, right, top and bottom edges, as Slicer's views show them."""
    rows, columns = shape
    style = {"color": "yellow", "fontsize": 13, "fontweight": "bold"}
    left, right, top, bottom = letters
    axis.text(0.01 * columns, rows / 2, left, ha="left", va="center", **style)
    axis.text(0.99 * columns, rows / 2, right, ha="right", va="center", **style)
    axis.text(columns / 2, 0.01 * rows, top, ha="center", va="top", **style)
    axis.text(columns / 2, 0.99 * rows, bottom, ha="center", va="bottom", **style)


def _scale_bar(axis, columns: int, rows: int, pixel_mm: float) -> None:
    """A bar of a round length (10, 20, 50 or 100 mm, about a fifth of the view) at the bottom left."""
    view_mm = columns * pixel_mm
    length_mm = max((n for n in (10, 20, 50, 100) if n <= view_mm / 4), default=5)
    x0, y0 = 0.05 * columns, 0.93 * rows
    axis.plot([x0, x0 + length_mm / pixel_mm], [y0, y0], color="white", linewidth=3)
    axis.text(x0, y0 - 0.02 * rows, f"{length_mm} mm", color="white", fontsize=10, va="bottom")


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

    colors = np.zeros((max([info.value for info in table] + [0]) + 1, 4))
    for info in table:
        colors[info.value] = (*info.rgb(), 0.45)
    overlay_map = ListedColormap(colors)

    figure, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    label_views = screen_views(label_image, spacing, centre) if label_image is not None else {}
    for axis, (name, (shown, (width_mm, height_mm), letters)) in zip(axes, screen_views(image, spacing, centre).items()):
        aspect = height_mm / width_mm
        axis.imshow(shown, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="bilinear")
        if name in label_views:
            axis.imshow(
                np.ma.masked_equal(label_views[name][0], 0), cmap=overlay_map, vmin=0, vmax=len(colors) - 1,
                aspect=aspect, interpolation="nearest",
            )
        _orientation_letters(axis, shown.shape, letters)
        if name == "axial":
            _scale_bar(axis, shown.shape[1], shown.shape[0], width_mm)
        axis.set_title(name, color="white")
        axis.axis("off")
    if table:
        handles = [Patch(color=info.rgb(), label=info.name) for info in table]
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")
    return _save(figure, path, title)


def write_checkerboard(
    path: str | Path, fixed: np.ndarray, registered: np.ndarray, ijk_to_ras: np.ndarray, title: str = "", squares: int = 8
) -> Path:
    """A PNG of the fixed image and the registered moving image interleaved as a 3D checkerboard.

    Where the registration is right, edges run straight across the squares' borders. Both images are scaled to
    their own 1st..99th percentiles first, so different contrasts can be compared.
    """
    composed = _checkered(fixed, registered, squares)
    return write_preview(path, composed, ijk_to_ras, title=title)


def write_registration_preview(
    path: str | Path, fixed: np.ndarray, before: np.ndarray, after: np.ndarray, ijk_to_ras: np.ndarray,
    title: str = "", squares: int = 8,
) -> Path:
    """A PNG with two rows of checkerboards of the fixed image and the moving one: before registration (the
    moving image as it lies, resampled onto the fixed grid) and after. Where the registration is right, edges
    run straight across the squares' borders in the lower row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"before": _checkered(fixed, before, squares), "after": _checkered(fixed, after, squares)}
    oriented = {name: _to_ras_axes(image, ijk_to_ras) for name, image in rows.items()}
    spacing = oriented["after"][1]
    focus = oriented["after"][0] > np.percentile(oriented["after"][0], 60)
    centre = [int(np.round(np.mean(np.nonzero(focus)[axis]))) for axis in range(3)]
    figure, axes = plt.subplots(2, 3, figsize=(12, 8.6), facecolor="black")
    for row_axes, (name, (image, _)) in zip(axes, oriented.items()):
        for axis, (view, (shown, (width_mm, height_mm), letters)) in zip(row_axes, screen_views(image, spacing,
                                                                                               centre).items()):
            axis.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, aspect=height_mm / width_mm, interpolation="bilinear")
            _orientation_letters(axis, shown.shape, letters)
            axis.set_title(f"{view}, {name}", color="white")
            axis.axis("off")
    return _save(figure, path, title)


def _checkered(fixed: np.ndarray, moving: np.ndarray, squares: int) -> np.ndarray:
    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    if fixed.shape != moving.shape:
        raise ValueError(f"a checkerboard needs two images on one grid, got {fixed.shape} and {moving.shape}")

    def scaled(image: np.ndarray) -> np.ndarray:
        low, high = np.percentile(image, [1, 99])
        return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)

    block = max(1, max(fixed.shape) // squares)
    k, j, i = np.indices(fixed.shape)
    checker = ((k // block + j // block + i // block) % 2).astype(bool)
    return np.where(checker, scaled(fixed), scaled(moving))
