"""Score a trained pipeline: every metric whose inputs were given, a table on stdout, and a JSON file.

    python -m eval.evaluate --pipeline DIR --prompts PROMPTS --output scores.json \
        [--reference_dir REAL_IMAGES --inception_weights inception_v3_google-0cc3c7bd.pth] \
        [--clip_model CLIP_FOLDER] [--heldout HELDOUT_IMAGE_FOLDER]

Metrics and what each needs (a metric without its inputs is skipped, and the table says why):
- fid: samples (generated from --prompts, or --samples) + --reference_dir + --inception_weights
- clip_score: samples + --clip_model (a local transformers CLIP folder)
- shapes colour/background/shape accuracy: samples whose prompts are shapes captions ("a red circle on a ...")
- eval_loss (fixed-timestep validation loss) and bits_per_dim: --heldout, an image folder with metadata.jsonl
  ("file_name", "text"), e.g. a split made like data_prep.synthetic's train/
Everything runs on the CPU except sampling, which can use the mesh (--device xla).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch

from eval.common import load_samples
from xla_diffusion.cli import OneLineParser, run_cli
from xla_diffusion.data.config import DataConfig
from xla_diffusion.data.images import ImageCaptionBatches, OrderedImageBatches, load_image_caption_dataset
from xla_diffusion.errors import ConfigError, EvalError
from xla_diffusion.prompts import load_prompt_records

log = logging.getLogger(__name__)


def load_reference_images(path: str, size: tuple[int, int]) -> np.ndarray:
    """Every image (.png/.jpg/.jpeg/.webp) under `path`, sorted by name, as RGB uint8 (N, H, W, 3) resized
    (bilinear) to `size` = (H, W), the size of the samples they are compared with."""
    from PIL import Image

    if not os.path.isdir(path):
        raise EvalError(f"--reference_dir {path}: no such folder")
    names = sorted(
        os.path.join(root, f) for root, _, files in os.walk(path) for f in files
        if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
    )
    if len(names) < 2:
        raise EvalError(f"--reference_dir {path}: FID needs at least 2 images, found {len(names)}")
    return np.stack([
        np.asarray(Image.open(n).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)) for n in names
    ])


def heldout_set(models: Any, path: str, batch_size: int, resolution: int, max_samples: int | None
                ) -> OrderedImageBatches:
    """An image folder with captions → its ordered fixed-size batches (pixel_values, input_ids)."""
    data = DataConfig(dataset_name=None, train_data_dir=path, batch_size=batch_size, resolution=resolution,
                      max_train_samples=max_samples).for_evaluation()
    try:
        ds = load_image_caption_dataset(data)
    except ConfigError as e:
        raise EvalError(f"--heldout: {e}") from None
    if len(ds) < batch_size:
        raise EvalError(f"--heldout {path} has {len(ds)} images, fewer than --batch_size {batch_size}")
    return ImageCaptionBatches(ds, models.tokenizer, data).ordered()


def heldout_metrics(models: Any, heldout: Any, resolution: int, eval_timesteps: int, bpd_timesteps: int | None,
                    seed: int = 0) -> dict[str, float]:
    """Fixed-timestep validation loss and bits/dim of the held-out images (CPU, eager)."""
    from eval.likelihood import bits_per_dim, unet_predictor
    from xla_diffusion.train_step import StepConfig, compute_loss, encode_latents, encode_text
    from xla_diffusion.validation import FixedTimestepBatches, fixed_timesteps, validation_loss

    sched = models.noise_scheduler
    cfg = StepConfig.for_models(models)  # the pipeline's own objective, unweighted
    prediction_type = cfg.prediction_type
    alphas = sched.alphas_cumprod.float()
    timesteps = fixed_timesteps(sched.config.num_train_timesteps, eval_timesteps)
    batches = FixedTimestepBatches(heldout, timesteps, models.latent_shape(resolution), seed=seed)
    unet, vae, te = models.unet.eval(), models.vae.eval(), models.text_encoder.eval()
    with torch.no_grad():
        out = validation_loss(lambda b: compute_loss(unet, vae, te, b, alphas, cfg), batches)
        bpd, n = [], 0
        # One latent per image (its first timestep's batch carries the fixed posterior draw latent_eps).
        for i, (_, batch) in enumerate(batches):
            if i % len(timesteps):
                continue
            x0 = encode_latents(vae, batch, cfg)
            hidden = encode_text(te, batch)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
            r = bits_per_dim(unet_predictor(unet, hidden), x0, alphas, prediction_type, bpd_timesteps, gen)
            bpd.append(r["bpd"])
            n += 1
    out["bits_per_dim"] = float(torch.cat(bpd).mean())
    return out


def build_parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="Diffusers pipeline folder (local, hub id or gs://).")
    p.add_argument("--output", required=True, help="Where the JSON results go.")
    p.add_argument("--prompts", help='Prompts to sample: one per line, or JSON lines with "text".')
    p.add_argument("--samples", help="Score these samples (eval.sample's output) instead of generating.")
    p.add_argument("--samples_dir", help="Where generated samples are written (default: beside --output).")
    p.add_argument("--reference_dir", help="Folder of real images for FID.")
    p.add_argument("--inception_weights", help="torchvision Inception V3 weights file for FID.")
    p.add_argument("--clip_model", help="Local folder with a transformers CLIPModel + CLIPProcessor.")
    p.add_argument("--heldout", help="Image folder with metadata.jsonl (file_name, text) for eval_loss and "
                   "bits_per_dim.")
    p.add_argument("--max_heldout_samples", type=int, default=256)
    p.add_argument("--eval_timesteps", type=int, default=8, help="Timesteps of the validation loss.")
    p.add_argument("--bpd_timesteps", type=int, default=32,
                   help="Stratified timesteps of the bits/dim estimate (0: all of them).")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "xla"], help="Where sampling runs.")
    return p


def format_table(results: dict[str, Any], skipped: dict[str, str]) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in results.items()]
    rows += [(k, f"skipped: {why}") for k, why in skipped.items()]
    width = max(len(k) for k, _ in rows) if rows else 6
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 5}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from eval import metrics as M
    from eval.shapes_score import adherence, parse_caption
    from xla_diffusion.sample_files import sample_records, write_samples
    from xla_diffusion.sampling import SampleOptions, generate, load_sampler_models

    args = build_parser().parse_args(argv)
    if args.prompts and args.samples:
        raise EvalError("pass --prompts (to generate) or --samples (to score existing samples), not both")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    images, records = None, None
    if args.samples:
        images, records = load_samples(args.samples)
    elif args.prompts:
        prompt_records = load_prompt_records(prompt_file=args.prompts)
        opts = SampleOptions(guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                             scheduler=args.scheduler, seed=args.seed, num_images_per_prompt=args.num_images_per_prompt,
                             max_batch_size=args.batch_size)
        sampler, mesh = load_sampler_models(args.pipeline, args.device)
        images = generate(sampler, [r["text"] for r in prompt_records], opts, mesh=mesh)
        records = sample_records(prompt_records, opts)
        samples_dir = args.samples_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), "samples")
        write_samples(samples_dir, images, records)
        results["samples_dir"] = samples_dir
    no_samples = "no samples (pass --prompts or --samples)"
    if images is not None:
        results["num_samples"] = len(images)

    # FID
    if images is None:
        skipped["fid"] = no_samples
    elif not args.reference_dir:
        skipped["fid"] = "no --reference_dir"
    elif not args.inception_weights:
        skipped["fid"] = f"no --inception_weights (pass {M.INCEPTION_HINT})"
    else:
        reference = load_reference_images(args.reference_dir, images.shape[1:3])
        results["fid"] = M.fid(images, reference, M.InceptionFeatures(args.inception_weights))
        results["fid_reference_images"] = len(reference)

    # CLIP score
    if images is None:
        skipped["clip_score"] = no_samples
    elif not args.clip_model:
        skipped["clip_score"] = "no --clip_model"
    else:
        clip = M.ClipEmbedder(args.clip_model)
        results["clip_score"] = M.clip_score(images, [r["text"] for r in records], clip.image_features,
                                             clip.text_features)

    # prompt adherence in the shapes domain
    expected = [parse_caption(r.get("text", "")) for r in records] if records else []
    if images is None:
        skipped["shapes_accuracy"] = no_samples
    elif not expected or any(e is None for e in expected):
        skipped["shapes_accuracy"] = "prompts are not shapes captions ('a COLOUR SHAPE on a COLOUR background')"
    else:
        acc = adherence(images, expected)
        results.update({f"shapes_{k}_accuracy": v for k, v in acc.items() if k != "n"})

    # held-out validation loss and bits/dim
    if not args.heldout:
        skipped["eval_loss"] = skipped["bits_per_dim"] = "no --heldout"
    else:
        from xla_diffusion.models import load_models

        models = load_models(args.pipeline)
        resolution = models.unet.config.sample_size * models.vae_scale
        heldout = heldout_set(models, args.heldout, args.batch_size, resolution, args.max_heldout_samples)
        results.update(heldout_metrics(models, heldout, resolution, args.eval_timesteps, args.bpd_timesteps or None,
                                       seed=args.seed))

    table = format_table(results, skipped)
    print(table)
    out = {"pipeline": args.pipeline, "metrics": results, "skipped": skipped}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, None))
