"""A sample set on disk (local or gs://): per-sample records, PNGs, a labelled grid, `samples.npz` and
`prompts.jsonl`; written by the in-loop validation and by `eval.sample`, read back by `eval.common.load_samples`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import fsio
from .grid import labelled_grid


def sample_records(prompt_records: Sequence[dict[str, Any]], opts: Any) -> list[dict[str, Any]]:
    """One record per sample, in sample order: the prompt's record plus index, prompt_index, seed."""
    k = opts.num_images_per_prompt
    return [
        {**r, "index": p * k + j, "prompt_index": p, "seed": opts.seed, "file_name": f"images/{p * k + j:05d}.png"}
        for p, r in enumerate(prompt_records)
        for j in range(k)
    ]


def write_samples(
    out_dir: str, images: np.ndarray, records: Sequence[dict[str, Any]], grid_cols: int = 8, grid_max: int = 64
) -> dict[str, str]:
    """Write images/NNNNN.png, grid.png (the first `grid_max` samples, labelled), samples.npz and
    prompts.jsonl under `out_dir` (local or gs://). Returns the paths written."""
    from PIL import Image

    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    fsio.makedirs(fsio.join(out_dir, "images"))
    for image, r in zip(images, records):
        with fsio.open_file(fsio.join(out_dir, r["file_name"]), "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
    grid = labelled_grid(list(images[:grid_max]), [r["text"] for r in records[:grid_max]], cols=grid_cols)
    with fsio.open_file(fsio.join(out_dir, "grid.png"), "wb") as f:
        grid.save(f, format="PNG")
    save_npz(
        fsio.join(out_dir, "samples.npz"), images=images, prompts=np.array([r["text"] for r in records]),
        prompt_index=np.array([r["prompt_index"] for r in records]),
    )
    with fsio.open_file(fsio.join(out_dir, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return {"grid": fsio.join(out_dir, "grid.png"), "npz": fsio.join(out_dir, "samples.npz"),
            "prompts": fsio.join(out_dir, "prompts.jsonl")}


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez to a local path or a URL (gs://...)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with fsio.open_file(path, "wb") as f:
        f.write(buf.getvalue())
