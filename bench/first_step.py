"""Time to the first steady training step: tracing and XLA compilation of the step, with and without AdamW's
state built before step 1 (`xla_diffusion.optim.prime_optimizer`).

The UNet has SD2-base's structure (its published config from bench/flops.py: 4 levels, 2 layers per block,
linear-projection transformers at 3 levels, 5/10/20/20 heads) with every channel width divided by
`--divide` (8: widths 40/80/160/160, text states of 128, 4 norm groups: ~13M parameters), so the graph holds
SD2-base's ops but fits this machine. Each variant runs in a fresh process on a `--devices` CPU mesh (the
in-memory compilation cache is per process) and does what the trainer's loop does per step: lr copy,
`train_step` (bf16 autocast, fp32 master weights and AdamW state), graph cut. Synthetic pre-encoded batches
(latents, text states, noise, timesteps) of fixed shape, sharded over the mesh.

Per step: trace = the Python `train_step` call (lazy tensors record the graph); graph cut = `sync()`, which
lowers the graph, compiles it on a cache miss and launches it; XLA compile = torch_xla's CompileTime metric
within it, split into XLA's CPU backend (code generation through LLVM, the time XLA's `cpu_compiler` logs for
each graph it compiles; read from the worker's log) and the rest: the target-independent HLO passes (SPMD
partitioning, simplification, layout), which a TPU compile runs too, before its own backend; execute =
waiting for the devices after the cut; step = their sum (wall clock). Wall clock counts
whatever else the machine runs (and any time the process is stopped); the CPU columns are this process's CPU
time in trace and graph cut (XLA compiles in the cutting thread and its helpers), which does not.

    .venv/bin/python bench/first_step.py [--divide 8] [--latent 64] [--batch 16] [--devices 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, command_line, cpu_env  # noqa: E402

VARIANTS = {"lazy": "torch AdamW, state created by step 1 (before stop 23)",
            "primed-torch": "torch AdamW, state primed (stops 23-24)",
            "primed": "AdamW with one step count, state primed (now)"}


def narrow_sd2_base_config(divide: int) -> dict:
    """SD2-base's UNet config with channel widths, text-state width and norm groups divided by `divide`
    (channels per norm group and the number of attention heads stay SD2-base's)."""
    from bench.flops import SD2_BASE_UNET

    return {**SD2_BASE_UNET, "block_out_channels": [c // divide for c in SD2_BASE_UNET["block_out_channels"]],
            "cross_attention_dim": SD2_BASE_UNET["cross_attention_dim"] // divide,
            "norm_num_groups": SD2_BASE_UNET["norm_num_groups"] // divide}


# XLA's CPU compiler logs its backend time per graph at verbosity 1 (cpu_compiler.cc):
#   "Compiling [SyncTensorsGraph.81989] for CPU using JIT time: 1.53 min (91730595 us) (cumulative: ...)"
BACKEND_LOG = re.compile(r"Compiling \[[^\]]*\] for CPU using JIT time: .*?\((\d+) us\)")
STEP_MARK = re.compile(r"^  ([\w-]+) step (\d+): ")
LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "cpu_compiler=1"}


def backend_seconds_per_step(log: str) -> dict[int, float]:
    """{step: seconds of XLA CPU backend compilation} from a worker's stderr: the backend lines logged before
    the worker's "  <variant> step <n>: ..." line belong to step n."""
    per_step, pending = {}, 0.0
    for line in log.splitlines():
        if m := BACKEND_LOG.search(line):
            pending += int(m.group(1)) / 1e6
        elif m := STEP_MARK.match(line):
            per_step[int(m.group(2))], pending = pending, 0.0
    return per_step


def start_up(rows: list[dict]) -> list[dict]:
    """The steps up to and including the first steady step: the last one that compiled (start-up is everything
    up to its end)."""
    first_steady = max((i for i, r in enumerate(rows) if r["compilations"]), default=0)
    return rows[: first_steady + 1]


def worker(variant: str, args: argparse.Namespace) -> dict:
    """One variant's steps in this process; returns its per-step timings."""
    import torch
    from diffusers import UNet2DConditionModel

    from xla_diffusion import runtime, state
    from xla_diffusion.config import TrainConfig
    from xla_diffusion.train_step import StepConfig, train_step

    if variant in ("lazy", "primed-torch"):  # torch's AdamW, a step count per parameter (before stop 25)
        state.make_optimizer = functools.partial(state.make_optimizer, shared_step=False)
    if variant == "lazy":
        state.prime_optimizer = lambda optimizer: None  # the trainer as it was: state created inside step 1
    rt = runtime.init_runtime()
    torch.manual_seed(0)
    unet_config = narrow_sd2_base_config(args.divide)
    unet = UNet2DConditionModel(**unet_config).train()
    params = sum(p.numel() for p in unet.parameters())
    cfg = TrainConfig(pretrained_model_name_or_path="-", train_data_dir="-", mixed_precision="bf16",
                      max_train_steps=args.steps)
    st = state.TrainState.create(runtime.place_trained(unet, rt.mesh), cfg)
    step_cfg = StepConfig(prediction_type="epsilon", snr_gamma=None, max_grad_norm=1.0, bf16=True,
                          scaling_factor=0.18215)
    ac = torch.linspace(0.999, 0.005, 1000).to(rt.device)
    b, side, text = args.batch, args.latent, unet_config["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)

    rows = []
    for step in range(1, args.steps + 1):
        batch = runtime.to_mesh({
            "latents": torch.randn(b, 4, side, side, generator=g), "noise": torch.randn(b, 4, side, side, generator=g),
            "encoder_hidden_states": torch.randn(b, 77, text, generator=g).to(torch.bfloat16),
            "timesteps": torch.randint(0, 1000, (b,), generator=g)}, rt.mesh)
        runtime.wait_device_ops()
        c0, n0 = runtime.metric_seconds("CompileTime"), runtime.compile_count()
        t0, p0 = time.perf_counter(), time.process_time()
        st.begin_step()
        loss, _ = train_step(st.unet, None, None, st.optimizer, batch, ac, step_cfg)
        st.step = step
        t1, p1 = time.perf_counter(), time.process_time()
        runtime.sync()
        t2, p2 = time.perf_counter(), time.process_time()
        runtime.wait_device_ops()
        t3 = time.perf_counter()
        compile_s = runtime.metric_seconds("CompileTime") - c0
        rows.append({"step": step, "trace_s": t1 - t0, "cut_s": t2 - t1, "compile_s": compile_s, "execute_s": t3 - t2,
                     "step_s": t3 - t0, "trace_cpu_s": p1 - p0, "cut_cpu_s": p2 - p1,
                     "compilations": runtime.compile_count() - n0, "loss": float(loss.cpu())})
        print(f"  {variant} step {step}: {rows[-1]['step_s']:.1f} s, {rows[-1]['compilations']} compilation(s)",
              file=sys.stderr, flush=True)
    return {"params": params, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--divide", type=int, default=8, help="divide SD2-base's channel widths by this")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: SD2-base's 512 px)")
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    results = {}
    for variant in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant] + sys.argv[1:]
        # the worker's stdout (its JSON) goes to a file, so that reading its log (stderr) as it comes cannot
        # dead-lock on a full stdout pipe
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, env={**cpu_env(args.devices), **LOG_ENV}, cwd=ROOT, stdout=out,
                                    stderr=subprocess.PIPE, text=True)
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if STEP_MARK.match(line):  # its progress, as it comes
                    print(line, end="", file=sys.stderr, flush=True)
            proc.wait()
            out.seek(0)
            stdout = out.read()
        text = "".join(lines)
        if proc.returncode:
            sys.exit(f"{variant}: the worker failed (exit {proc.returncode}); the end of its log:\n"
                     + "\n".join(text.splitlines()[-5:]))
        results[variant] = json.loads(stdout.strip().splitlines()[-1])
        backend = backend_seconds_per_step(text)
        for row in results[variant]["rows"]:
            row["backend_s"] = backend.get(row["step"], 0.0)
    params = next(iter(results.values()))["params"]
    print(command_line())
    print(f"UNet: SD2-base structure, channel widths / {args.divide} ({params / 1e6:.1f}M parameters); latents "
          f"4x{args.latent}x{args.latent}, text 77x{1024 // args.divide}, global batch {args.batch}, bf16 autocast, "
          f"{args.devices} CPU devices; load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print("| optimizer state | step | trace (s) | graph cut (s) | of which XLA compile (s) | compile: HLO passes (s) "
          "| compile: CPU backend (s) | execute (s) | step (s) | trace CPU (s) | graph cut CPU (s) | compilations |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, res in results.items():
        for r in res["rows"]:
            print(f"| {VARIANTS[variant]} | {r['step']} | {r['trace_s']:.1f} | {r['cut_s']:.1f} | {r['compile_s']:.1f} "
                  f"| {r['compile_s'] - r['backend_s']:.1f} | {r['backend_s']:.1f} "
                  f"| {r['execute_s']:.1f} | {r['step_s']:.1f} | {r['trace_cpu_s']:.1f} | {r['cut_cpu_s']:.1f} "
                  f"| {r['compilations']} |")
    print()
    print("| optimizer state | step compilations | time to the first steady step (s) | vs. before stop 23 "
          "| of which XLA's CPU backend (s) | its trace + cut CPU time (s) | losses per step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    firsts = {v: sum(r["step_s"] for r in start_up(res["rows"])) for v, res in results.items()}
    for variant, res in results.items():
        rows = res["rows"]
        start = start_up(rows)
        losses = ", ".join(f"{r['loss']:.6f}" for r in rows)
        cpu = sum(r["trace_cpu_s"] + r["cut_cpu_s"] for r in start)
        ratio = f"{firsts[variant] / firsts['lazy']:.2f}x" if "lazy" in firsts else "-"
        print(f"| {VARIANTS[variant]} | {sum(r['compilations'] for r in rows)} | {firsts[variant]:.1f} | {ratio} "
              f"| {sum(r['backend_s'] for r in start):.1f} | {cpu:.1f} "
              f"| {losses} |")


if __name__ == "__main__":
    main()
