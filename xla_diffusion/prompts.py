"""Prompt lists for sampling: `--prompt "a; b"` or a prompt file (plain lines or JSON lines with "text")."""

from __future__ import annotations

import json
from typing import Any

from . import fsio
from .errors import EvalError


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
            with fsio.open_file(prompt_file, "r") as f:
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
