"""Per-device memory of the UNet's training state under FSDP, measured and projected.

(a) Measured on the 4-device CPU mesh: the tiny pipeline's UNet state (fp32 parameters, AdamW moments and
    step counters, EMA shadows), sharded by the default rule, at fsdp=1 and fsdp=4. Bytes are summed from
    each device's local shards as read back from the device buffers. With --step, each configuration also
    runs one training step (UNet forward/backward on an MSE-to-noise loss, AdamW, EMA) and reports XLA's
    buffer assignment of the compiled step and the collectives in its HLO; --step also compares the step
    with and without gradient checkpointing at fsdp=1.
(b) Projected from the real UNet configs (built on the meta device, no weights): bytes per chip of fp32
    parameters + 2 fp32 AdamW moments + fp32 EMA, and with the fp32 gradients a step holds transiently,
    sharded by the same rule resolver, for fsdp = 1, 4, 8, 16, 64, next to the HBM of TPU v5e, v6e, v5p.
    Activations are not included: what is left of HBM is what the activations can use.

    .venv/bin/python bench/memory.py            # (a) state bytes and (b) the table; no step compiled
    .venv/bin/python bench/memory.py --step     # + one compiled step per configuration (minutes each on CPU)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Published configs (diffusers' unet/config.json of each hub repo), embedded: no download. Keys not listed
# take UNet2DConditionModel's defaults, which equal the published values.
_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
UNET_CONFIGS: dict[str, dict] = {
    # runwayml/stable-diffusion-v1-5 (and CompVis v1-4)
    "SD1.5": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[320, 640, 1280, 1280], down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                  attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5),
    # stabilityai/stable-diffusion-2 (768-v; 2-base differs only in sample_size 64 and upcast_attention)
    "SD2": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280], down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=True, norm_num_groups=32, norm_eps=1e-5),
    # stabilityai/stable-diffusion-xl-base-1.0
    "SDXL": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 norm_num_groups=32, norm_eps=1e-5),
}
# Parameter counts as published: the SD v1 model card ("860M UNet"), the SD 2 announcement and model card
# ("865M UNet"), the SDXL paper ("2.6B parameters" in the UNet).
PUBLISHED_PARAMS = {"SD1.5": 860e6, "SD2": 865e6, "SDXL": 2.6e9}
HBM_GB = {"v5e": 16, "v6e": 32, "v5p": 95}  # per chip, Google Cloud TPU docs
FSDP_SIZES = (1, 4, 8, 16, 64)
GB = 1e9


def projected_table(fsdp_sizes: tuple[int, ...] = FSDP_SIZES) -> str:
    """Markdown table of bytes per chip for the real UNets, from their configs on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from xla_diffusion.sharding import local_numel, resolve_specs

    lines = [
        "| UNet | params (published) | fsdp | state GB/chip (params+2 moments+EMA) | + fp32 grads | "
        + " | ".join(f"{k} ({v} GB) left" for k, v in HBM_GB.items()) + " |",
        "|---|---|---|---|---|" + "---|" * len(HBM_GB),
    ]
    for name, config in UNET_CONFIGS.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        shapes = {n: tuple(p.shape) for n, p in unet.named_parameters()}
        count = sum(p.numel() for p in unet.parameters())
        for fsdp in fsdp_sizes:
            sizes = {"data": 1, "fsdp": fsdp}
            specs = resolve_specs(shapes, sizes)
            per_chip = sum(local_numel(shapes[n], specs[n], sizes) for n in shapes)
            state, with_grads = 16 * per_chip / GB, 20 * per_chip / GB
            cells = [f"{hbm - with_grads:+.1f}" + ("" if hbm >= with_grads else " ✗") for hbm in HBM_GB.values()]
            lines.append(f"| {name} | {count / 1e6:,.1f}M ({PUBLISHED_PARAMS[name] / 1e6:,.0f}M) | {fsdp} | "
                         f"{state:.2f} | {with_grads:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_tiny(step: bool, bf16: bool, dump_dir: str | None, fsdp_sizes: tuple[int, ...] = (1, 4)) -> list[dict]:
    """(a): build the tiny pipeline's UNet per configuration, shard its state, read the local shards;
    with `step`, run one step and read its compiled module from the dump."""
    import torch

    from xla_diffusion import hlo, runtime, sharding
    from xla_diffusion.ema import EmaWeights
    from xla_diffusion.optim import make_optimizer
    from xla_diffusion.tiny import build_unet
    from xla_diffusion.xla_ops import xla_friendly_ops

    configs = [(f, False) for f in fsdp_sizes] + ([(f, True) for f in fsdp_sizes] if step else [])
    rows = []
    seen_modules: set[str] = set()
    for fsdp, checkpointing in configs:
        rt = runtime.init_runtime(fsdp_size=fsdp)
        torch.manual_seed(0)
        unet = build_unet("tiny")
        if checkpointing:
            sharding.enable_gradient_checkpointing(unet)  # what --gradient_checkpointing does
        specs = sharding.fsdp_shard(unet, rt.mesh)  # what --fsdp_size does
        optimizer = make_optimizer(unet, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        sharding.shard_optimizer_state(optimizer, unet, rt.mesh, specs)
        ema = EmaWeights(list(unet.parameters()), max_decay=0.9999)
        state = list(unet.parameters()) + ema.shadow + [v for s in optimizer.state.values() for v in s.values()]
        per_device = sharding.per_device_bytes(state)
        row = {"mesh": dict(sharding.mesh_axis_sizes(rt.mesh)), "checkpointing": checkpointing,
               "params": sum(p.numel() for p in unet.parameters()),
               "sharded_tensors": sum("fsdp" in s for s in specs.values()), "tensors": len(specs),
               "bytes": per_device}
        if step:
            g = torch.Generator().manual_seed(1)
            batch = [torch.randn(16, 4, 16, 16, generator=g), torch.randint(0, 1000, (16,), generator=g),
                     torch.randn(16, 16, 32, generator=g), torch.randn(16, 4, 16, 16, generator=g)]
            batch = [t.to(rt.device) for t in batch]
            for t in batch:
                sharding.shard_tensor(t, rt.mesh, (("data", "fsdp"),) + (None,) * (t.ndim - 1))
            ema.set_update(2)
            with torch.autocast("xla", dtype=torch.bfloat16, enabled=bf16), xla_friendly_ops():
                pred = unet(batch[0], batch[1], batch[2], return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), batch[3])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update()
            runtime.sync()
            runtime.wait_device_ops()
            modules = [m for m in hlo.read_hlo_dump(dump_dir) if m.name not in seen_modules]
            seen_modules.update(m.name for m in hlo.read_hlo_dump(dump_dir))
            # the step is the module with the largest buffer assignment; others are tiny set-up graphs
            module = max(modules, key=lambda m: hlo.buffer_assignment_bytes(m.buffer_assignment)["total"])
            row["buffers"] = hlo.buffer_assignment_bytes(module.buffer_assignment)
            row["collectives"] = hlo.count_collectives(module.hlo_text)
        rows.append(row)
        print(f"  measured {row['mesh']} checkpointing={checkpointing}", file=sys.stderr, flush=True)
    return rows


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def tiny_tables(rows: list[dict]) -> str:
    base = next(r for r in rows if r["mesh"]["fsdp"] == 1 and not r["checkpointing"])
    base_bytes = max(base["bytes"].values())
    out = [
        "| mesh (data, fsdp) | sharded tensors | state KiB per device (min–max) | × replicated |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["checkpointing"]:
            continue
        lo, hi = min(r["bytes"].values()), max(r["bytes"].values())
        out.append(f"| ({r['mesh']['data']}, {r['mesh']['fsdp']}) | {r['sharded_tensors']}/{r['tensors']} | "
                   f"{_kib(lo)}–{_kib(hi)} | {hi / base_bytes:.3f} |")
    if any("buffers" in r for r in rows):
        out += [
            "",
            "| mesh (data, fsdp) | grad. checkpointing | step total KiB | inputs KiB | temp KiB | "
            "all-reduce n / KiB | all-gather n / KiB | reduce-scatter n / KiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            b, c = r["buffers"], r["collectives"]
            out.append(
                f"| ({r['mesh']['data']}, {r['mesh']['fsdp']}) | {'yes' if r['checkpointing'] else 'no'} | "
                f"{_kib(b['total'])} | {_kib(b['parameter'])} | {_kib(b['temp'])} | "
                f"{c['all-reduce'].count} / {_kib(c['all-reduce'].operand_bytes)} | "
                f"{c['all-gather'].count} / {_kib(c['all-gather'].result_bytes)} | "
                f"{c['reduce-scatter'].count} / {_kib(c['reduce-scatter'].operand_bytes)} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", action="store_true", help="also compile and run one step per configuration")
    p.add_argument("--mixed_precision", choices=["no", "bf16"], default="bf16", help="the step's compute dtype")
    p.add_argument("--skip_tiny", action="store_true", help="only the projected table (no device)")
    p.add_argument("--fsdp_sizes", default="1,4", help="fsdp sizes of the tiny rows, comma-separated (must include 1)")
    args = p.parse_args()

    dump_dir = None
    if not args.skip_tiny:
        os.environ.setdefault("PJRT_DEVICE", "CPU")
        os.environ.setdefault("CPU_NUM_DEVICES", "4")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if args.step:
            from xla_diffusion.hlo import hlo_dump_flags

            # XLA reads its flags when the runtime starts, which is after this line (nothing touched a device)
            dump_dir = tempfile.mkdtemp(prefix="bench_memory_hlo_")
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + hlo_dump_flags(dump_dir)).strip()
    print(f"command: python bench/memory.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    if not args.skip_tiny:
        rows = measure_tiny(args.step, args.mixed_precision == "bf16", dump_dir,
                            tuple(int(f) for f in args.fsdp_sizes.split(",")))
        print()
        print(f"(a) tiny pipeline UNet ({rows[0]['params']:,} parameters) on the 4-device CPU mesh: fp32 parameters, "
              "AdamW moments and steps, EMA shadows; bytes summed from each device's local shards")
        if args.step:
            print(f"    step: global batch 16, 16×16 latents, {args.mixed_precision}; bytes from XLA's buffer "
                  "assignment of the compiled step (per device), collectives from its HLO (all-reduce: "
                  "operand bytes, all-gather: result bytes, reduce-scatter: operand bytes)")
        print()
        print(tiny_tables(rows))
    print()
    print("(b) bytes per chip of the UNet training state, real configs on the meta device, default rule "
          "(largest divisible dim over fsdp; < 4096 elements replicated); GB = 1e9 bytes; "
          "'left' = HBM − (state + grads), what remains for activations; ✗ = does not fit")
    print()
    print(projected_table())


if __name__ == "__main__":
    main()
