"""What the eval CLIs share: one-line errors, prompt files, reading sample sets back, per-sample seeding."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any

import numpy as np
import torch


class EvalError(ValueError):
    """Bad input to an eval tool; the message is shown to the user as one `error:` line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def run_cli(main_fn: Any, argv: list[str] | None) -> int:
    """Call `main_fn(argv)`; an EvalError (or one of the library's one-line errors) becomes one `error:`
    line and exit code 2, never a traceback."""
    from xla_diffusion.config import ConfigError
    from xla_diffusion.models import ModelLoadError

    try:
        main_fn(argv)
    except (EvalError, ConfigError, ModelLoadError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


def _open(path: str, mode: str) -> Any:
    import fsspec

    return fsspec.open(path, mode, encoding="utf-8" if "b" not in mode else None)


def load_prompt_records(prompt: str | None = None, prompt_file: str | None = None) -> list[dict[str, Any]]:
    """Prompts as records `{"text": ..., **extra}`: from `prompt` ("a; b; c") or from `prompt_file`, either
    one prompt per line or JSON lines with a "text" field (other fields, e.g. the shapes domain's
    fg/shape/bg, are kept and carried to the outputs). Raises EvalError when there are none."""
    if (prompt is None) == (prompt_file is None):
        raise EvalError("pass exactly one of --prompt and --prompt_file")
    records: list[dict[str, Any]] = []
    if prompt is not None:
        records = [{"text": p.strip()} for p in prompt.split(";") if p.strip()]
        where = "--prompt"
    else:
        where = f"--prompt_file {prompt_file}"
        try:
            with _open(prompt_file, "r") as f:
                lines = [line.strip() for line in f if line.strip()]
        except (FileNotFoundError, IsADirectoryError):
            raise EvalError(f"{where}: no such file") from None
        for n, line in enumerate(lines, 1):
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{where}: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(row.get("text"), str):
                    raise EvalError(f"{where}: line {n} has no string field \"text\"")
                records.append(row)
            else:
                records.append({"text": line})
    if not records:
        raise EvalError(f"{where}: no prompts")
    return records


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez to a local path or any fsspec URL (gs://...)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with _open(path, "wb") as f:
        f.write(buf.getvalue())


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
            with open(records_path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        else:
            records = [{"text": str(t)} for t in data["prompts"]] if "prompts" in data else [{}] * len(images)
        return images, records
    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise EvalError(f"{path}: neither a samples.npz (or a folder holding one) nor an image folder with "
                        "metadata.jsonl")
    with open(meta, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    arrays = [np.asarray(Image.open(os.path.join(path, r["file_name"])).convert("RGB")) for r in records]
    if len({a.shape for a in arrays}) > 1:
        raise EvalError(f"{path}: images have different sizes; resize them first")
    return np.stack(arrays), records


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index`: its initial noise and any noise a stochastic scheduler adds
    come from it alone. SeedSequence mixes (seed, index) so nearby pairs give unrelated streams."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))
