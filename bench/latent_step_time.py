"""Training step time with pre-encoded latent shards vs on-the-fly encoding (VAE + text encoder in the step).

Same tiny pipeline, same synthetic shapes (64 px, center crop), global batch 16, bf16, on a 4-device CPU
mesh; the trainer CLI is run once per data path and reports the wall-clock mean over the steps after
warm-up (train_summary.json). Prints a markdown table and the command that made it.

    .venv/bin/python bench/latent_step_time.py [--steps 30] [--warmup 5] [--devices 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_env(devices: int) -> dict[str, str]:
    return dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", NO_ALBUMENTATIONS_UPDATE="1",
                GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", PYTHONPATH=ROOT)


def train_summary(data: str, pipeline: str, out: str, steps: int, warmup: int, batch: int, devices: int) -> dict:
    """Run the trainer CLI on `data` (image folder or latent dataset) and return its train_summary.json."""
    cmd = [
        sys.executable, os.path.join(ROOT, "train_text_to_image_xla.py"),
        "--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "64",
        "--center_crop", "--train_batch_size", str(batch), "--max_train_steps", str(steps),
        "--timing_warmup_steps", str(warmup), "--logging_steps", str(steps), "--mixed_precision", "bf16",
        "--output_dir", out,
    ]
    subprocess.run(cmd, env=cpu_env(devices), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "train_summary.json")) as f:
        return json.load(f)


def prepare(work: str, num_images: int, devices: int) -> tuple[str, str, str]:
    """(pipeline, image folder, latent dataset) under `work`; latents encoded on the CPU mesh."""
    from xla_diffusion.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline(os.path.join(work, "pipeline"), seed=0)
    cmd = [sys.executable, "-m", "data_prep.prepare_shapes", "--output_dir", os.path.join(work, "data"),
           "--pretrained_model_name_or_path", pipeline, "--num_images", str(num_images), "--samples_per_shard", "64"]
    subprocess.run(cmd, env=cpu_env(devices), cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return pipeline, os.path.join(work, "data", "train"), os.path.join(work, "data", "latents")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="global batch (one host)")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--num_images", type=int, default=512)
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench_latent_step_")
    pipeline, images, latents = prepare(work, args.num_images, args.devices)
    rows = []
    for name, data in (("on-the-fly encoding (images)", images), ("pre-encoded latent shards", latents)):
        s = train_summary(data, pipeline, os.path.join(work, "out-" + name.split()[0]), args.steps, args.warmup,
                          args.batch, args.devices)
        rows.append((name, s))
        print(f"  {name}: {s['mean_step_time_s']:.3f} s/step", file=sys.stderr, flush=True)
    base = rows[0][1]["mean_step_time_s"]
    print(f"command: python bench/latent_step_time.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    print(f"tiny pipeline, 64 px, global batch {args.batch}, bf16, {args.devices} CPU devices; "
          f"mean of steps {args.warmup + 1}..{args.steps}")
    print()
    print("| data path | encoders in the step | step time (s) | images/s | speed-up | XLA compilations |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, s in rows:
        encoders = "VAE + text encoder" if s["data"] == "images" else "none"
        print(f"| {name} | {encoders} | {s['mean_step_time_s']:.3f} | {s['images_per_s']:.1f} | "
              f"{base / s['mean_step_time_s']:.2f}x | {s['compilations']} |")


if __name__ == "__main__":
    main()
