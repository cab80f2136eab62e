"""Where the host's tracing time of one training step goes, and whether dynamo's trace-once path cuts it.

Two measurements on the 4-device CPU mesh, each in a fresh process:

1. `train_step` as the trainer runs it (tiny UNet, pre-encoded batch of 16, bf16 autocast, clipping, AdamW,
   EMA): main-thread CPU time of the Python call that records the lazy graph (`time.thread_time`, so the
   XLA threads that execute the previous graph are not counted), mean over the steady steps, then one steady
   step under cProfile, split into its parts by their cumulative time.
2. The UNet's forward + backward alone (no optimizer), traced lazily every step against the same function
   compiled by dynamo (`torch.compile(backend="openxla")`), which traces once and replays: main-thread CPU of
   the call plus the backward, wall time per step, graphs compiled, and the first losses of both (same
   weights, same batches).

    .venv/bin/python bench/trace_profile.py [--steps 12]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, command_line, cpu_env  # noqa: E402

BATCH = 16
WARMUP = 4  # steps before the steady ones (compilation happens in the first)
# The parts of one train_step, by the qualified names cProfile records (file suffix, function).
PARTS = {
    "forward (compute_loss)": ("xla_diffusion/train_step.py", "compute_loss"),
    "backward": ("torch/_tensor.py", "backward"),
    "gradient clipping": ("torch_xla/_patched_functions.py", "clip_grad_norm_"),
    "AdamW step": ("torch/optim/adam.py", "step"),
    "EMA update": ("xla_diffusion/ema.py", "update"),
}


def _batch(g: object, mesh: object) -> dict:
    import torch

    from xla_diffusion import runtime

    return runtime.to_mesh({
        "latents": torch.randn(BATCH, 4, 16, 16, generator=g), "noise": torch.randn(BATCH, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(BATCH, 16, 32, generator=g).to(torch.bfloat16),
        "timesteps": torch.randint(0, 1000, (BATCH,), generator=g)}, mesh)


def step_worker(steps: int) -> dict:
    """Measurement 1, in this process."""
    import torch

    from xla_diffusion import runtime, sharding, state
    from xla_diffusion.config import TrainConfig
    from xla_diffusion.tiny import build_unet
    from xla_diffusion.train_step import StepConfig, train_step

    rt = runtime.init_runtime()
    torch.manual_seed(0)
    unet = build_unet("tiny").train()
    sharding.fsdp_shard(unet, rt.mesh)
    cfg = TrainConfig(pretrained_model_name_or_path="-", train_data_dir="-", mixed_precision="bf16",
                      max_train_steps=steps, use_ema=True)
    st = state.TrainState.create(unet, cfg)
    step_cfg = StepConfig(prediction_type="epsilon", snr_gamma=None, max_grad_norm=1.0, bf16=True,
                          scaling_factor=0.18215)
    ac = torch.linspace(0.999, 0.005, 1000).to(rt.device)
    g = torch.Generator().manual_seed(0)
    trace_ms, profile = [], None
    n0 = runtime.compile_count()
    for step in range(1, steps + 1):
        batch = _batch(g, rt.mesh)
        runtime.wait_device_ops()
        st.begin_step()
        profiler = cProfile.Profile() if step == steps else None
        c0 = time.thread_time()
        if profiler:
            profiler.enable()
        train_step(st.unet, None, None, st.optimizer, batch, ac, step_cfg, st.ema)
        if profiler:
            profiler.disable()
        else:
            trace_ms.append(1e3 * (time.thread_time() - c0))
        st.step = step
        runtime.sync()
        runtime.wait_device_ops()
        if profiler:
            profile = pstats.Stats(profiler)
    parts = {}
    for (path, _line, func), (_cc, _nc, _tt, cumulative, _callers) in profile.stats.items():
        for part, (suffix, name) in PARTS.items():
            if func == name and path.endswith(suffix):
                parts[part] = max(parts.get(part, 0.0), 1e3 * cumulative)
    top = [v[3] for (p, _l, f), v in profile.stats.items() if f == "train_step" and p.endswith("train_step.py")]
    steady = trace_ms[WARMUP:]
    return {"trace_ms": sum(steady) / len(steady), "profiled_ms": 1e3 * top[0], "parts_ms": parts,
            "compilations": runtime.compile_count() - n0}


def forward_backward_worker(mode: str, steps: int) -> dict:
    """Measurement 2, in this process: `mode` is "lazy" or "dynamo"."""
    import torch

    from xla_diffusion import runtime
    from xla_diffusion.tiny import build_unet

    rt = runtime.init_runtime()
    torch.manual_seed(0)
    unet = runtime.place_trained(build_unet("tiny").train(), rt.mesh)

    def loss_fn(x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        with runtime.autocast(x.device, True):
            pred = unet(x, t, h, return_dict=False)[0]
        return pred.float().square().mean()

    fn = torch.compile(loss_fn, backend="openxla") if mode == "dynamo" else loss_fn
    g = torch.Generator().manual_seed(0)
    cpu_ms, wall_ms, losses = [], [], []
    compiles = []
    for _ in range(steps):
        n0 = runtime.compile_count()
        b = _batch(g, rt.mesh)
        runtime.wait_device_ops()
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = fn(b["latents"], b["timesteps"], b["encoder_hidden_states"])
        loss.backward()
        runtime.sync()  # with the gradients still alive, so the lazy graph holds the backward too
        cpu_ms.append(1e3 * (time.thread_time() - c0))
        runtime.wait_device_ops()
        wall_ms.append(1e3 * (time.perf_counter() - t0))
        for p in unet.parameters():
            p.grad = None
        losses.append(float(loss.detach().cpu()))
        compiles.append(runtime.compile_count() - n0)
    steady = slice(WARMUP, None)
    return {"mode": mode, "cpu_ms": sum(cpu_ms[steady]) / len(cpu_ms[steady]),
            "wall_ms": sum(wall_ms[steady]) / len(wall_ms[steady]),
            "compilations": compiles, "losses": losses[:3]}


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=cpu_env(4), cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--worker", choices=["step", "lazy", "dynamo"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps <= WARMUP + 1:
        p.error(f"--steps must be above {WARMUP + 1}")
    if args.worker:
        r = step_worker(args.steps) if args.worker == "step" else forward_backward_worker(args.worker, args.steps)
        print(json.dumps(r))
        return
    step = _run(["--worker", "step", "--steps", str(args.steps)])
    fb = [_run(["--worker", m, "--steps", str(args.steps)]) for m in ("lazy", "dynamo")]

    print(command_line())
    print(f"tiny UNet, pre-encoded batch of {BATCH} (4x16x16 latents), bf16 autocast, 4 CPU devices; steady steps "
          f"{WARMUP + 1}..{args.steps}; main-thread CPU (time.thread_time); load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print()
    print(f"train_step trace: {step['trace_ms']:.1f} ms main-thread CPU per steady step "
          f"({step['compilations']} step compilation); one steady step under cProfile took "
          f"{step['profiled_ms']:.0f} ms:")
    print()
    print("| part of train_step | cumulative ms under cProfile | share |")
    print("| --- | ---: | ---: |")
    for part in PARTS:
        ms = step["parts_ms"].get(part, 0.0)
        print(f"| {part} | {ms:.1f} | {100 * ms / step['profiled_ms']:.0f}% |")
    print()
    print("| UNet forward + backward | main-thread CPU ms per step | wall ms per step "
          "| graphs compiled (per step) | first losses |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in fb:
        name = "lazy tracing every step" if r["mode"] == "lazy" else "dynamo `openxla` (trace once)"
        per_step = " ".join(map(str, r["compilations"]))
        print(f"| {name} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | {sum(r['compilations'])} ({per_step}) "
              f"| {', '.join(f'{x:.5f}' for x in r['losses'])} |")


if __name__ == "__main__":
    main()
