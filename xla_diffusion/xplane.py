"""Device time per XLA op kind, read from a profile the trainer captured (PROFILE_DIR, `*.xplane.pb`), without
TensorBoard or its profile plugin.

A capture is an XSpace protobuf (tsl/profiler/protobuf/xplane.proto): planes, each with lines (one per thread) of
timed events whose names live in the plane's event metadata. The message classes are built here at run time from
the few fields read, so only `protobuf` is needed. On the CPU backend, with `--xla_cpu_enable_xprof_traceme=true`
in XLA_FLAGS, XLA records one event per HLO instruction run, named after the instruction
(`convolution.222.clone`) and followed by a marker event (`end: convolution.222.clone`): on XLA's worker threads
(`tf_XLAEigen/...`) for the large step graph, on each device's client thread (`tf_XLAPjRtCpuClient/...`) for
small graphs. `op_times` sums them per kind (`convolution`). On a TPU it takes every event of the device planes'
op lines ("XLA Ops"); that path is untested here.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

END = "end: "  # XLA's CPU runtime closes each instruction's event with one named END + the instruction
# an instruction with an end marker that is only a wrapper: XLA's CPU backend calls ops it prepared for parallel
# tasks through a `call`, and the op inside is timed itself
WRAPPER = re.compile(r"^call(\.\d+)?$")
CPU_OP_LINES = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")  # XLA's worker threads and each device's client thread
TPU_OP_LINE = "XLA Ops"


def _xspace_class() -> type:
    """The XSpace message class, with only the fields read here (protobuf skips the others when parsing)."""
    f = descriptor_pb2.FileDescriptorProto(name="xla_diffusion_xplane.proto", package="xla_diffusion.xplane",
                                           syntax="proto3")
    i64, string = descriptor_pb2.FieldDescriptorProto.TYPE_INT64, descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    msg = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    one, many = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> descriptor_pb2.DescriptorProto:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            m.field.add(name=fname, number=number, type=ftype, label=label, type_name=type_name or None)
        return m

    p = ".xla_diffusion.xplane."
    message("XEvent", [("metadata_id", 1, i64, one, ""), ("offset_ps", 2, i64, one, ""),
                       ("duration_ps", 3, i64, one, "")])
    message("XLine", [("name", 2, string, one, ""), ("events", 4, msg, many, p + "XEvent")])
    message("XEventMetadata", [("id", 1, i64, one, ""), ("name", 2, string, one, "")])
    plane = message("XPlane", [("name", 2, string, one, ""), ("lines", 3, msg, many, p + "XLine"),
                               ("event_metadata", 4, msg, many, p + "XPlane.EventMetadataEntry")])
    entry = plane.nested_type.add(name="EventMetadataEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=i64, label=one)
    entry.field.add(name="value", number=2, type=msg, label=one, type_name=p + "XEventMetadata")
    message("XSpace", [("planes", 1, msg, many, p + "XPlane")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("xla_diffusion.xplane.XSpace"))


XSpace = _xspace_class()


def latest_capture(profile_dir: str) -> str:
    """The newest `*.xplane.pb` under `profile_dir` (torch_xla writes plugins/profile/<time>/<host>.xplane.pb)."""
    found = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no *.xplane.pb under {profile_dir}")
    return max(found, key=os.path.getmtime)


def op_kind(name: str) -> str:
    """`convolution.222.clone` -> `convolution`, `copy_bitcast_fusion.17` -> `copy_bitcast_fusion`."""
    return re.sub(r"(\.\d+)?(\.clone)?$", "", name)


@dataclass(frozen=True)
class OpTimes:
    """Per HLO op kind, the seconds one device spends on it in one step: the sum over the kind's instructions of
    each one's mean time per run."""

    seconds: dict[str, float]
    runs: int  # the most common run count of an instruction in the capture (devices x steps captured)


def op_times(path: str) -> OpTimes:
    """Sum the op events of a capture by kind, each instruction's time divided by how many times it ran.

    A capture window cuts steps at its ends: an instruction late in the step may have run once less per device
    than an early one. Each instruction runs once per device and step (XLA's CPU backend runs a device's program
    on one thread here; a TPU runs each instruction once), so its total over its run count is its time per step.
    Op durations are wall time on their thread: where the devices share cores they include waiting for one."""
    space = XSpace()
    with open(path, "rb") as f:
        try:
            space.ParseFromString(f.read())
        except DecodeError as e:
            raise ValueError(f"{path}: not a profile capture (XSpace protobuf): {e}") from None
    total: dict[str, int] = collections.Counter()
    runs: dict[str, int] = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        # the instructions: names with an end marker (the executor, thread pool, waits and rendezvous have none)
        ops = {n.removeprefix(END) for n in names.values() if n.startswith(END)}
        ops = {n for n in ops if not WRAPPER.match(n)}
        for line in plane.lines:
            every = line.name == TPU_OP_LINE
            if not (every or line.name.startswith(CPU_OP_LINES)):
                continue
            for e in line.events:
                name = names.get(e.metadata_id, "")
                if not (every or name in ops):
                    continue
                total[name] += e.duration_ps
                runs[name] += 1
    if not runs:
        raise ValueError(f"{path}: no XLA op events (on CPU, set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true)")
    seconds: dict[str, float] = collections.Counter()
    for name, ps in total.items():
        seconds[op_kind(name)] += ps * 1e-12 / runs[name]
    return OpTimes(dict(seconds), collections.Counter(runs.values()).most_common(1)[0][0])
