"""How far a resumed bf16 run lands from the uninterrupted one (fp32 is bitwise equal: tests/test_resume.py).

Run A trains `--steps` bf16 steps on the 4-device CPU mesh (tiny pipeline, 64 px shapes, EMA, caption dropout,
warm-up + cosine lr) with a checkpoint every `--steps // 2`. Run B starts from a copy of A's middle
checkpoint (`--resume_from_checkpoint latest`: what a relaunch after kill -9 or SIGTERM does) and trains the
rest. Printed: per tensor group (UNet fp32 master weights, AdamW state, EMA) the largest absolute difference
and the relative L2 difference of the final checkpoints, and the largest difference of the logged losses.

    .venv/bin/python bench/resume_bf16.py [--steps 8] [--data images|latents]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import command_line, cpu_env, prepare  # noqa: E402


def run(args: list[str], log: str) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "train_text_to_image_xla.py", *args], env=cpu_env(4), cwd=ROOT,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: the run failed (exit {proc.returncode}); see {log}")


def tensors(out: str, step: int) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from xla_diffusion import checkpoint

    target = os.path.join(out, f"step_{step}.pt")
    dcp_to_torch_save(checkpoint.step_dir(out, step), target)
    return checkpoint.flat_tensors(torch.load(target))


def losses(out: str) -> dict[int, float]:
    from xla_diffusion import fsio

    return {r["step"]: r["loss"] for r in fsio.read_jsonl(os.path.join(out, "logs", "metrics.jsonl"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--data", choices=("images", "latents"), default="images")
    a = p.parse_args()
    half = a.steps // 2
    work = tempfile.mkdtemp(prefix="resume_bf16_")
    try:
        pipeline, images, latents = prepare(work, 64, 4)
        common = ["--pretrained_model_name_or_path", pipeline, "--train_data_dir",
                  images if a.data == "images" else latents, "--resolution", "64", "--center_crop",
                  "--train_batch_size", "8", "--max_train_steps", str(a.steps), "--seed", "3",
                  "--mixed_precision", "bf16", "--use_ema", "--proportion_empty_prompts", "0.2",
                  "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3",
                  "--logging_steps", "1", "--checkpointing_steps", str(half), "--report_to", "none",
                  "--resume_from_checkpoint", "latest"]
        straight, resumed = os.path.join(work, "straight"), os.path.join(work, "resumed")
        run(common + ["--output_dir", straight], os.path.join(work, "straight.log"))
        os.makedirs(os.path.join(resumed, "checkpoints"))
        name = f"step_{half:08d}"
        shutil.copytree(os.path.join(straight, "checkpoints", name), os.path.join(resumed, "checkpoints", name))
        run(common + ["--output_dir", resumed], os.path.join(work, "resumed.log"))
        ta, tb = tensors(straight, a.steps), tensors(resumed, a.steps)
        print(command_line())
        print(f"bf16, {a.data}, {a.steps} steps straight vs resumed at step {half} (4 CPU devices)\n")
        print("| tensors | count | max abs difference | relative L2 difference |")
        print("| --- | --- | --- | --- |")
        for group, label in (("module", "UNet fp32 master weights"), ("optimizer", "AdamW moments and step"),
                             ("ema", "EMA shadows")):
            keys = [k for k in ta if k.startswith(group + ".")]
            diff = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in keys)
            num = sum(float(((ta[k].double() - tb[k].double()) ** 2).sum()) for k in keys)
            den = sum(float((ta[k].double() ** 2).sum()) for k in keys)
            print(f"| {label} | {len(keys)} | {diff:.3g} | {(num / den) ** 0.5 if den else 0.0:.3g} |")
        la, lb = losses(straight), losses(resumed)
        shared = sorted(set(la) & set(lb) - set(range(half + 1)))
        worst = max(abs(la[s] - lb[s]) for s in shared)
        print(f"\nlogged losses of steps {shared[0]}..{shared[-1]}: largest difference {worst:.3g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
