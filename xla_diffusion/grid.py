"""Labelled image grids for looking at samples."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """(H, W, 3) float in [0, 1] or uint8 → PIL RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def labelled_grid(
    images: Sequence[np.ndarray | Image.Image], labels: Sequence[str], cols: int = 4, cell: int = 128,
    label_height: int = 36,
) -> Image.Image:
    """Images (each resized to `cell` px) in a grid, each with its label wrapped underneath."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_height)
        grid.paste(to_pil(img).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(label, width=max(8, cell // 6))[:3]):
            draw.text((x + 2, y + cell + 1 + 11 * j), line, fill="black", font=font)
    return grid
