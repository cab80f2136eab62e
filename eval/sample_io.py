"""What eval.sample reads and writes around its generation loop: the scheduler table (names → diffusers
schedulers built from the pipeline's config) and a sample set's per-sample records and files on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from eval.common import EvalError, save_npz

if TYPE_CHECKING:
    from eval.sample import SampleOptions

# name → (diffusers class, extra config); each is built from the pipeline's own scheduler config so the
# training schedule (betas, prediction type, offsets) carries over.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh diffusers scheduler `name` (see SCHEDULERS) built from a scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise EvalError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


def sample_records(prompt_records: Sequence[dict[str, Any]], opts: SampleOptions) -> list[dict[str, Any]]:
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
    import fsspec
    from PIL import Image

    from eval.grid import labelled_grid

    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(f"{root}/images", exist_ok=True)
    join = (lambda *p: os.path.join(out_dir, *p)) if "://" not in out_dir else (lambda *p: "/".join((out_dir, *p)))
    for image, r in zip(images, records):
        with fsspec.open(join(r["file_name"]), "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
    grid = labelled_grid(list(images[:grid_max]), [r["text"] for r in records[:grid_max]], cols=grid_cols)
    with fsspec.open(join("grid.png"), "wb") as f:
        grid.save(f, format="PNG")
    save_npz(
        join("samples.npz"), images=images, prompts=np.array([r["text"] for r in records]),
        prompt_index=np.array([r["prompt_index"] for r in records]),
    )
    with fsspec.open(join("prompts.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return {"grid": join("grid.png"), "npz": join("samples.npz"), "prompts": join("prompts.jsonl")}
