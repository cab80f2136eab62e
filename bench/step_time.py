"""Training step time of the tiny pipeline at 64 px, global batch 16, bf16, on 1 and 4 CPU devices.

Runs the real CLI once per device count (each run builds its own graphs) and prints a markdown table
with the command that made it. Step time is the wall-clock mean over the steps after warm-up, measured
between two device syncs by the trainer itself (train_summary.json).

    .venv/bin/python bench/step_time.py [--steps 30] [--warmup 5] [--devices 1 4]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import command_line, tiny_pipeline, train_summary, trainer_parser  # noqa: E402


def main() -> None:
    p = trainer_parser(__doc__, devices=4)
    p.set_defaults(devices=[1, 4])
    args = p.parse_args()

    from data_prep.synthetic import write_shapes_dataset

    work = tempfile.mkdtemp(prefix="bench_step_time_")
    pipeline = tiny_pipeline(work)
    write_shapes_dataset(os.path.join(work, "data"), num_images=256, resolution=64, seed=0)
    rows = []
    for n in args.devices:
        s = train_summary(os.path.join(work, "data", "train"), pipeline, os.path.join(work, f"out{n}"), args.steps,
                          args.warmup, args.batch, n)
        rows.append((n, s))
        print(f"  {n} device(s): {s['mean_step_time_s']:.3f} s/step", file=sys.stderr, flush=True)
    print(command_line())
    print(f"tiny pipeline, 64 px, global batch {args.batch}, bf16; mean of steps {args.warmup + 1}..{args.steps}")
    print()
    print("| CPU devices | step time (s) | images/s | XLA compilations |")
    print("| ---: | ---: | ---: | ---: |")
    for n, s in rows:
        print(f"| {n} | {s['mean_step_time_s']:.3f} | {s['images_per_s']:.1f} | {s['compilations']} |")


if __name__ == "__main__":
    main()
