"""A small training state on the XLA mesh for the checkpoint tests, and the subprocess entry points that
need a runtime of their own (another device count, or two processes).

The state is what the trainer checkpoints, at toy size: a 2-layer MLP with fp32 weights, the trainer's
AdamW (capturable, device lr tensor), EMA shadows, and per-step host-drawn batches. The first weight is
split over the mesh's `data` axis so that a save writes real shards and a restore on another device count
reshards them.

    python -m tests.checkpoint_worker restore OUTPUT_DIR OUT.pt      # restore the latest checkpoint, dump it
    python -m tests.checkpoint_worker twoproc RANK PORT OUTPUT_DIR OUT.json LATENTS_DIR
    python -m tests.checkpoint_worker preempted OUTPUT_DIR SNAPSHOT.pt   # steps until SIGTERM
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from xla_diffusion import checkpoint, checkpointer, runtime
from xla_diffusion.ema import EmaWeights
from xla_diffusion.optim import make_optimizer, prime_optimizer

FINGERPRINT = {"model": "mlp-8-16-4", "seed": 0, "train_batch_size": 32, "resolution": [8]}


def toy_latents(root: str, shards: int = 4, per_shard: int = 13, bad: tuple[int, int] | None = None) -> Any:
    """A latent dataset of tiny samples whose latent_mean holds the sample's number (to identify it); the
    sample `bad` = (shard, position) is not decodable."""
    from safetensors.torch import save as safetensors_bytes

    from xla_diffusion.data.tar_stream import tar_bytes

    n = 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            t = {"latent_mean": torch.full((4, 2, 2), float(n)).bfloat16(),
                 "latent_std": torch.ones(4, 2, 2).bfloat16(), "input_ids": torch.zeros(3, dtype=torch.int32),
                 "encoder_hidden_states": torch.zeros(3, 5).bfloat16()}
            data = b"not safetensors" if bad == (s, len(samples)) else safetensors_bytes(t)
            samples.append({"__key__": f"{n:05d}", "safetensors": data, "txt": "x"})
            n += 1
        with open(os.path.join(root, f"{s:05d}.tar"), "wb") as f:
            f.write(tar_bytes(samples))
    return toy_manifest(root)


def toy_manifest(root: str) -> Any:
    from xla_diffusion.data.latents import LatentManifest

    return LatentManifest(root=root, resolution=8, latent_shape=(4, 2, 2), text_shape=(3, 5), has_text_states=True,
                          scaling_factor=1.0, shift_factor=None, raw={})


def build(rt: runtime.Runtime, seed: int, hidden: int = 16):
    """(model, optimizer, ema) placed on the mesh; weights from `seed`. Nothing here compiles: weights and
    shadows are host-to-device transfers."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 4)).to(rt.device)
    if rt.num_devices > 1:
        import torch_xla.distributed.spmd as xs

        xs.mark_sharding(model[0].weight, rt.mesh, ("data", None))  # (hidden, 8): rows split over devices
    opt = make_optimizer(model, 1e-2, (0.9, 0.999), 1e-2, 1e-8)
    ema = EmaWeights(list(model.parameters()), 0.99)
    return model, opt, ema


def train_step(rt: runtime.Runtime, model, opt, ema: EmaWeights, update: int) -> None:
    """Optimizer update number `update` (1-based) on a batch drawn from `update`, then the EMA update: one
    graph, cut here."""
    g = torch.Generator().manual_seed(1000 + update)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    ema.set_update(update)
    loss = torch.nn.functional.mse_loss(model(x.to(rt.device)), y.to(rt.device))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update()
    runtime.sync()


def state(model, opt, ema: EmaWeights) -> dict:
    return checkpoint.training_state(model, opt, ema.shadow)


def host_snapshot(model, opt, ema: EmaWeights) -> dict[str, torch.Tensor]:
    """Host copies of every checkpointed tensor, by dotted name (gathers shards: test use only)."""
    return {k: v.cpu().clone() for k, v in checkpoint.flat_tensors(state(model, opt, ema)).items()}


def _restore(output_dir: str, out: str) -> None:
    rt = runtime.init_runtime()
    model, opt, ema = build(rt, seed=123)
    prime_optimizer(opt)
    before = runtime.compile_count()
    found = checkpoint.latest_complete(output_dir)
    host = checkpointer.Checkpointer(output_dir, mesh=rt.mesh).restore(found, state(model, opt, ema), FINGERPRINT)
    torch.save({"tensors": host_snapshot(model, opt, ema), "host": host, "num_devices": rt.num_devices,
                "restore_compiles": runtime.compile_count() - before}, out)


def _two_host_data(rank: int, latents: str, output_dir: str, rt: runtime.Runtime, model, opt, ema) -> dict:
    """The host side of the data on host `rank` of 2: its own shards, 5 batches consumed, a collective save
    with its data position in its host state, 5 more batches; then a collective restore and the 5 batches
    after the saved position, which must be the same."""
    from xla_diffusion.data.feed import DataFeed
    from xla_diffusion.data.latents import LatentShardBatches

    def feed(position=None):
        source = LatentShardBatches(toy_manifest(latents), 4, process_index=rank, process_count=2, num_workers=1,
                                    shuffle_buffer=5, seed=2)
        f = DataFeed(source, position)
        return f, iter(f)

    def ids(f, it, n):
        return [[int(x) for x in f.take(it)["latent_mean"][:, 0, 0, 0].float()] for _ in range(n)]

    f, it = feed()
    before = ids(f, it, 5)
    ckpt = checkpointer.Checkpointer(output_dir, mesh=rt.mesh)
    ckpt.save(5, state(model, opt, ema), {"data": f.position}, FINGERPRINT)
    ckpt.wait()
    after = ids(f, it, 5)
    host = ckpt.restore(checkpoint.step_dir(output_dir, 5), state(model, opt, ema), FINGERPRINT)
    ckpt.close()
    f2, it2 = feed(host["data"])
    return {"before": before, "after": after, "resumed": ids(f2, it2, 5), "position": host["data"]}


def _twoproc(rank: int, port: int, output_dir: str, out: str, latents: str) -> None:
    """One of two processes, each its own SPMD job (torch_xla cannot join CPU processes into one), joined
    by a gloo group: a collective save, then a collective restore into fresh tensors; then the data's host
    side (`_two_host_data`) into a second checkpoint directory."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rt = runtime.init_runtime()
    model, opt, ema = build(rt, seed=0)
    for update in (1, 2):
        train_step(rt, model, opt, ema, update)
    saved = host_snapshot(model, opt, ema)
    ckpt = checkpointer.Checkpointer(output_dir, total_limit=1, mesh=rt.mesh)
    path = ckpt.save(2, state(model, opt, ema), {"process": rank, "data_position": 10 * (rank + 1)}, FINGERPRINT)
    ckpt.wait()
    model2, opt2, ema2 = build(rt, seed=7)
    prime_optimizer(opt2)
    host = ckpt.restore(checkpoint.latest_complete(output_dir), state(model2, opt2, ema2), FINGERPRINT)
    restored = host_snapshot(model2, opt2, ema2)
    ckpt.close()
    data = _two_host_data(rank, latents, output_dir + "_data", rt, model2, opt2, ema2)
    equal = sorted(k for k in saved if torch.equal(saved[k], restored[k]))
    with open(out, "w") as f:
        json.dump({"path": path, "host": host, "equal": equal, "keys": sorted(saved),
                   "process_count": ckpt.process_count, "process_index": ckpt.process_index, "data": data}, f)
    dist.destroy_process_group()


def _preempted(output_dir: str, snapshot: str) -> None:
    """The trainer's checkpoint cadence and SIGTERM handling (`resume.RunCheckpoints`) around the toy state:
    a checkpoint every 3 steps, steps until a SIGTERM, then the preemption checkpoint, whose marker write is
    made slow (a slow store) so that the test's second SIGTERM lands while it is being written."""
    import logging
    import time
    from types import SimpleNamespace

    from xla_diffusion import fsio
    from xla_diffusion.resume import FINGERPRINT_FIELDS, RunCheckpoints

    logging.basicConfig(level=logging.INFO)
    rt = runtime.init_runtime()
    model, opt, ema = build(rt, seed=0)
    cfg = SimpleNamespace(**dict.fromkeys(FINGERPRINT_FIELDS), dream_training=False, output_dir=output_dir,
                          logging_dir="logs", checkpointing_steps=3, checkpoints_total_limit=None)
    run = RunCheckpoints(cfg, rt)
    train_state = SimpleNamespace(unet=model, optimizer=opt, ema=ema, step=0)
    run.preemption.install()
    write_marker = fsio.write_json_atomic

    def slow_marker(dest, obj):
        if obj.get("step", 0) > 3:
            print("writing the preemption checkpoint", flush=True)
            time.sleep(120)
        write_marker(dest, obj)

    fsio.write_json_atomic = slow_marker
    for step in range(1, 1000):
        train_step(rt, model, opt, ema, step)
        train_state.step = step
        if step == 3:
            torch.save(host_snapshot(model, opt, ema), snapshot)
        stop = run.after_step(step, train_state, {"batches": step})
        print(f"step {step}", flush=True)
        if stop:
            raise SystemExit("the second SIGTERM did not end the process")
        time.sleep(0.2)


if __name__ == "__main__":
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "restore":
        _restore(*args)
    elif mode == "twoproc":
        _twoproc(int(args[0]), int(args[1]), args[2], args[3], args[4])
    elif mode == "preempted":
        _preempted(*args)
    else:
        raise SystemExit(f"unknown mode {mode}")
