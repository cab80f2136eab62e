"""Synthetic shapes → image shards → latent shards, in one call (the demo's and benchmarks' data).

    OUTPUT/train/                 imagefolder (data_prep/synthetic.py), plus OUTPUT/heldout_prompts.jsonl
    OUTPUT/image_shards/*.tar     webdataset image shards (img2dataset's layout)
    OUTPUT/latents/               latent shards + manifest.json: pass this as --train_data_dir

Each stage is skipped when its output exists (encoding resumes shard by shard). Encoding runs on the XLA
device mesh by default: set CPU_NUM_DEVICES (and PJRT_DEVICE=CPU) in the environment for a CPU mesh.

Usage: ``python -m data_prep.prepare_shapes --output_dir DIR --pretrained_model_name_or_path PIPELINE
[--num_images 1024] [--resolution 64] [--samples_per_shard 128] [--device xla|cpu]``
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from xla_diffusion.cli import OneLineParser, run_cli
from xla_diffusion.errors import ConfigError


def prepare_shapes_latents(
    output_dir: str,
    pretrained_model_name_or_path: str,
    num_images: int = 1024,
    resolution: int = 64,
    samples_per_shard: int = 128,
    device: str = "xla",
    batch_size: int = 32,
    seed: int = 0,
    latent_dir: str | None = None,
    heldout_seed: int = 0,
) -> dict[str, Any]:
    """Build (or finish building) the three stages; returns their paths and the encode summary.
    `latent_dir` (default OUTPUT/latents) may be a gs:// prefix. `heldout_seed` picks which 9 of the 90
    caption combinations stay out of training (data_prep.synthetic.heldout_combinations)."""
    from data_prep.encode import EncodeConfig, encode
    from data_prep.shards import imagefolder_to_shards
    from data_prep.synthetic import write_shapes_dataset

    train_dir = os.path.join(output_dir, "train")
    if os.path.exists(os.path.join(train_dir, "metadata.jsonl")):
        check_heldout_split(output_dir, heldout_seed)
    else:
        write_shapes_dataset(output_dir, num_images=num_images, resolution=resolution, seed=seed,
                             heldout_seed=heldout_seed)
    shard_dir = os.path.join(output_dir, "image_shards")
    if not os.path.isdir(shard_dir) or not any(n.endswith(".tar") for n in os.listdir(shard_dir)):
        imagefolder_to_shards(train_dir, shard_dir, samples_per_shard=samples_per_shard)
    latents = latent_dir or os.path.join(output_dir, "latents")
    summary = encode(EncodeConfig(
        input_shards=shard_dir, output_dir=latents, pretrained_model_name_or_path=pretrained_model_name_or_path,
        resolution=resolution, batch_size=batch_size, device=device,
    ))
    return {"train_dir": train_dir, "image_shards": shard_dir, "latents": latents,
            "heldout_prompts": os.path.join(output_dir, "heldout_prompts.jsonl"), "encode": summary}


def check_heldout_split(output_dir: str, heldout_seed: int) -> None:
    """Raise ConfigError (one line) when the dataset already in `output_dir` holds out other caption
    combinations than `heldout_seed` picks: its images would include the prompts to be evaluated as unseen."""
    from data_prep.synthetic import heldout_combinations

    path = os.path.join(output_dir, "heldout_prompts.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            held = {(r["fg"], r["shape"], r["bg"]) for r in map(json.loads, f)}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{output_dir} has a train/ folder but no readable {path} ({type(e).__name__}); "
                          "use a new --output_dir") from None
    if held != set(heldout_combinations(heldout_seed)):
        raise ConfigError(f"{output_dir} holds the shapes data of another held-out split than "
                          f"--heldout_seed {heldout_seed}; use a new --output_dir for this split")


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="pipeline whose VAE/text encoder to run")
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--samples_per_shard", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", choices=("xla", "cpu"), default="xla")
    p.add_argument("--latent_dir", default=None, help="where the latents go (default OUTPUT/latents; gs:// works)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout_seed", type=int, default=0, help="which caption combinations are held out")
    args = p.parse_args(argv)
    result = prepare_shapes_latents(
        args.output_dir, args.pretrained_model_name_or_path, args.num_images, args.resolution,
        args.samples_per_shard, args.device, args.batch_size, args.seed, args.latent_dir, args.heldout_seed,
    )
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(run_cli(main))
