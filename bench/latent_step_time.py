"""Training step time with pre-encoded latent shards vs on-the-fly encoding (VAE + text encoder in the step),
and on latent shards with the step graph replayed per tensor (--step_graph replay) vs traced every step
(--step_graph trace) vs replayed with the state in flat buffers (--step_graph replay_flat, the default).

Same tiny pipeline, same synthetic shapes (64 px, center crop), global batch 16, bf16, on a 4-device CPU
mesh; the trainer CLI is run once per data path and reports the wall-clock mean over the steps after
warm-up (train_summary.json). Prints a markdown table and the command that made it.

    .venv/bin/python bench/latent_step_time.py [--steps 30] [--warmup 5] [--devices 4] [--batch 16]
        [--use_ema] [--rows images replay trace replay_flat] [--repeat 1]

`--rows` picks the runs (`images`: on-the-fly encoding, replayed; the others: latent shards with that
--step_graph); `--repeat N` runs each N times, interleaved, for a ratio that does not ride on one run's noise.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import command_line, prepare, train_summary, trainer_parser  # noqa: E402


def main() -> None:
    p = trainer_parser(__doc__, devices=4, num_images=512)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--use_ema", action="store_true", help="train with --use_ema (the demo does)")
    args = p.parse_args()
    args.devices = args.devices[0]

    work = tempfile.mkdtemp(prefix="bench_latent_step_")
    pipeline, images, latents = prepare(work, args.num_images, args.devices)
    rows = []
    for k in range(args.repeat):
        for row in args.rows:
            name, step_graph = ROWS[row]
            s = train_summary(images if row == "images" else latents, pipeline, os.path.join(work, f"out-{row}-{k}"),
                              args.steps, args.warmup, args.batch, args.devices,
                              extra=["--step_graph", step_graph] + (["--use_ema"] if args.use_ema else []))
            rows.append((name, step_graph, s))
            print(f"  {name}, {step_graph}: {s['mean_step_time_s']:.3f} s/step", file=sys.stderr, flush=True)
    base = rows[0][2]["mean_step_time_s"]
    print(command_line())
    print(f"tiny pipeline, 64 px, global batch {args.batch}, bf16{', --use_ema' if args.use_ema else ''}, "
          f"{args.devices} CPU devices; mean of steps {args.warmup + 1}..{args.steps}")
    print()
    print("| data path | encoders in the step | step graph | step time (s) | images/s | vs. the first row "
          "| XLA compilations |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name, step_graph, s in rows:
        encoders = "VAE + text encoder" if s["data"] == "images" else "none"
        graph = (f"`{step_graph}`: replayed from step 3 ({s['replayed_steps']} steps)" if s["replayed_steps"]
                 else "traced every step")
        print(f"| {name} | {encoders} | {graph} | {s['mean_step_time_s']:.3f} | {s['images_per_s']:.1f} | "
              f"{base / s['mean_step_time_s']:.2f}x | {s['compilations']} |")


ROWS = {"images": ("on-the-fly encoding (images)", "replay"), "replay": ("pre-encoded latent shards", "replay"),
        "trace": ("pre-encoded latent shards", "trace"), "replay_flat": ("pre-encoded latent shards", "replay_flat")}


if __name__ == "__main__":
    main()
