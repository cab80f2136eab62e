"""Checkpoint cost for the tiny pipeline's training state: save time, loop stall, restore time, on local
disk and on a GCS emulator.

The state is the trainer's: the tiny UNet's fp32 weights (xla_diffusion.tiny), AdamW moments and step
(capturable, primed: the moments are zeros, which costs the same bytes), and the EMA shadows, placed on
4 CPU devices. Per save:
  - stall: how long `Checkpointer.save` blocks the caller (device sync + copy of the state to host memory;
    here the state is already materialised, in the loop the rest of the in-flight step adds to it);
  - save: from the call until `wait()` returns, i.e. the checkpoint is durable with its COMPLETE marker;
  - restore: `Checkpointer.restore` of the newest checkpoint (verify, index read, load into the placed
    tensors, transfer), until the device tensors are ready.
Median of `--repeats` saves. The emulator is a single-threaded Python HTTP server on loopback: its numbers
bound our overhead, not GCS's bandwidth.

    .venv/bin/python bench/checkpoint.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")

SD2_UNET_PARAMS = 865_000_000
V5P64_HOSTS = 8  # v5p-64: 64 TensorCores = 32 chips, 4 chips per host


def measure(root: str, state: dict, repeats: int, asynchronous: bool, mesh: object) -> dict[str, float]:
    from xla_diffusion import checkpoint, checkpointer

    fingerprint = {"bench": 1}
    ckpt = checkpointer.Checkpointer(root, total_limit=2, asynchronous=asynchronous, mesh=mesh)
    stalls, saves = [], []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        ckpt.save(step, state, {"global_step": step}, fingerprint)
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        stalls.append(t1 - t0)
        saves.append(t2 - t0)
    latest = checkpoint.latest_complete(root)
    size = sum(checkpoint.file_sizes(latest.path).values())
    t0 = time.perf_counter()
    ckpt.restore(latest, state, fingerprint)
    restore = time.perf_counter() - t0
    ckpt.close()
    return {"stall": statistics.median(stalls), "save": statistics.median(saves), "restore": restore, "bytes": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from tests.gcs_emulator import make_bucket, start_emulator
    from xla_diffusion import checkpoint, runtime
    from xla_diffusion.ema import EmaWeights
    from xla_diffusion.optim import make_optimizer, prime_optimizer
    from xla_diffusion.tiny import build_unet

    rt = runtime.init_runtime()
    unet = build_unet().to(rt.device)
    opt = make_optimizer(unet, 1e-4, (0.9, 0.999), 1e-2, 1e-8)
    prime_optimizer(opt)
    ema = EmaWeights(list(unet.parameters()), 0.9999)
    state = checkpoint.training_state(unet, opt, ema.shadow)
    n_params = sum(p.numel() for p in unet.parameters())
    compiles = runtime.compile_count()

    work = tempfile.mkdtemp(prefix="bench_checkpoint_")
    emulator = start_emulator()
    rows = []
    try:
        remote = make_bucket("bench-ckpt")
        for where, root in (("local disk", os.path.join(work, "run")), ("GCS emulator (loopback)", remote + "/run")):
            for asynchronous in (True, False):
                r = measure(root + ("-async" if asynchronous else "-sync"), state, args.repeats, asynchronous, rt.mesh)
                rows.append((where, "async" if asynchronous else "sync", r))
                print(f"  {where} {rows[-1][1]}: {r}", file=sys.stderr, flush=True)
    finally:
        emulator.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert runtime.compile_count() == compiles, "checkpointing compiled a graph"

    print(f"command: python bench/checkpoint.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    print(f"state: tiny UNet {n_params / 1e6:.2f}M params fp32 + AdamW (exp_avg, exp_avg_sq, step) + EMA shadows, "
          f"{rows[0][2]['bytes'] / 1e6:.1f} MB per checkpoint; 4 CPU devices, 1 process; median of {args.repeats} "
          f"saves; 0 graphs compiled by saves and restores; load average during the run "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print()
    print("| storage | mode | loop stall per save (s) | save until durable (s) | restore (s) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for where, mode, r in rows:
        print(f"| {where} | {mode} | {r['stall']:.3f} | {r['save']:.3f} | {r['restore']:.3f} |")
    print()
    state_bytes = SD2_UNET_PARAMS * 4 * 4  # fp32 weights + 2 AdamW moments + EMA
    print(f"SD2 UNet on v5p-64 ({V5P64_HOSTS} hosts): {SD2_UNET_PARAMS / 1e6:.0f}M params x 4 B x 4 (weights, "
          f"2 moments, EMA) = {state_bytes / 1e9:.2f} GB per checkpoint; fully sharded over the mesh that is "
          f"{state_bytes / V5P64_HOSTS / 1e9:.2f} GB per host, {state_bytes / V5P64_HOSTS / 200e6:.0f} s at an "
          f"assumed 200 MB/s per host (one upload stream); replicated (--fsdp_size 1) process 0 writes all "
          f"{state_bytes / 1e9:.2f} GB, {state_bytes / 200e6:.0f} s at the same rate")


if __name__ == "__main__":
    main()
