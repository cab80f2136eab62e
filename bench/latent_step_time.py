"""Training step time with pre-encoded latent shards vs on-the-fly encoding (VAE + text encoder in the step),
and on latent shards with the step graph replayed (the default) vs traced every step (--step_graph trace).

Same tiny pipeline, same synthetic shapes (64 px, center crop), global batch 16, bf16, on a 4-device CPU
mesh; the trainer CLI is run once per data path and reports the wall-clock mean over the steps after
warm-up (train_summary.json). Prints a markdown table and the command that made it.

    .venv/bin/python bench/latent_step_time.py [--steps 30] [--warmup 5] [--devices 4]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import command_line, prepare, train_summary, trainer_parser  # noqa: E402


def main() -> None:
    args = trainer_parser(__doc__, devices=4, num_images=512).parse_args()
    args.devices = args.devices[0]

    work = tempfile.mkdtemp(prefix="bench_latent_step_")
    pipeline, images, latents = prepare(work, args.num_images, args.devices)
    rows = []
    for i, (name, data, step_graph) in enumerate((
            ("on-the-fly encoding (images)", images, "replay"), ("pre-encoded latent shards", latents, "replay"),
            ("pre-encoded latent shards", latents, "trace"))):
        s = train_summary(data, pipeline, os.path.join(work, f"out-{i}"), args.steps, args.warmup,
                          args.batch, args.devices, extra=["--step_graph", step_graph])
        rows.append((name, s))
        print(f"  {name}: {s['mean_step_time_s']:.3f} s/step", file=sys.stderr, flush=True)
    base = rows[0][1]["mean_step_time_s"]
    print(command_line())
    print(f"tiny pipeline, 64 px, global batch {args.batch}, bf16, {args.devices} CPU devices; "
          f"mean of steps {args.warmup + 1}..{args.steps}")
    print()
    print("| data path | encoders in the step | step graph | step time (s) | images/s | speed-up | XLA compilations |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name, s in rows:
        encoders = "VAE + text encoder" if s["data"] == "images" else "none"
        graph = f"replayed from step 3 ({s['replayed_steps']} steps)" if s["replayed_steps"] else "traced every step"
        print(f"| {name} | {encoders} | {graph} | {s['mean_step_time_s']:.3f} | {s['images_per_s']:.1f} | "
              f"{base / s['mean_step_time_s']:.2f}x | {s['compilations']} |")


if __name__ == "__main__":
    main()
