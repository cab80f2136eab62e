"""What a compiled XLA module does, read from the text XLA dumps: its collectives (count and bytes per kind)
and its per-device memory (buffer assignment). Pure text parsing, no device: the benches and tests that
check sharding (`bench/mesh.py`, `bench/memory.py`, `tests/test_fsdp_sharding.py`) run the step in a
process started with `hlo_dump_flags(dir)` in its XLA_FLAGS, then read `read_hlo_dump(dir)`.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = <shape> <opcode>(<operands>)...` in XLA's text HLO; the shape is an array or a tuple.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape's arrays (e.g. "f32[4,320]{1,0}" or a tuple of arrays)."""
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _ARRAY.findall(shape))


@dataclass
class CollectiveStats:
    """One collective kind in an HLO module: how many ops, and their per-device operand and result bytes."""

    count: int = 0
    operand_bytes: int = 0
    result_bytes: int = 0


def count_collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    """Count the collectives of a compiled (SPMD-partitioned, "after optimizations") HLO module's text.

    Returns {kind: CollectiveStats} for kind in COLLECTIVES (all present, zeros when absent). Shapes in
    partitioned HLO are per device, so bytes are what one device sends in (operands) and gets back
    (results): an all-gather's result is the gathered tensor, a reduce-scatter's operand the full one.
    Async pairs count once, at their `-start` (an all-gather-start's tuple holds operand and result: its
    result bytes are the second half). Ops are counted where they appear in the text: one inside a while
    body runs once per iteration but counts once.
    """
    shapes: dict[str, str] = {}
    stats = {kind: CollectiveStats() for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = shape
        kind = opcode.removesuffix("-start")
        if kind not in stats or opcode.endswith("-done"):
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        result = shape
        if opcode in ("all-gather-start", "collective-permute-start"):
            arrays = _ARRAY.findall(shape)
            result = " ".join(f"{dt}[{dims}]" for dt, dims in arrays[len(arrays) // 2:])
        s = stats[kind]
        s.count += 1
        s.result_bytes += shape_bytes(result)
        s.operand_bytes += sum(shape_bytes(shapes.get(o, "")) for o in operands)
    return stats


def buffer_assignment_bytes(text: str) -> dict[str, int]:
    """Per-device bytes of a compiled module from XLA's `*buffer-assignment.txt` dump.

    Returns {"total": "Total bytes used" (every allocation: parameters, outputs, temporaries),
    "parameter": the entry parameters' allocations (the inputs: weights, optimizer state, batch),
    "temp": allocations that are neither parameters, outputs, live-out values nor constants (the
    activations and scratch the step needs on top of its inputs and outputs)}.
    """
    total = re.search(r"Total bytes used:\s*(\d+)", text)
    out = {"total": int(total.group(1)) if total else 0, "parameter": 0, "temp": 0}
    for m in re.finditer(r"^allocation \d+: size (\d+), ?(.*)$", text, re.MULTILINE):
        size, tags = int(m.group(1)), m.group(2)
        if "parameter" in tags:
            out["parameter"] += size
        elif not any(t in tags for t in ("output shape", "maybe-live-out", "constant")):
            out["temp"] += size
    return out


def hlo_dump_flags(dump_dir: str) -> str:
    """XLA_FLAGS value that makes XLA write every compiled module's optimized HLO and buffer assignment as
    text under `dump_dir`. XLA reads it once, when the runtime starts: set it in the environment of a new
    process."""
    return f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text"


@dataclass(frozen=True)
class DumpedModule:
    name: str  # e.g. "module_0003.SyncTensorsGraph.1234"
    hlo_text: str  # optimized (partitioned) HLO
    buffer_assignment: str


def read_hlo_dump(dump_dir: str) -> list[DumpedModule]:
    """The compiled modules XLA dumped under `dump_dir` (see hlo_dump_flags), in compilation order."""
    modules = []
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        stem = path[: -len(".txt")]
        name = os.path.basename(stem).rsplit(".", 1)[0]
        buffers = stem + "-buffer-assignment.txt"
        with open(path, encoding="utf-8") as f:
            hlo = f.read()
        assignment = ""
        if os.path.exists(buffers):
            with open(buffers, encoding="utf-8") as f:
                assignment = f.read()
        modules.append(DumpedModule(name, hlo, assignment))
    return modules


_ALIAS = re.compile(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)")


def input_output_aliases(hlo_text: str) -> dict[int, int]:
    """A compiled module's input/output aliasing, from its header: output index (of the entry's result tuple)
    -> number of the parameter whose buffer that output reuses."""
    header = hlo_text.split("\n", 1)[0]
    return {int(out): int(param) for out, param in _ALIAS.findall(header)}


def _entry(hlo_text: str) -> str:
    """The entry computation of a module's text (from its `ENTRY` line to the end)."""
    return hlo_text[hlo_text.index("\nENTRY "):]


def entry_copy_bytes(hlo_text: str) -> int:
    """Bytes written by the `copy` instructions of a compiled module's entry computation (per device): among
    them, the copies XLA adds when a donated input's buffer goes to an output not computed from it."""
    total = 0
    for line in _entry(hlo_text).splitlines()[1:]:
        m = _INSTRUCTION.match(line)
        if m and m.group(3) == "copy":
            total += shape_bytes(m.group(2))
    return total


_PARAMETER = re.compile(r"^\s*%\S+ = (.+?) parameter\((\d+)\)")


def donated_bytes(hlo_text: str) -> int:
    """Per-device bytes of a compiled module's entry parameters whose buffers an output reuses."""
    aliased = set(input_output_aliases(hlo_text).values())
    sizes = {int(m.group(2)): shape_bytes(m.group(1)) for m in map(_PARAMETER.match, _entry(hlo_text).splitlines())
             if m}
    return sum(sizes[n] for n in aliased)


def step_module(dump_dir: str) -> DumpedModule:
    """The training step among the modules dumped under `dump_dir`: the one with the most aliased outputs (the
    step updates its state in place; the other graphs of a run alias little or nothing)."""
    return max(read_hlo_dump(dump_dir), key=lambda m: len(input_output_aliases(m.hlo_text)))
