"""`make demo`: synthetic shapes → tiny pipeline → train on a 4-device CPU mesh → export → load with
StableDiffusionPipeline.from_pretrained → a labelled PNG grid of samples.

Everything is made offline; the training itself is the real CLI, run as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary(folder: str) -> dict:
    with open(os.path.join(folder, "train_summary.json")) as f:
        return json.load(f)


def _run_trainer(args: list[str], num_devices: int) -> None:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(num_devices), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(ROOT, "train_text_to_image_xla.py"), *args]
    print(f"$ CPU_NUM_DEVICES={num_devices} python train_text_to_image_xla.py {' '.join(args)}", flush=True)
    if subprocess.run(cmd, env=env).returncode:
        raise SystemExit("demo: training failed (see the error above)")


def sample_grid(pipeline_dir: str, prompts: list[str], out_png: str, seed: int = 0, steps: int = 30) -> str:
    """Load the exported folder with diffusers and sample one 64 px image per prompt on the CPU."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from eval.grid import labelled_grid

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompts, num_inference_steps=steps, height=64, width=64, guidance_scale=4.0, output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images
    labelled_grid(list(images), prompts, cols=4).save(out_png)
    return out_png


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output_dir", default=os.path.join(ROOT, "demo_output"))
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--num_devices", type=int, default=4)
    args = p.parse_args(argv)

    from data_prep.synthetic import write_shapes_dataset
    from xla_diffusion.tiny import build_tiny_pipeline

    t0 = time.time()
    data_dir, tiny_dir = os.path.join(args.output_dir, "data"), os.path.join(args.output_dir, "tiny-pipeline")
    model_dir = os.path.join(args.output_dir, "trained-pipeline")
    if not os.path.exists(os.path.join(data_dir, "train", "metadata.jsonl")):
        write_shapes_dataset(data_dir, num_images=args.num_images, resolution=64, seed=0)
    print(f"[demo] {args.num_images} synthetic shape images in {data_dir}", flush=True)
    build_tiny_pipeline(tiny_dir, seed=0)
    print(f"[demo] tiny Stable Diffusion pipeline in {tiny_dir}", flush=True)
    _run_trainer(
        [
            "--pretrained_model_name_or_path", tiny_dir, "--train_data_dir", os.path.join(data_dir, "train"),
            "--resolution", "64", "--center_crop", "--train_batch_size", str(args.train_batch_size),
            "--max_train_steps", str(args.max_train_steps), "--learning_rate", "1e-3", "--mixed_precision", "bf16",
            "--snr_gamma", "5.0", "--logging_steps", "25", "--output_dir", model_dir,
        ],
        args.num_devices,
    )
    summary = _summary(model_dir)
    with open(os.path.join(data_dir, "heldout_prompts.jsonl")) as f:
        heldout = [json.loads(line)["text"] for line in f if line.strip()][:4]
    prompts = heldout + [
        "a red circle on a blue background", "a yellow square on a black background",
        "a white triangle on a green background", "a blue circle on a yellow background",
    ]
    grid = sample_grid(model_dir, prompts, os.path.join(args.output_dir, "samples.png"))
    print(
        f"[demo] trained {summary['steps']} steps on {summary['num_devices']} devices: "
        f"{summary['mean_step_time_s']:.3f} s/step, {summary['images_per_s']:.1f} images/s, "
        f"{summary['compilations']} XLA compilations, final loss {summary['final_loss']:.4f}",
        flush=True,
    )
    print(f"[demo] pipeline: {model_dir}")
    print(f"[demo] samples (first row: held-out prompts): {grid}")
    print(f"[demo] done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
