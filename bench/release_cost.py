"""What dropping a replayed step's outputs costs the host, and what it does to the next host-to-device copy.

Each replayed step (`replay.StepReplay`) gets one new device tensor per state tensor from the compiled graph
and drops those of the step two back (`HELD_STEPS`): ~1,040 tensors per step for the tiny UNet, ~3,430 for
SD2-base's structure (5 per parameter tensor with AdamW and the EMA). This bench times, on a `--devices` CPU
mesh, main-thread CPU per round for:

- release: dropping the last references to `n` replicated device tensors (64 floats each, already
  materialised and idle);
- copy after release: the next step's lr copy (one 0-d host-to-device transfer, what
  `TrainState.begin_step` does twice) right after such a release;
- copy alone: the same copy with nothing released before it.

    .venv/bin/python bench/release_cost.py [--tensors 1040 3430] [--rounds 20] [--devices 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, command_line, cpu_env  # noqa: E402


def worker(tensors: list[int], rounds: int) -> dict:
    import torch

    from xla_diffusion import runtime

    device = runtime.init_runtime().device
    [lr] = runtime.to_device([torch.tensor(0.5)], device)

    def copy() -> float:
        c0 = time.thread_time()
        lr.data = runtime.to_device([torch.tensor(0.1)], device)[0]
        return time.thread_time() - c0

    rows = {}
    for n in tensors:
        host = [torch.zeros(64) for _ in range(n)]
        release = after = alone = 0.0
        for i in range(rounds + 2):  # 2 untimed rounds first
            live = runtime.to_device(host, device)
            runtime.wait_device_ops()
            c0 = time.thread_time()
            del live
            r = time.thread_time() - c0
            a = copy()
            runtime.wait_device_ops()
            b = copy()
            if i >= 2:
                release, after, alone = release + r, after + a, alone + b
        rows[n] = {"release_ms": 1e3 * release / rounds, "after_ms": 1e3 * after / rounds,
                   "alone_ms": 1e3 * alone / rounds}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, nargs="+", default=[1040, 3430])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.tensors, args.rounds)))
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + sys.argv[1:]
    r = subprocess.run(cmd, env=cpu_env(args.devices), cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    print(command_line())
    print(f"{args.devices} CPU devices, replicated 64-float tensors, {args.rounds} rounds; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print()
    print("| device tensors dropped | release (ms CPU) | per tensor (µs) | copy right after (ms CPU) "
          "| copy alone (ms CPU) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, row in rows.items():
        print(f"| {n} | {row['release_ms']:.2f} | {1e3 * row['release_ms'] / int(n):.1f} | {row['after_ms']:.3f} "
              f"| {row['alone_ms']:.3f} |")


if __name__ == "__main__":
    main()
