"""`make demo`: the whole product on one CPU machine, offline, each stage through its real CLI.

1. a tiny Stable Diffusion pipeline (committed trained VAE, random CLIP text encoder and UNet);
2. synthetic captioned shapes → webdataset image shards → pre-encoded latent shards (VAE posterior +
   text states, bf16) on a 4-device CPU mesh;
3. training on the latent shards on a 4-device mesh (GSPMD batch sharding) → diffusers pipeline folder;
4. sampling held-out prompts (prompt combinations never seen in training) with classifier-free guidance
   → a labelled grid PNG, and the pixel-level prompt-adherence scores.

`--preset quality` is the longer run (`make demo-quality`). Run as `python demo.py` (what `make demo` does).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from argparse import RawDescriptionHelpFormatter

from xla_diffusion.cli import OneLineParser, run_cli
from xla_diffusion.errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    # about 5 minutes on 2 cores end to end (4.7 and 5.7 measured for splits 0 and 1; up to 8 when busy);
    # trains as a TPU run would: bf16 compute on the 4-device mesh (GSPMD batch sharding), from latent shards
    "default": {"num_images": 4096, "max_train_steps": 2200, "train_batch_size": 32, "unet": "tiny", "num_devices": 4,
                "mixed_precision": "bf16", "learning_rate": "2e-3"},
    # the longer run: the same UNet on one device in fp32 at the earlier lr, with held-out samples every 500 steps
    # to follow accuracy against training time
    "quality": {"num_images": 4096, "max_train_steps": 3000, "train_batch_size": 32, "unet": "tiny", "num_devices": 1,
                "mixed_precision": "no", "learning_rate": "1e-3", "validation_steps": 500},
}
RESOLUTION = 32
SAMPLES_PER_PROMPT = 16  # 9 held-out prompts: 144 images, so one image moves an accuracy by 0.7 points


def _run(module_or_script: list[str], num_devices: int) -> None:
    """Run one stage as its own process (the device count is fixed when torch_xla starts)."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(num_devices), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               NO_ALBUMENTATIONS_UPDATE="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    print(f"\n$ CPU_NUM_DEVICES={num_devices} python {shlex.join(module_or_script)}", flush=True)
    if subprocess.run([sys.executable, *module_or_script], env=env, cwd=ROOT).returncode:
        raise UserError(f"demo: stage failed: {module_or_script[:2]}")


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=None, help="default: demo_output/ (demo_output_quality/ for quality)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--max_train_steps", type=int, default=None, help="override the preset")
    p.add_argument("--num_devices", type=int, default=None, help="override the preset's CPU device count")
    p.add_argument("--num_images", type=int, default=None, help="override the preset's training-set size")
    p.add_argument("--validation_steps", type=int, default=None, help="override: held-out samples every N steps")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default=None, help="override the preset")
    p.add_argument("--heldout_seed", type=int, default=0,
                   help="which 9 caption combinations are held out of training (0 is the documented split)")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key in ("max_train_steps", "num_images", "validation_steps", "mixed_precision"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    devices = args.num_devices or preset["num_devices"]
    default_out = "demo_output" if args.preset == "default" else "demo_output_quality"
    if args.heldout_seed:  # another split is another dataset: never reuse the shards of the default one
        default_out += f"_heldout{args.heldout_seed}"
    out = args.output_dir or os.path.join(ROOT, default_out)
    data, tiny, model = (os.path.join(out, d) for d in ("data", "tiny-pipeline", "trained-pipeline"))
    samples = os.path.join(out, "samples")
    t0 = time.time()

    from xla_diffusion.tiny import build_tiny_pipeline
    from xla_diffusion.tiny_vae import ASSET_DIR

    build_tiny_pipeline(tiny, seed=0, vae_dir=ASSET_DIR, unet=preset["unet"])
    print(f"[demo] tiny pipeline (trained VAE, '{preset['unet']}' UNet) in {tiny}", flush=True)
    _run(["-m", "data_prep.prepare_shapes", "--output_dir", data, "--pretrained_model_name_or_path", tiny,
          "--num_images", str(preset["num_images"]), "--resolution", str(RESOLUTION),
          "--heldout_seed", str(args.heldout_seed)], devices)
    heldout = os.path.join(data, "heldout_prompts.jsonl")
    validation = []
    if preset.get("validation_steps"):
        validation = ["--validation_prompts", heldout, "--validation_steps", str(preset["validation_steps"]),
                      "--num_validation_images", "4", "--validation_guidance_scale", "4.0"]
    t_train = time.time()
    _run(["train_text_to_image_xla.py", "--pretrained_model_name_or_path", tiny,
          "--train_data_dir", os.path.join(data, "latents"), "--resolution", str(RESOLUTION),
          "--train_batch_size", str(preset["train_batch_size"]), "--max_train_steps", str(preset["max_train_steps"]),
          "--learning_rate", preset["learning_rate"], "--lr_scheduler", "cosine", "--lr_warmup_steps", "100",
          "--prediction_type", "v_prediction", "--snr_gamma", "5.0", "--proportion_empty_prompts", "0.1",
          "--mixed_precision", preset["mixed_precision"], "--logging_steps", "100", "--output_dir", model,
          *validation], devices)
    train_minutes = (time.time() - t_train) / 60
    _run(["-m", "eval.sample", "--pipeline", model, "--prompt_file", heldout,
          "--output_dir", samples, "--num_images_per_prompt", str(SAMPLES_PER_PROMPT), "--guidance_scale", "4.0",
          "--num_inference_steps", "25", "--scheduler", "ddim", "--device", "cpu", "--max_batch_size", "48"], 1)
    score = subprocess.run(
        [sys.executable, "-m", "eval.shapes_score", "--samples", os.path.join(samples, "samples.npz")],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
    )
    if score.returncode:
        raise UserError(f"demo: scoring failed: {score.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(model, "train_summary.json")) as f:
        summary = json.load(f)
    print(
        f"\n[demo] trained {summary['steps']} steps on {summary['num_devices']} devices from latent shards in "
        f"{train_minutes:.1f} min: {summary['mean_step_time_s']:.3f} s/step, {summary['images_per_s']:.1f} "
        f"images/s, {summary['compilations']} XLA compilations, final loss {summary['final_loss']:.4f}"
    )
    print(f"[demo] pipeline (loads with StableDiffusionPipeline.from_pretrained): {model}")
    print(f"[demo] held-out prompt samples: {os.path.join(samples, 'grid.png')}")
    print("[demo] prompt adherence on held-out prompts (pixel-level scorer, eval/shapes_score.py):")
    print(score.stdout.strip())
    curve = validation_curve(model, summary["mean_step_time_s"])
    if curve:
        print("[demo] held-out accuracy during training (in-loop validation samples):")
        print("\n".join(curve))
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} min")


def validation_curve(model_dir: str, seconds_per_step: float) -> list[str]:
    """Score every OUTPUT/validation/step_XXXXXX/samples.npz: one line per step with the training minutes
    it took (steps × mean step time) and the colour / background / shape accuracies."""
    from eval.common import load_samples
    from eval.shapes_score import adherence, expected_attributes

    root = os.path.join(model_dir, "validation")
    lines = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        images, records = load_samples(os.path.join(root, name, "samples.npz"))
        acc = adherence(list(images), [expected_attributes(r) for r in records])
        step = int(name.split("_")[-1])
        lines.append(f"  step {step:5d} (~{step * seconds_per_step / 60:4.1f} training min): colour "
                     f"{100 * acc['colour']:.0f}%, background {100 * acc['background']:.0f}%, "
                     f"shape {100 * acc['shape']:.0f}%")
    return lines


if __name__ == "__main__":
    sys.exit(run_cli(main))
