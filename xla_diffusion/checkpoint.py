"""Distributed training checkpoints (local or `gs://`): their layout, completeness and contents.

Layout of one checkpoint, `ROOT/checkpoints/step_XXXXXXXX/`:

    .metadata              torch.distributed.checkpoint's index (written by process 0 once every process's
                           shards are written): tensor names, global shapes, dtypes, where each chunk is
    __<p>_<n>.distcp       process p's shards (SPMD planner: each process writes only the shards its devices
                           hold; a tensor replicated over processes is written once, by the lowest one)
    host_state_<p>.json    process p's host state (step, lr-schedule position, RNG states, data position...)
                           and the config fingerprint
    COMPLETE               written last by process 0, after every process has finished the above: the step,
                           process count, fingerprint and the name and byte size of every file

A checkpoint without `COMPLETE`, or whose files do not match the sizes it lists, or whose `.metadata` does
not unpickle, is incomplete: `latest_complete` skips it with one warning line and takes the previous one.
Only `COMPLETE` makes a checkpoint count, so a process killed at any moment of a save leaves at worst an
incomplete directory, never one that looks complete.

Writing and restoring are `checkpointer.Checkpointer`'s; this module holds the layout, what makes a
checkpoint complete, finding the one to resume from, and what a checkpoint holds (device state, host
state, config fingerprint). It needs no device.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from . import fsio
from .errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, found or restored; the message is one line for the user."""

    exit_code = 1


class ResumeFromError(CheckpointError):
    """--resume_from_checkpoint names no usable checkpoint (bad input: exit code 2)."""

    exit_code = 2


def error_line(e: BaseException) -> str:
    """An exception as one short line; torch.distributed.checkpoint wraps each rank's error (with its
    traceback) in a CheckpointException, whose first wrapped error is the cause worth showing."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = sorted(failures.items(), key=lambda kv: kv[0])[0]
        return f"process {rank}: {error_line(inner)}"
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:400] if first else type(e).__name__


# ----------------------------------------------------------------------------------------------- layout


def checkpoints_root(output_dir: str) -> str:
    """`OUTPUT_DIR/checkpoints` (local path or URL)."""
    return fsio.join(output_dir, CHECKPOINTS_DIR)


def step_dir(output_dir: str, step: int) -> str:
    """`OUTPUT_DIR/checkpoints/step_XXXXXXXX` for global step `step` (8 digits, so names sort by step)."""
    if not 0 <= step < 10**8:
        raise ValueError(f"checkpoint step {step} does not fit 8 digits")
    return fsio.join(checkpoints_root(output_dir), f"step_{step:08d}")


def host_state_name(process_index: int) -> str:
    return f"host_state_{process_index:05d}.json"


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory found under `OUTPUT_DIR/checkpoints`."""

    path: str
    step: int


def list_checkpoints(output_dir: str) -> list[CheckpointInfo]:
    """Every `step_XXXXXXXX` directory under `OUTPUT_DIR/checkpoints`, complete or not, by ascending step.
    CheckpointError (one line) when the store cannot be listed."""
    root = checkpoints_root(output_dir)
    try:
        fs, p = fsio.url_to_fs(root)
        fs.invalidate_cache(p)  # other processes (or a previous run) wrote here since this process last listed it
        entries = fs.ls(p, detail=False) if fs.exists(p) else []
    except Exception as e:
        raise CheckpointError(f"cannot list checkpoints under {root}: {error_line(e)}") from None
    found = []
    for entry in entries:
        m = _STEP_DIR.match(os.path.basename(entry.rstrip("/")))
        if m:
            found.append(CheckpointInfo(fsio.join(root, m.group(0)), int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def file_sizes(path: str) -> dict[str, int]:
    """{file name: bytes} of the files directly in `path` (one listing call)."""
    fs, p = fsio.url_to_fs(path)
    fs.invalidate_cache(p)
    if not fs.exists(p):
        return {}
    return {
        os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
        for e in fs.ls(p, detail=True)
        if e.get("type") == "file"
    }


def read_dcp_metadata(path: str) -> Any:
    """The torch.distributed.checkpoint `Metadata` of a checkpoint directory (its pickled `.metadata`)."""
    fs, p = fsio.url_to_fs(fsio.join(path, DCP_METADATA))
    with fs.open(p, "rb") as f:
        return pickle.load(f)


def verify(path: str) -> str | None:
    """Cheap completeness check of one checkpoint directory: None when complete, else why not (one phrase).

    Complete means: the `COMPLETE` marker is there and parses; every file it lists is present with the
    byte size it lists; `.metadata` unpickles, and every chunk it points to lies inside a listed file. Costs
    one directory listing and two small reads; tensor data is not read.
    """
    try:
        sizes = file_sizes(path)
    except Exception as e:  # an unreachable store is "unreadable", not a crash of the resume logic
        return f"cannot list it ({error_line(e)})"
    if MARKER not in sizes:
        return "no COMPLETE marker (the save did not finish)"
    try:
        marker = json.loads(fsio.read_bytes(fsio.join(path, MARKER)).decode("utf-8"))
        listed = {str(k): int(v) for k, v in marker["files"].items()}
        process_count = int(marker["process_count"])
    except Exception as e:
        return f"unreadable COMPLETE marker ({error_line(e)})"
    for name, size in sorted(listed.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} is {sizes[name]} bytes, the marker says {size}"
    missing = [host_state_name(i) for i in range(process_count) if host_state_name(i) not in listed]
    if missing or DCP_METADATA not in listed:
        return f"the marker does not list {(missing or [DCP_METADATA])[0]}"
    try:
        metadata = read_dcp_metadata(path)
        extents: dict[str, int] = {}
        for info in metadata.storage_data.values():
            extents[info.relative_path] = max(extents.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:
        return f"unreadable {DCP_METADATA} ({error_line(e)})"
    for name, end in sorted(extents.items()):
        if listed.get(name, -1) < end:
            return f"{name} is shorter than the chunks {DCP_METADATA} places in it"
    return None


def latest_complete(output_dir: str) -> CheckpointInfo | None:
    """The newest complete checkpoint under `OUTPUT_DIR/checkpoints`, or None.

    Each newer directory that fails `verify` (killed mid-write, truncated or missing file) is skipped with
    one warning line.
    """
    for info in reversed(list_checkpoints(output_dir)):
        reason = verify(info.path)
        if reason is None:
            return info
        log.warning("skipping incomplete checkpoint %s: %s", info.path, reason)
    return None


def find_resume_checkpoint(output_dir: str, resume_from: str | None) -> CheckpointInfo | None:
    """Resolve `--resume_from_checkpoint`: None/"" → None; "latest" → `latest_complete` (None, with one info
    line, when there is none, as diffusers does); otherwise a checkpoint path, or a `step_XXXXXXXX` name under
    `OUTPUT_DIR/checkpoints`, that must exist and be complete (else CheckpointError)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = latest_complete(output_dir)
        if found is None:
            log.info("no complete checkpoint under %s: starting a new run", checkpoints_root(output_dir))
        return found
    path = resume_from.rstrip("/")
    try:
        if not fsio.exists(path) and _STEP_DIR.match(path):  # a bare name: look under OUTPUT_DIR/checkpoints
            path = fsio.join(checkpoints_root(output_dir), path)
        exists = fsio.exists(path)
    except Exception as e:
        raise ResumeFromError(f"--resume_from_checkpoint {resume_from}: cannot read it: {error_line(e)}") from None
    m = _STEP_DIR.match(os.path.basename(path))
    if not exists:
        raise ResumeFromError(f"--resume_from_checkpoint {resume_from}: no such checkpoint")
    if m is None:
        raise ResumeFromError(f"--resume_from_checkpoint {resume_from}: not a step_XXXXXXXX checkpoint directory")
    reason = verify(path)
    if reason is not None:
        raise ResumeFromError(f"--resume_from_checkpoint {resume_from}: incomplete checkpoint: {reason}")
    return CheckpointInfo(path, int(m.group(1)))


# ------------------------------------------------------------------------------------ state to save


def training_state(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema_shadow: Sequence[torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """The device tensors of a training state as a nested dict keyed by parameter name (the references, not
    copies, so a restore into it lands in the live tensors):

        {"module": {name: param}, "optimizer": {name: {"step": (), "exp_avg": p.shape, ...}},
         "ema": {name: shadow (p.shape)}}

    `ema_shadow` is aligned with `module.parameters()` (as `EmaWeights.shadow` is). The optimizer must have
    state for every parameter (after a step, or after `prime_optimizer` before a restore).
    """
    params = list(module.named_parameters())
    state: dict[str, dict[str, Any]] = {"module": dict(params)}
    if optimizer is not None:
        by_param = {id(p): name for name, p in params}
        opt_state: dict[str, Any] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in by_param:
                    raise ValueError("the optimizer holds a parameter that is not the module's")
                s = optimizer.state.get(p)
                if not s:
                    raise ValueError(f"no optimizer state for {by_param[id(p)]}: call prime_optimizer first")
                opt_state[by_param[id(p)]] = dict(s)
        state["optimizer"] = opt_state
    if ema_shadow is not None:
        if len(ema_shadow) != len(params):
            raise ValueError(f"{len(ema_shadow)} EMA shadows for {len(params)} parameters")
        for (name, p), s in zip(params, ema_shadow):
            if s.shape != p.shape:
                raise ValueError(f"EMA shadow of {name} has shape {tuple(s.shape)}, the parameter {tuple(p.shape)}")
        state["ema"] = {name: s for (name, _), s in zip(params, ema_shadow)}
    return state


def flat_tensors(state: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten nested dicts to dotted keys, as torch.distributed.checkpoint names them in `.metadata`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_tensors(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = v
        else:
            raise TypeError(f"checkpoint state {key} is a {type(v).__name__}; put host values in host_state")
    return out


# --------------------------------------------------------------------------------------- host state


def config_fingerprint(config: Any, fields: Iterable[str]) -> dict[str, Any]:
    """{field: value} of the config fields that must not change across a resume, JSON-normalised (tuples
    become lists) so that it compares equal to itself after a round trip through the checkpoint."""
    return json.loads(json.dumps({f: getattr(config, f) for f in fields}, default=str))


def check_fingerprint(path: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the first field (sorted) whose value differs between a checkpoint's
    fingerprint and this run's."""
    current = json.loads(json.dumps(dict(current), default=str))
    missing = object()
    for field in sorted(set(saved) | set(current)):
        a, b = saved.get(field, missing), current.get(field, missing)
        if a != b:
            was = "unset" if a is missing else f"{field}={a!r}"
            now = "unset" if b is missing else f"{field}={b!r}"
            raise CheckpointError(
                f"checkpoint {path} was written with {was} but this run has {now}; "
                f"{field} must not change when resuming (start a new --output_dir to change it)"
            )


def generator_state(generator: torch.Generator) -> str:
    """A torch.Generator's state as text for the host-state JSON (base64 of its state bytes)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(generator: torch.Generator, state: str) -> torch.Generator:
    """Restore a state made by `generator_state`; returns the generator."""
    raw = bytearray(base64.b64decode(state.encode("ascii")))
    generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
    return generator
