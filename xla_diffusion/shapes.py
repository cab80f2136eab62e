"""The shapes domain of the offline kit: one coloured shape on a plain background, with a compositional caption.
The tiny VAE trains on it, `data_prep.synthetic` writes data sets of it and `eval.shapes_score` reads it back."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

# Saturated, mutually distant colours so a shape's colour is unambiguous even at low resolution.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 0.35, 0.70  # shape side as a fraction of the image side


def caption(fg: str, shape: str, bg: str) -> str:
    """E.g. ``caption("red", "circle", "blue") == "a red circle on a blue background"``."""
    return f"a {fg} {shape} on a {bg} background"


def draw_shape(fg: str, shape: str, bg: str, resolution: int, rng: random.Random) -> Image.Image:
    """Render one filled ``shape`` in colour ``fg`` on a solid ``bg`` as an RGB image (res x res).

    The shape's bounding box is a square of side 35-70% of the image, placed fully inside it.
    """
    if fg == bg:
        raise ValueError(f"foreground and background must differ, got {fg!r} for both")
    image = Image.new("RGB", (resolution, resolution), COLOURS[bg])
    size = max(2, round(rng.uniform(MIN_SIZE, MAX_SIZE) * resolution))
    x0, y0 = rng.randint(0, resolution - size), rng.randint(0, resolution - size)
    x1, y1 = x0 + size - 1, y0 + size - 1  # PIL bounding boxes are inclusive
    draw, colour = ImageDraw.Draw(image), COLOURS[fg]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)  # upright isosceles
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return image
