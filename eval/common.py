"""Reading sample sets back for scoring (eval.sample's output, or an image folder with metadata.jsonl)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from xla_diffusion import fsio
from xla_diffusion.errors import EvalError


def load_samples(path: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A sample set written by eval.sample (its folder or its samples.npz), or an image folder with
    metadata.jsonl (datasets' imagefolder layout, e.g. data_prep.synthetic's train/).

    Returns images uint8 (N, H, W, 3) and one record per image (`text` plus whatever else was known, e.g.
    fg/shape/bg). Images of different sizes in a folder are an error (they cannot stack)."""
    from PIL import Image

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "samples.npz")):
        path = os.path.join(path, "samples.npz")
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise EvalError(f"{path}: no such file")
        data = np.load(path, allow_pickle=False)
        if "images" not in data:
            raise EvalError(f"{path} has no 'images' array (not written by eval.sample?)")
        images = data["images"]
        records_path = os.path.join(os.path.dirname(path), "prompts.jsonl")
        if os.path.exists(records_path):
            records = fsio.read_jsonl(records_path)
        else:
            records = [{"text": str(t)} for t in data["prompts"]] if "prompts" in data else [{}] * len(images)
        return images, records
    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise EvalError(f"{path}: neither a samples.npz (or a folder holding one) nor an image folder with "
                        "metadata.jsonl")
    records = fsio.read_jsonl(meta)
    arrays = [np.asarray(Image.open(os.path.join(path, r["file_name"])).convert("RGB")) for r in records]
    if len({a.shape for a in arrays}) > 1:
        raise EvalError(f"{path}: images have different sizes; resize them first")
    return np.stack(arrays), records
