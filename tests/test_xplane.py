"""xplane.op_times: device time per XLA op kind from a profile capture. On a capture built here (exact sums, a
window that cut a step, the executor's and thread pool's own events left out) and on a real one: the trainer's
`runtime.Profiler` capturing a small step on the 4-device CPU mesh in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import with_xla_flags
from xla_diffusion import xplane

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _space(lines: dict[str, list[tuple[str, int]]]) -> bytes:
    """A one-plane XSpace: per line name, its events as (name, duration in µs), back to back."""
    space = xplane.XSpace()
    plane = space.planes.add(name="/host:CPU")
    ids: dict[str, int] = {}
    for line_name, events in lines.items():
        line = plane.lines.add(name=line_name)
        t = 0
        for name, us in events:
            if name not in ids:
                ids[name] = len(ids) + 1
                plane.event_metadata[ids[name]].id = ids[name]
                plane.event_metadata[ids[name]].name = name
            line.events.add(metadata_id=ids[name], offset_ps=t, duration_ps=us * 1_000_000)
            t += us * 1_000_000
    return space.SerializeToString()


def test_op_times_sums_each_instruction_per_run_and_kind(tmp_path):
    ops = [("call.7", 300), ("convolution.12.clone", 300), ("convolution.13", 100), ("all-reduce.1", 40),
           ("copy_bitcast_fusion.4", 10), ("add_fusion.9", 5)]
    step = [("ThunkExecutor::Execute", 999), ("Wait: pending_threads=1/4", 50), ("Rendezvous", 35)]
    for name, us in ops:  # each instruction's event, then its end marker
        step += [(name, us), ("end: " + name, 0)]
    # device 0's window holds two whole steps; device 1's was cut after its first step's convolutions
    lines = {"tf_XLAEigen/1": step + step, "tf_XLAPjRtCpuClient/2": step[:9],
             "python": [("convolution.12.clone", 10_000)]}  # not an XLA thread
    path = tmp_path / "host.xplane.pb"
    path.write_bytes(_space(lines))
    t = xplane.op_times(str(path))
    assert t.seconds == pytest.approx({"convolution": 400e-6, "all-reduce": 40e-6, "copy_bitcast_fusion": 10e-6,
                                       "add_fusion": 5e-6})
    assert t.runs == 2  # three instructions ran twice, the two convolutions three times


def test_op_kind_and_captures_without_op_events(tmp_path):
    assert xplane.op_kind("convolution.222.clone") == "convolution"
    assert xplane.op_kind("copy_bitcast_fusion.17") == "copy_bitcast_fusion"
    assert xplane.op_kind("divide_add_fusion.clone") == "divide_add_fusion"
    assert xplane.op_kind("all-reduce") == "all-reduce"
    (tmp_path / "plugins" / "profile" / "t").mkdir(parents=True)
    path = tmp_path / "plugins" / "profile" / "t" / "host.xplane.pb"
    path.write_bytes(_space({"python": [("cpu_loader.next", 5)]}))
    assert xplane.latest_capture(str(tmp_path)) == str(path)
    with pytest.raises(ValueError, match="xla_cpu_enable_xprof_traceme"):
        xplane.op_times(str(path))
    with pytest.raises(FileNotFoundError):
        xplane.latest_capture(str(tmp_path / "plugins" / "none"))
    path.write_bytes(b"\xff" * 64)  # a truncated or foreign file: one error naming it
    with pytest.raises(ValueError, match="not a profile capture"):
        xplane.op_times(str(path))


@pytest.mark.slow
def test_the_trainers_profiler_capture_reads_as_op_times(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": with_xla_flags("--xla_cpu_enable_xprof_traceme=true")}
    proc = subprocess.run([sys.executable, "-m", "tests.profile_worker", str(tmp_path / "profile")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    seconds = result["seconds"]
    # the step's matmul and its all-reduce over the mesh are there, timed; the executor's own events are not
    assert any("dot" in k for k in seconds), seconds
    assert seconds.get("all-reduce", 0) > 0, seconds
    assert all(v > 0 for v in seconds.values())
    assert not any(k.startswith(("ThunkExecutor", "Wait", "Rendezvous", "call", "end: ")) for k in seconds)
    # every instruction ran once per device and step in the window: 4 devices, at least one whole step
    assert result["runs"] >= 4 and result["runs"] % 4 == 0, result
