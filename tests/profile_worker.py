"""Run in a fresh process with XLA's per-instruction trace events on (XLA reads its flags at start-up): capture a
device profile with the trainer's `runtime.Profiler` while a small step runs on the 4-device mesh, then print as
JSON what `xplane.op_times` reads from the capture.

    python -m tests.profile_worker PROFILE_DIR
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch

from xla_diffusion import runtime, xplane

STEPS = 40
START = 3


def main() -> None:
    profile_dir = sys.argv[1]
    rt = runtime.init_runtime()
    x = runtime.to_mesh(torch.randn(16, 64), rt.mesh)  # batch-sharded over the mesh
    [w] = runtime.to_device([torch.randn(64, 64)], rt.device)
    profiler = runtime.Profiler(profile_dir, START, duration_ms=1500)
    deadline = time.monotonic() + 60
    found = None
    step = 0
    while found is None and time.monotonic() < deadline:
        step += 1
        profiler.maybe_start(step)
        # the step: a matmul over the sharded batch, its mean over the mesh (an all-reduce), an update
        w = w - 0.01 * torch.tanh(x @ w).mean(dim=0, keepdim=True)
        runtime.sync()
        runtime.wait_device_ops()
        time.sleep(0.02)  # the capture starts in the background: keep stepping until it is written
        if step > STEPS:
            with contextlib.suppress(FileNotFoundError):
                found = xplane.latest_capture(profile_dir)
    if found is None:
        raise SystemExit(f"no capture under {profile_dir} after {step} steps")
    size = -1
    while size != os.path.getsize(found):  # the profiler's thread may still be writing it
        size = os.path.getsize(found)
        time.sleep(0.5)
    times = xplane.op_times(found)
    print(json.dumps({"seconds": times.seconds, "runs": times.runs, "steps": step}))


if __name__ == "__main__":
    main()
