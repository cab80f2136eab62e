"""Encode throughput (images/s): data_prep/encode.py on synthetic 64 px image shards with the tiny pipeline,
on the XLA CPU mesh (batch sharded over the devices) and eagerly on the CPU.

Each configuration is one run of the real CLI into a fresh folder. images/s counts the steady state: from
the first stored batch (after model loading and graph compilation) to the end; wall time is the whole run
inside the process. Prints a markdown table and the command that made it.

    .venv/bin/python bench/encode_throughput.py [--num_images 1024] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import ROOT, command_line, cpu_env  # noqa: E402


def run(shards: str, out: str, pipeline: str, device: str, devices: int, batch: int, text: bool) -> dict:
    cmd = [sys.executable, "-m", "data_prep.encode", "--input_shards", shards, "--output_dir", out,
           "--pretrained_model_name_or_path", pipeline, "--resolution", "64", "--batch_size", str(batch),
           "--device", device] + ([] if text else ["--no_text_states"])
    r = subprocess.run(cmd, env=cpu_env(devices), cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    from data_prep.shards import imagefolder_to_shards
    from data_prep.synthetic import write_shapes_dataset
    from xla_diffusion.tiny import build_tiny_pipeline

    work = tempfile.mkdtemp(prefix="bench_encode_")
    pipeline = build_tiny_pipeline(os.path.join(work, "pipeline"), seed=0)
    write_shapes_dataset(os.path.join(work, "data"), num_images=args.num_images, resolution=64, seed=0)
    shards = os.path.join(work, "image_shards")
    imagefolder_to_shards(os.path.join(work, "data", "train"), shards, samples_per_shard=128)
    configs = [("xla", 4, True), ("xla", 4, False), ("xla", 1, True), ("cpu", 1, True)]
    rows = []
    for i, (device, n, text) in enumerate(configs):
        s = run(shards, os.path.join(work, f"latents{i}"), pipeline, device, n, args.batch, text)
        assert s["samples_written"] == args.num_images, s
        rows.append((device, n, text, s))
        print(f"  {device} x{n} text={text}: {s['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    print(command_line())
    print(f"tiny pipeline (VAE f=4, CLIP text 2x32), {args.num_images} images of 64 px in 128-image shards, "
          f"batch {args.batch}, fp32 encoders, bf16 outputs, local disk")
    print()
    print("| device | CPU devices | text states | images/s (steady) | wall time (s) |")
    print("| --- | ---: | --- | ---: | ---: |")
    for device, n, text, s in rows:
        name = "XLA mesh, batch sharded" if device == "xla" else "CPU eager (--device cpu)"
        print(f"| {name} | {n} | {'yes' if text else 'no'} | {s['images_per_s']:.1f} | {s['wall_time_s']:.1f} |")


if __name__ == "__main__":
    main()
