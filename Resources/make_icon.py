"""Draws Resources/Icons/DeepSegModule.png: a brain seen from the side, its lobes coloured as segments.

Run from the repository root with any Python that has numpy and Pillow: ``python Resources/make_icon.py``.
The PNG is committed; this script is kept so the icon can be redrawn instead of hand-edited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZE = 128  # Slicer's extension catalog asks for a 128x128 PNG
SCALE = 4  # draw large, then downsample, for smooth edges
BACKGROUND = (24, 44, 78)
OUTLINE = (250, 248, 240)
# Slicer-like label colours, one per segment, so the icon reads as "a segmentation".
FRONTAL = (221, 130, 101)
PARIETAL = (241, 214, 145)
OCCIPITAL = (128, 174, 128)
TEMPORAL = (111, 184, 210)
CEREBELLUM = (200, 140, 200)
BRAINSTEM = (190, 190, 200)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _sylvian_y(x: np.ndarray) -> np.ndarray:
    # The lateral fissure: rises from the temporal pole towards the back.
    return 66.0 - 0.18 * (x - 36.0)


def _central_x(y: np.ndarray) -> np.ndarray:
    # The central sulcus: leans forward from the top of the head down to the fissure, with a slight wave.
    return 64.0 - 0.25 * (y - 20.0) + 2.0 * np.sin(y / 5.0)


def draw_icon() -> Image.Image:
    big = SIZE * SCALE
    # Pixel centres in icon units (0..128), so the geometry below reads in final-icon pixels.
    y, x = (np.mgrid[0:big, 0:big] + 0.5) / SCALE

    corner = 22.0
    inner_x = np.clip(x, corner, SIZE - corner)
    inner_y = np.clip(y, corner, SIZE - corner)
    background = (x - inner_x) ** 2 + (y - inner_y) ** 2 <= corner**2

    cerebrum = (
        _ellipse(x, y, 62, 54, 50, 38)  # the dome
        | _ellipse(x, y, 30, 62, 20, 24)  # frontal pole
        | _ellipse(x, y, 62, 78, 32, 16)  # temporal lobe
        | _ellipse(x, y, 96, 64, 16, 20)  # occipital pole
    )
    cerebellum = _ellipse(x, y, 90, 94, 17, 11) & ~cerebrum
    brainstem = (np.abs(x - 74 + 0.25 * (y - 90)) <= 6) & (y >= 84) & (y <= 118) & ~cerebrum & ~cerebellum

    temporal = cerebrum & (y > _sylvian_y(x)) & (x < 84 + 0.6 * (y - 56))
    frontal = cerebrum & ~temporal & (x < _central_x(y))
    occipital = cerebrum & ~temporal & ~frontal & (x > 96 - 0.3 * (y - 30))
    parietal = cerebrum & ~temporal & ~frontal & ~occipital

    image = np.zeros((big, big, 4), dtype=np.uint8)
    image[background] = (*BACKGROUND, 255)
    for region, colour in (
        (frontal, FRONTAL),
        (parietal, PARIETAL),
        (occipital, OCCIPITAL),
        (temporal, TEMPORAL),
        (cerebellum, CEREBELLUM),
        (brainstem, BRAINSTEM),
    ):
        image[region] = (*colour, 255)

    # White outline around the whole brain and along the boundaries between segments.
    labels = np.zeros((big, big), dtype=np.uint8)
    for value, region in enumerate((frontal, parietal, occipital, temporal, cerebellum, brainstem), start=1):
        labels[region] = value
    edge = np.zeros((big, big), dtype=bool)
    width = int(1.4 * SCALE)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dx * dx + dy * dy > width * width:
                continue
            shifted = np.roll(np.roll(labels, dy, axis=0), dx, axis=1)
            edge |= shifted != labels
    image[edge & background] = (*OUTLINE, 255)

    return Image.fromarray(image, "RGBA").filter(ImageFilter.SMOOTH).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def main() -> None:
    target = Path(__file__).resolve().parent / "Icons" / "DeepSegModule.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    draw_icon().save(target, optimize=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
