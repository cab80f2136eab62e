"""What every benchmark shares: the CPU-mesh environment of a subprocess, the tiny pipeline and shapes data,
one trainer run read back from its train_summary.json, and the command line printed above each table."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def cpu_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess on a `devices`-device CPU mesh, offline."""
    return dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", NO_ALBUMENTATIONS_UPDATE="1",
                GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", PYTHONPATH=ROOT)


def train_summary(data: str, pipeline: str, out: str, steps: int, warmup: int, batch: int, devices: int,
                  extra: list[str] | None = None, before: str | None = None) -> dict:
    """Run the trainer CLI (64 px, center crop, bf16) on `data` (image folder or latent dataset) and return its
    train_summary.json; the mean step time is the trainer's own, over the steps after `warmup`. `before`:
    Python source run in the trainer's process before the script (a bench's variant of a module constant)."""
    script = os.path.join(ROOT, "train_text_to_image_xla.py")
    if before is None:
        runner = [sys.executable, script]
    else:
        run_script = f"import runpy, sys\nsys.argv[0] = {script!r}\nrunpy.run_path({script!r}, run_name='__main__')"
        runner = [sys.executable, "-c", f"{before}\n{run_script}"]
    cmd = [
        *runner,
        "--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "64",
        "--center_crop", "--train_batch_size", str(batch), "--max_train_steps", str(steps),
        "--timing_warmup_steps", str(warmup), "--logging_steps", str(steps), "--mixed_precision", "bf16",
        "--output_dir", out, *(extra or []),
    ]
    subprocess.run(cmd, env=cpu_env(devices), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "train_summary.json")) as f:
        return json.load(f)


def tiny_pipeline(work: str) -> str:
    """The tiny SD pipeline (seed 0) under `work`."""
    from xla_diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(os.path.join(work, "pipeline"), seed=0)


def prepare(work: str, num_images: int, devices: int) -> tuple[str, str, str]:
    """(pipeline, image folder, latent dataset) under `work`: 64 px shapes, latents encoded on the CPU mesh."""
    pipeline = tiny_pipeline(work)
    cmd = [sys.executable, "-m", "data_prep.prepare_shapes", "--output_dir", os.path.join(work, "data"),
           "--pretrained_model_name_or_path", pipeline, "--num_images", str(num_images), "--samples_per_shard", "64"]
    subprocess.run(cmd, env=cpu_env(devices), cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return pipeline, os.path.join(work, "data", "train"), os.path.join(work, "data", "latents")


def trainer_parser(doc: str, devices: int, num_images: int | None = None, steps: int = 30,
                   warmup: int = 5) -> argparse.ArgumentParser:
    """The flags of the benchmarks that time trainer runs (steps, warm-up, batch, device count)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--batch", type=int, default=16, help="global batch (one host)")
    p.add_argument("--devices", type=int, nargs="+", default=[devices])
    if num_images is not None:
        p.add_argument("--num_images", type=int, default=num_images)
    return p


def command_line() -> str:
    """'command: python bench/NAME.py ARGS' for the running benchmark, printed above its table."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return f"command: python {script} {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip()
