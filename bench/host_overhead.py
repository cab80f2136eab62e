"""Host time per training step outside device execution, on the latent path, split by what the host does.

Runs the trainer's own `train()` (latent shards, bf16, `--use_ema`, logging every `--logging_steps`) in a
worker process on a `--devices` CPU mesh, with timers wrapped around the loop's parts:

- loader wait: `next()` on the device loader (MpDeviceLoader: host batches and their transfer come from
  background threads; this is how long the loop waits for them);
- lr/EMA copies: `TrainState.begin_step` (the device lr filled from the host when it changes; since stop 27 the
  step computes the EMA decay from AdamW's step count, so no decay is sent);
- state list: `TrainState.step_tensors` (the list of the step's state tensors, kept between steps);
- trace or replay: the step call (`replay.StepReplay`): in trace mode lazy tensors record the whole step's
  graph (the Python `train_step`); in replay mode (`--step_graph replay`) the recorded graph is
  handed the new batch and launched, and the state is pointed at its outputs;
- graph cut + dispatch: `runtime.sync()`, which hashes the recorded graph, finds it compiled and launches it;
- closures: the step closure (metrics to the tracker and progress bar) on logging steps;
- monitor: `StepMonitor.after_step` (progress bar, compile count);
- other: the rest of the loop's wall time (its Python, the profiler and evaluation checks); its main-thread CPU
  is the timed window's less the phases'.

A last table gives Python's garbage collections in the timed steps (`gc.callbacks`): their main-thread CPU
falls inside the phases above, wherever a collection happens to start.

Device time is taken out by measurement, not by assumption: after each graph launch (a replayed step's inside
the step call, a traced step's at the graph cut) the worker waits for the devices (`wait_device_ops`, and inside the
closure wrapper before the closure reads its tensors) and counts that wait as device time, so host and device
never overlap and every host phase runs with idle devices. On a TPU the host's work for step n+1 overlaps step
n's execution; here it is measured on its own. Host time = wall time - device wait. torch_xla's
ExecuteReplicatedTime metric is printed beside the measured wait.

The mode `replay-flat` (`--step_graph replay_flat`) keeps the replicated state (weights, AdamW moments, EMA
shadows) in a few flat buffers while replaying (`flat_state.StateLayout`), where the default hands the replayed
graph every state tensor as an input of its own and points each at an output. The mode `replay-loader-cut`
adds back the graph cut torch_xla's MpDeviceLoader made before handing out each batch (its default), which
the trainer's loader no longer makes. The mode `replay-cut-every-step` adds back the loop's graph cut after
every replayed step; the loop now cuts only after a traced step, evaluation or a checkpoint
(`StepReplay.cut_needed`), and runs a replayed logging step's closure without a cut (since stop 27). The mode
`replay-torch-adamw` puts back torch's AdamW, whose step count per parameter is one more state tensor per
parameter tensor than `optim.SharedStepAdamW`'s one per param group.

    .venv/bin/python bench/host_overhead.py [--steps 60] [--warmup 10] [--batch 16] [--unets tiny sd2-base/8]
        [--modes trace replay replay-flat replay-loader-cut replay-cut-every-step
         replay-torch-adamw] [--profile N]

`--profile N` runs cProfile over the timed steps' main thread and prints the N functions with the most own time
to stderr. Its timings include the profiler's own cost and the bench's device waits (`_xla_wait_device_ops`);
read them as shares, not as the table's host times. The profiler's cost lands in that run's table too: take host
times from a run without `--profile`.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, command_line, cpu_env, prepare  # noqa: E402

PHASES = ("loader wait", "lr/EMA copies", "state list", "trace or replay", "graph cut + dispatch", "closures",
          "monitor", "other")
MODES = {"trace": "traced every step", "replay": "replayed, per tensor (the default until stop 29)",
         "replay-flat": "replayed, flat state (--step_graph replay_flat, the default since stop 29)",
         "replay-loader-cut": "replayed, loader cutting the graph before each batch (until stop 21)",
         "replay-cut-every-step": "replayed, graph cut after every step (until stop 22)",
         "replay-torch-adamw": "replayed, torch's AdamW: a step count per parameter (until stop 24)"}
UNETS = {"tiny": "tiny (test kit: 2 levels, 1 attention level)",
         "sd2-base/8": "SD2-base structure, widths / 8"}


def narrow_unet_pipeline(pipeline: str, out: str) -> str:
    """A copy of the tiny pipeline whose UNet has SD2-base's structure with widths / 8 (bench/first_step.py),
    taking the tiny text encoder's states (cross-attention width 32)."""
    from diffusers import UNet2DConditionModel

    from bench.first_step import narrow_sd2_base_config

    shutil.copytree(pipeline, out)
    config = {**narrow_sd2_base_config(8), "cross_attention_dim": 32}
    shutil.rmtree(os.path.join(out, "unet"))
    UNet2DConditionModel(**config).save_pretrained(os.path.join(out, "unet"))
    return out


class Timers:
    """Wall seconds and main-thread CPU seconds per phase, summed over the timed steps (from `start_step` on)."""

    def __init__(self, start_step: int):
        self.start_step, self.step = start_step, 0
        self.stopped = False  # after the last timed step: the export's work is not the loop's
        self.total: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.device = self.device_cpu = 0.0

    @property
    def on(self) -> bool:
        return self.step >= self.start_step and not self.stopped

    def wrap(self, phase: str, fn):
        """`fn` timed as `phase`, less the device waits inside it."""
        def timed(*a, **kw):
            t0, c0, d0, dc0 = time.perf_counter(), time.thread_time(), self.device, self.device_cpu
            try:
                return fn(*a, **kw)
            finally:
                if self.on:
                    self.total[phase] += time.perf_counter() - t0 - (self.device - d0)
                    self.cpu[phase] += time.thread_time() - c0 - (self.device_cpu - dc0)
        return timed


def worker(args: argparse.Namespace) -> dict:
    from xla_diffusion import runtime, state, trainer
    from xla_diffusion.config import parse_args
    from xla_diffusion.monitor import StepMonitor
    from xla_diffusion.replay import StepReplay
    from xla_diffusion.state import TrainState

    timers = Timers(args.warmup + 1)
    device_wait = runtime.wait_device_ops
    gc_cpu = {"total": 0.0, "collections": 0}

    def gc_timer(phase: str, info: dict) -> None:
        # Python's garbage collections in the timed steps, wherever they fall (inside the phases or not)
        if phase == "start":
            gc_cpu["t0"] = time.thread_time()
        elif timers.on and "t0" in gc_cpu:
            gc_cpu["total"] += time.thread_time() - gc_cpu["t0"]
            gc_cpu["collections"] += 1

    gc.callbacks.append(gc_timer)

    def wait_for_device() -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        device_wait()
        if timers.on:
            timers.device += time.perf_counter() - t0
            timers.device_cpu += time.thread_time() - c0

    class TimedLoader:
        def __init__(self, loader):
            self.it = iter(loader)

        def __iter__(self):
            return self

        def __next__(self):
            timers.step += 1  # the loop asks for step n's batch first
            if timers.step == timers.start_step:
                timers.exec0 = runtime.metric_seconds("ExecuteReplicatedTime")
                timers.cpu0 = time.thread_time()
                if profile is not None:
                    profile.enable()
            return timers.wrap("loader wait", self.next_batch)()

        def next_batch(self):
            if args.mode == "replay-loader-cut":
                sync()  # what MpDeviceLoader did before each batch with its default batches_per_execution=1
            return next(self.it)

    loader, sync, closure = runtime.device_loader, runtime.sync, runtime.add_step_closure
    runtime.device_loader = lambda *a, **kw: TimedLoader(loader(*a, **kw))

    def timed_closure(fn, args=()):
        def run(*a):
            wait_for_device()  # the closure's tensors are ready once the devices are done: device time
            timers.wrap("closures", fn)(*a)
        closure(run, args)

    def sync_then_wait() -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        inner0 = timers.total["closures"] + timers.device, timers.cpu["closures"] + timers.device_cpu
        sync()
        if timers.on:  # closures run inside sync(): their time and the device wait in them are not the cut's
            inner = timers.total["closures"] + timers.device, timers.cpu["closures"] + timers.device_cpu
            timers.total["graph cut + dispatch"] += time.perf_counter() - t0 - (inner[0] - inner0[0])
            timers.cpu["graph cut + dispatch"] += time.thread_time() - c0 - (inner[1] - inner0[1])
        wait_for_device()

    runtime.add_step_closure, runtime.sync = timed_closure, sync_then_wait
    run_compiled = runtime.run_compiled

    def run_then_wait(*a):
        out = run_compiled(*a)
        # a replayed step launches its graph here: waiting for it is device time, and the host work after the
        # launch (pointing the state at the outputs) then runs with idle devices, as a traced step's does
        wait_for_device()
        return out

    runtime.run_compiled = run_then_wait
    if args.mode == "replay-cut-every-step":
        StepReplay.cut_needed = lambda self: True
    if args.mode == "replay-torch-adamw":
        state.make_optimizer = functools.partial(state.make_optimizer, shared_step=False)
    StepReplay.__call__ = timers.wrap("trace or replay", StepReplay.__call__)
    profile = cProfile.Profile() if args.profile else None
    TrainState.begin_step = timers.wrap("lr/EMA copies", TrainState.begin_step)
    TrainState.step_tensors = timers.wrap("state list", TrainState.step_tensors)
    monitor_step = timers.wrap("monitor", StepMonitor.after_step)

    def after_step(self, step: int) -> None:
        monitor_step(self, step)
        if step == args.steps:  # the end of the timed window (see `cpu_total` below)
            timers.cpu_end = time.thread_time()
            timers.stopped = True
            if profile is not None:
                profile.disable()

    StepMonitor.after_step = after_step
    cfg = parse_args([
        "--pretrained_model_name_or_path", args.pipeline, "--train_data_dir", args.data, "--resolution", "64",
        "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps), "--mixed_precision", "bf16",
        "--use_ema", "--logging_steps", str(args.logging_steps), "--timing_warmup_steps", str(args.warmup),
        "--output_dir", args.out,
        "--step_graph", {"trace": "trace", "replay-flat": "replay_flat"}.get(args.mode, "replay"),
    ])
    summary = trainer.train(cfg)
    if profile is not None:  # to stderr: stdout's last line is the result
        print(f"cProfile of the timed steps ({args.mode}), functions by own time:", file=sys.stderr)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    # train() ends with an export; the loop's wall time is taken up to the monitor's last timing instead
    steps = args.steps - args.warmup
    wall = summary["mean_step_time_s"] * summary["timed_steps"]
    execute = runtime.metric_seconds("ExecuteReplicatedTime") - timers.exec0
    phases = {k: v / steps for k, v in timers.total.items()}
    device = timers.device / steps
    phases["other"] = wall / steps - device - sum(phases.values())
    cpu = {k: v / steps for k, v in timers.cpu.items()}
    # the whole timed window's main-thread CPU, from step warmup + 1's batch to the end of the last step's monitor
    # call, less the CPU spent waiting for the devices: what the timed phases leave out is the loop's own Python
    cpu_total = (timers.cpu_end - timers.cpu0 - timers.device_cpu) / steps
    cpu["other"] = cpu_total - sum(cpu.values())
    return {"phases": phases, "cpu": cpu, "device_s": device,
            "execute_metric_s": execute / steps, "wall_s": wall / steps, "steps": steps,
            "compilations": summary["compilations"], "replayed_steps": summary["replayed_steps"],
            "gc_cpu_s": gc_cpu["total"] / steps, "gc_collections": gc_cpu["collections"] / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out (compilation, first executions)")
    p.add_argument("--batch", type=int, default=16, help="global batch (one host)")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--unets", nargs="+", default=list(UNETS), choices=list(UNETS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N functions with the most own time under cProfile in the timed steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    work = tempfile.mkdtemp(prefix="bench_host_overhead_")
    pipeline, _, latents = prepare(work, num_images=256, devices=args.devices)
    results = {}
    for unet in args.unets:
        pipe = pipeline if unet == "tiny" else narrow_unet_pipeline(pipeline, os.path.join(work, "pipeline-sd2"))
        for mode in args.modes:
            out = os.path.join(work, f"out-{unet.replace('/', '-')}-{mode}")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--pipeline", pipe,
                   "--data", latents, "--out", out] + sys.argv[1:]
            r = subprocess.run(cmd, env=cpu_env(args.devices), cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               check=True)
            res = results[unet, mode] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"  {unet}, {mode}: host {1e3 * (res['wall_s'] - res['device_s']):.1f} ms/step",
                  file=sys.stderr, flush=True)
    print(command_line())
    print(f"latent shards (tiny VAE, 64 px -> 4x16x16 latents, text states 16x32), global batch {args.batch}, bf16, "
          f"--use_ema, logging every {args.logging_steps} steps, {args.devices} CPU devices; mean over steps "
          f"{args.warmup + 1}..{args.steps}, host and device serialised (see the docstring); load average at the "
          f"end {os.getloadavg()[0]:.1f}")
    print()
    print("Wall ms per step (host total = wall - device wait):")
    print()
    print("| UNet | step | " + " | ".join(PHASES) + " | host total | device wait | ExecuteReplicatedTime "
          "| step compilations | replayed steps |")
    print("| --- | --- |" + " ---: |" * (len(PHASES) + 5))
    for (unet, mode), res in results.items():
        host = res["wall_s"] - res["device_s"]
        cells = " | ".join(f"{1e3 * res['phases'].get(ph, 0.0):.2f}" for ph in PHASES)
        print(f"| {UNETS[unet]} | {MODES[mode]} | {cells} | **{1e3 * host:.1f}** | {1e3 * res['device_s']:.1f} "
              f"| {1e3 * res['execute_metric_s']:.1f} | {res['compilations']} | {res['replayed_steps']} |")
    print()
    print("Main-thread CPU ms per step (not inflated by other processes or threads; 'other': the loop's own Python, "
          "the window's main-thread CPU less the phases):")
    print()
    print("| UNet | step | " + " | ".join(PHASES) + " | host total |")
    print("| --- | --- |" + " ---: |" * (len(PHASES) + 1))
    for (unet, mode), res in results.items():
        cells = " | ".join(f"{1e3 * res['cpu'].get(ph, 0.0):.2f}" for ph in PHASES)
        print(f"| {UNETS[unet]} | {MODES[mode]} | {cells} | **{1e3 * sum(res['cpu'].values()):.1f}** |")
    print()
    print("Python garbage collection in the timed steps (main-thread CPU, inside the phases above):")
    print()
    print("| UNet | step | collections per step | CPU ms per step |")
    print("| --- | --- | ---: | ---: |")
    for (unet, mode), res in results.items():
        print(f"| {UNETS[unet]} | {MODES[mode]} | {res['gc_collections']:.1f} | {1e3 * res['gc_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
