"""Generate images from a trained pipeline folder with classifier-free guidance.

    python -m eval.sample --pipeline DIR --prompt "a red circle on a blue background; a white square on a \
        black background" --output_dir OUT [--scheduler ddim] [--num_inference_steps 25] [--guidance_scale 7.5]

Writes OUT/images/NNNNN.png, OUT/grid.png (labelled), OUT/samples.npz (`images` uint8 (N, H, W, 3),
`prompts` (N,), `prompt_index` (N,)) and OUT/prompts.jsonl (one record per sample). The sampling loop (fixed
shapes on the SPMD mesh, per-sample seeds) is the library's, `xla_diffusion.sampling`, the one the trainer's
in-loop validation runs.
"""

from __future__ import annotations

import logging

from xla_diffusion.cli import OneLineParser, run_cli
from xla_diffusion.prompts import load_prompt_records
from xla_diffusion.sample_files import sample_records, write_samples
from xla_diffusion.sampling import SCHEDULERS, SampleOptions, generate, load_sampler_models

log = logging.getLogger(__name__)


def build_parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="Diffusers pipeline folder (local, hub id or gs://).")
    p.add_argument("--prompt", help='Prompts separated by ";", e.g. "a red circle; a blue square".')
    p.add_argument("--prompt_file", help='One prompt per line, or JSON lines with a "text" field.')
    p.add_argument("--output_dir", required=True, help="Where images, grid.png, samples.npz go (local or gs://).")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance; <= 1 is unguided.")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    p.add_argument("--seed", type=int, default=0, help="Sample i's noise is seeded by (seed, i).")
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--max_batch_size", type=int, default=8,
                   help="Samples per batch (on xla rounded up to a multiple of the device count).")
    p.add_argument("--height", type=int, help="Image height in pixels (default: the model's native size).")
    p.add_argument("--width", type=int, help="Image width in pixels (default: the model's native size).")
    p.add_argument("--device", default="cpu", choices=["cpu", "xla"],
                   help="cpu: eager PyTorch; xla: the SPMD mesh over every device, batch sharded.")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    p.add_argument("--grid_cols", type=int, default=8)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    records = load_prompt_records(args.prompt, args.prompt_file)
    opts = SampleOptions(
        guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps, scheduler=args.scheduler,
        seed=args.seed, num_images_per_prompt=args.num_images_per_prompt, max_batch_size=args.max_batch_size,
        height=args.height, width=args.width, bf16=args.mixed_precision == "bf16",
    )
    models, mesh = load_sampler_models(args.pipeline, args.device, opts.bf16)
    models.image_size(opts)  # a bad size fails before any sampling
    images = generate(
        models, [r["text"] for r in records], opts, mesh=mesh,
        progress=lambda done, total: log.info("sampled %d/%d", done, total),
    )
    paths = write_samples(args.output_dir, images, sample_records(records, opts), grid_cols=args.grid_cols)
    print(f"{len(images)} samples of {images.shape[1]}x{images.shape[2]} px: grid {paths['grid']}, "
          f"arrays {paths['npz']}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, None))
