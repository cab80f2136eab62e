"""Training step time of the tiny pipeline at 64 px, global batch 16, bf16, on 1 and 4 CPU devices.

Runs the real CLI once per device count (each run builds its own graphs) and prints a markdown table
with the command that made it. Step time is the wall-clock mean over the steps after warm-up, measured
between two device syncs by the trainer itself (train_summary.json).

    .venv/bin/python bench/step_time.py [--steps 30] [--warmup 5] [--devices 1 4]
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


def run(devices: int, pipeline: str, data: str, out: str, steps: int, warmup: int, batch: int) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    cmd = [
        sys.executable, os.path.join(ROOT, "train_text_to_image_xla.py"),
        "--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "64",
        "--center_crop", "--train_batch_size", str(batch), "--max_train_steps", str(steps),
        "--timing_warmup_steps", str(warmup), "--logging_steps", str(steps), "--mixed_precision", "bf16",
        "--output_dir", out,
    ]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "train_summary.json")) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="global batch (one host)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()

    from data_prep.synthetic import write_shapes_dataset
    from xla_diffusion.tiny import build_tiny_pipeline

    work = tempfile.mkdtemp(prefix="bench_step_time_")
    pipeline = build_tiny_pipeline(os.path.join(work, "pipeline"), seed=0)
    write_shapes_dataset(os.path.join(work, "data"), num_images=256, resolution=64, seed=0)
    rows = []
    for n in args.devices:
        s = run(n, pipeline, os.path.join(work, "data", "train"), os.path.join(work, f"out{n}"), args.steps,
                args.warmup, args.batch)
        rows.append((n, s))
        print(f"  {n} device(s): {s['mean_step_time_s']:.3f} s/step", file=sys.stderr, flush=True)
    print(f"command: python bench/step_time.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    print(f"tiny pipeline, 64 px, global batch {args.batch}, bf16; mean of steps {args.warmup + 1}..{args.steps}")
    print()
    print("| CPU devices | step time (s) | images/s | XLA compilations |")
    print("| ---: | ---: | ---: | ---: |")
    for n, s in rows:
        print(f"| {n} | {s['mean_step_time_s']:.3f} | {s['images_per_s']:.1f} | {s['compilations']} |")


if __name__ == "__main__":
    main()
