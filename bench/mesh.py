"""Step time, per-device bytes and collectives of the training step per mesh shape, with and without gradient
checkpointing, in one run.

Every configuration runs in a fresh process on the 4-device CPU mesh (XLA reads its dump flags at start-up and
the compilation cache is per process) and does what the trainer does per update: the tiny pipeline's UNet,
`--gradient_checkpointing` applied as the trainer applies it, sharded by `sharding.fsdp_shard`, a
`TrainState` with AdamW primed and an EMA, then `train_step` (bf16 autocast, fp32 master weights, gradient
clipping, AdamW, EMA) on synthetic pre-encoded batches of fixed shape, sharded over both mesh axes.

Read per configuration:
- step time: mean wall time of steps 2..N (trace + graph cut + execution; step 1 compiles);
- state bytes per device: UNet weights + AdamW moments + EMA shadows, summed from each device's local shards
  as read back from the device buffers (`sharding.per_device_bytes`);
- from XLA's dump of the compiled step: its buffer assignment (per device: total, inputs, temporaries) and
  its collectives (`hlo.count_collectives`: count and bytes per kind).

Collective traffic is compared with what each layout should move per step, from the parameter counts:
data-parallel all-reduces the fp32 gradient of every weight (4 bytes × parameters, independent of the
batch); FSDP reduce-scatters the fp32 gradients of the sharded weights (4 bytes × their elements) and
all-gathers those weights for the compute, once for the forward and once for the backward (2 bytes ×
elements per gather in bf16 on a TPU; XLA's CPU backend gathers the bf16 values as f32, so 4 bytes here),
while the small replicated tensors are still all-reduced. Activations should not move at all: any
all-to-all or collective-permute, or all-gathered bytes that grow with the batch, are activations GSPMD
re-split.

    .venv/bin/python bench/mesh.py [--batch 16] [--latent 16] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, command_line, cpu_env  # noqa: E402


def configurations(batch: int) -> list[dict]:
    """(data, fsdp) × checkpointing at `batch`, then data-parallel and fsdp=4 again at twice the batch
    (gradient traffic must not grow with it)."""
    rows = [{"fsdp": f, "checkpointing": c, "batch": batch} for f in (1, 2, 4) for c in (False, True)]
    return rows + [{"fsdp": f, "checkpointing": False, "batch": 2 * batch} for f in (1, 4)]


def worker(conf: dict, args: argparse.Namespace, dump_dir: str) -> dict:
    """One configuration in this process (XLA_FLAGS already dump to `dump_dir`)."""
    import torch

    from xla_diffusion import hlo, runtime, sharding, state
    from xla_diffusion.config import TrainConfig
    from xla_diffusion.tiny import build_unet
    from xla_diffusion.train_step import StepConfig, train_step

    rt = runtime.init_runtime(fsdp_size=conf["fsdp"])
    torch.manual_seed(0)
    unet = build_unet("tiny").train()
    if conf["checkpointing"]:
        sharding.enable_gradient_checkpointing(unet)
    specs = sharding.fsdp_shard(unet, rt.mesh)
    shapes = {n: tuple(p.shape) for n, p in unet.named_parameters()}
    cfg = TrainConfig(pretrained_model_name_or_path="-", train_data_dir="-", mixed_precision="bf16",
                      max_train_steps=args.steps, use_ema=True)
    st = state.TrainState.create(unet, cfg)
    state_tensors = (list(unet.parameters()) + st.ema.shadow
                     + [v for s in st.optimizer.state.values() for k, v in s.items() if k != "step"])
    per_device = sharding.per_device_bytes(state_tensors)
    step_cfg = StepConfig(prediction_type="epsilon", snr_gamma=None, max_grad_norm=1.0, bf16=True,
                          scaling_factor=0.18215)
    ac = torch.linspace(0.999, 0.005, 1000).to(rt.device)
    b, side = conf["batch"], args.latent
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    n0 = runtime.compile_count()
    for step in range(1, args.steps + 1):
        batch = runtime.to_mesh({
            "latents": torch.randn(b, 4, side, side, generator=g), "noise": torch.randn(b, 4, side, side, generator=g),
            "encoder_hidden_states": torch.randn(b, 16, 32, generator=g).to(torch.bfloat16),
            "timesteps": torch.randint(0, 1000, (b,), generator=g)}, rt.mesh)
        runtime.wait_device_ops()
        t0 = time.perf_counter()
        st.begin_step()
        loss, _ = train_step(st.unet, None, None, st.optimizer, batch, ac, step_cfg, st.ema)
        st.step = step
        runtime.sync()
        runtime.wait_device_ops()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    losses = [float(x.cpu()) for x in losses]
    module = max(hlo.read_hlo_dump(dump_dir),
                 key=lambda m: hlo.buffer_assignment_bytes(m.buffer_assignment)["total"])
    sharded = [n for n, s in specs.items() if "fsdp" in s]
    return {**conf, "step_compilations": runtime.compile_count() - n0,
            "step_s": sum(times[1:]) / max(1, len(times) - 1),
            "params": sum(p.numel() for p in unet.parameters()),
            "sharded_numel": sum(torch.Size(shapes[n]).numel() for n in sharded),
            "sharded_tensors": len(sharded), "tensors": len(specs), "state_bytes": max(per_device.values()),
            "buffers": hlo.buffer_assignment_bytes(module.buffer_assignment),
            "collectives": {k: vars(v) for k, v in hlo.count_collectives(module.hlo_text).items()},
            "losses": losses}


def _kib(n: float) -> str:
    return f"{n / 1024:,.0f}"


def report(rows: list[dict], args: argparse.Namespace) -> None:
    first = next((r for r in rows if r["fsdp"] == 4), rows[0])
    print(command_line())
    print(f"tiny pipeline UNet ({first['params']:,} parameters, {first['sharded_tensors']} of {first['tensors']} "
          f"tensors split at fsdp 4: {first['sharded_numel']:,} elements); latents 4x{args.latent}x{args.latent}, "
          f"text 16x32, bf16 autocast, fp32 AdamW + EMA, clipping; 4 CPU devices; step = mean of steps 2..{args.steps};"
          f" bytes per device; load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print("| mesh (data, fsdp) | grad. checkpointing | global batch | step (s) | step compilations | state KiB "
          "| step total KiB | inputs KiB | temp KiB | all-reduce n / KiB | all-gather n / KiB "
          "| reduce-scatter n / KiB | all-to-all n / KiB | collective-permute n / KiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        b, c = r["buffers"], r["collectives"]
        print(f"| ({4 // r['fsdp']}, {r['fsdp']}) | {'yes' if r['checkpointing'] else 'no'} | {r['batch']} "
              f"| {r['step_s']:.2f} | {r['step_compilations']} | {_kib(r['state_bytes'])} | {_kib(b['total'])} "
              f"| {_kib(b['parameter'])} | {_kib(b['temp'])} "
              f"| {c['all-reduce']['count']} / {_kib(c['all-reduce']['operand_bytes'])} "
              f"| {c['all-gather']['count']} / {_kib(c['all-gather']['result_bytes'])} "
              f"| {c['reduce-scatter']['count']} / {_kib(c['reduce-scatter']['operand_bytes'])} "
              f"| {c['all-to-all']['count']} / {_kib(c['all-to-all']['result_bytes'])} "
              f"| {c['collective-permute']['count']} / {_kib(c['collective-permute']['result_bytes'])} |")
    print()
    print("Expected traffic per step from the parameter counts (KiB; fp32 gradients; gathers in f32, as XLA's CPU "
          "backend does them):")
    print()
    print("| mesh (data, fsdp) | global batch | all-reduce expected / measured | reduce-scatter expected / measured "
          "| all-gather per gather / measured (= gathers) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["checkpointing"]:
            continue
        c, params, split = r["collectives"], r["params"], r["sharded_numel"] if r["fsdp"] > 1 else 0
        gathered = c["all-gather"]["result_bytes"]
        per_gather = 4 * split  # f32 on CPU (bf16 on TPU: half)
        print(f"| ({4 // r['fsdp']}, {r['fsdp']}) | {r['batch']} "
              f"| {_kib(4 * (params - split))} / {_kib(c['all-reduce']['operand_bytes'])} "
              f"| {_kib(4 * split)} / {_kib(c['reduce-scatter']['operand_bytes'])} "
              f"| {_kib(per_gather)} / {_kib(gathered)}"
              + (f" (= {gathered / per_gather:.2f})" if per_gather else "") + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="global batch of the main rows (the last two: twice it)")
    p.add_argument("--latent", type=int, default=16, help="latent side (16: the tiny pipeline's 64 px)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON of one configuration
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args, os.environ["BENCH_DUMP_DIR"])))
        return

    from xla_diffusion.hlo import hlo_dump_flags

    rows = []
    for conf in configurations(args.batch):
        with tempfile.TemporaryDirectory(prefix="bench_mesh_") as dump:
            env = cpu_env(4)
            env["BENCH_DUMP_DIR"] = dump
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + hlo_dump_flags(dump)).strip()
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(conf),
                   "--latent", str(args.latent), "--steps", str(args.steps)]
            r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  measured {conf}", file=sys.stderr, flush=True)
    report(rows, args)


if __name__ == "__main__":
    main()
