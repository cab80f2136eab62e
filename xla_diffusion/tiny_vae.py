"""Train the tiny kit's VAE on synthetic shapes, so its latents carry the image (a random-init VAE
decodes to noise whatever the UNet learns, and the demo could not show prompt adherence).

Eager PyTorch on the CPU: 800 steps of 32 px took 7.3 minutes on 2 cores shared with other jobs. It also
serves 64 px: the network is convolutional, and 64 px reconstructions are even closer. The result is a
diffusers `AutoencoderKL` folder whose `scaling_factor` is set to 1 / std of its latents over the training
distribution (as SD's 0.18215 was chosen), so the diffusion sees unit-variance inputs.
`xla_diffusion/assets/tiny_vae/` holds the committed output of the default command; rerunning it regenerates
an equivalent file (bit-identical only with the same thread count and CPU kernels):

    python -m xla_diffusion.tiny_vae --output_dir xla_diffusion/assets/tiny_vae
"""

from __future__ import annotations

import json
import os
import random
import time
from argparse import RawDescriptionHelpFormatter

import numpy as np
import torch

from xla_diffusion.cli import OneLineParser, run_cli

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_vae")


def shape_batch(batch_size: int, resolution: int, rng: random.Random) -> torch.Tensor:
    """(B, 3, R, R) images in [-1, 1] of random synthetic shapes (any colours, shape, size, place)."""
    from xla_diffusion.shapes import COLOURS, SHAPES, draw_shape

    names = list(COLOURS)
    images = []
    for _ in range(batch_size):
        fg, bg = rng.sample(names, 2)
        img = draw_shape(fg, rng.choice(SHAPES), bg, resolution, rng)
        images.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def train_tiny_vae(
    output_dir: str, steps: int = 800, batch_size: int = 32, resolution: int = 32, lr: float = 1e-3,
    kl_weight: float = 1e-6, seed: int = 0, log_every: int = 100,
) -> dict:
    """Train the tiny AutoencoderKL (reconstruction L1 + MSE, a small KL term) and save it with a
    fitted scaling_factor. Returns a summary with the final reconstruction error."""
    from xla_diffusion.tiny import build_vae

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    vae = build_vae()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(0.05, 10 / steps) if steps > 20 else 0.3
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup)
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        x = shape_batch(batch_size, resolution, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        loss = rec + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"vae step {step}/{steps} recon {float(rec):.4f} ({time.time() - t0:.0f} s)", flush=True)

    vae.eval()
    with torch.no_grad():
        x = shape_batch(256, resolution, random.Random(seed + 1))
        posterior = vae.encode(x).latent_dist
        latents = posterior.sample()
        scaling = float(1.0 / latents.flatten().std())
        err = float((vae.decode(posterior.mean).sample.clamp(-1, 1) - x).abs().mean())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(output_dir, safe_serialization=True)
    summary = {"steps": steps, "batch_size": batch_size, "resolution": resolution, "seed": seed,
               "scaling_factor": scaling, "heldout_l1": err, "seconds": time.time() - t0}
    with open(os.path.join(output_dir, "training.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=ASSET_DIR)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(train_tiny_vae(args.output_dir, args.steps, args.batch_size, args.resolution, seed=args.seed)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
