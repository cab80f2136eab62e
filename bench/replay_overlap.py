"""Does the host overlap the devices when the step is replayed? The trainer's step time with `StepReplay`
holding the outputs of its last `replay.HELD_STEPS` steps (the default) against holding none.

Why it matters: re-pointing the state at step n's outputs drops the last reference to step n-1's outputs,
which are the buffers step n (still running) was given as donated inputs, and releasing such a buffer waits
for the graph that consumed it. Held for a step longer, the release happens once that graph is done, so the
host's work for the next step (closures, next batch, next launch) runs while the devices compute instead of
after them.

Runs the trainer CLI (tiny pipeline, latent shards, 64 px, global batch 16, bf16, `--use_ema`, a 4-device CPU
mesh), alternating the two variants `--repeats` times in one run (absolute times drift with load; compare
within a pair). Two numbers per run: the trainer's mean step time, and how long the host spends pointing the
state at each replayed step's outputs (`StepReplay._adopt`, wall time: where it blocked). Here host and
"devices" are the same two CPU cores, so a host that no longer blocks still takes its CPU time from XLA's
execution threads: the step time cannot show the overlap. On a TPU host, idle while the chips compute, the
host's per-step work hides behind the step instead of adding to it.

    .venv/bin/python bench/replay_overlap.py [--steps 120] [--warmup 10] [--repeats 2]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import command_line, prepare, train_summary, trainer_parser  # noqa: E402

VARIANTS = {
    "held": ("", "outputs of the last 2 steps held (the default)"),
    "none": ("r.HELD_STEPS = 0", "no outputs held (until stop 21)"),
}

# Run in the trainer's process before the script: time `StepReplay._adopt` (pointing the state tensors at a
# step's outputs, where the host blocked until the devices were done) and write the times out at exit.
ADOPT_TIMER = """
import atexit, json, time
import xla_diffusion.replay as r
{variant}
_adopt, _times = r.StepReplay._adopt, []
def _timed(self, *a):
    t0 = time.perf_counter()
    try:
        return _adopt(self, *a)
    finally:
        _times.append(time.perf_counter() - t0)
r.StepReplay._adopt = _timed
atexit.register(lambda: json.dump(_times, open({path!r}, "w")))
"""


def main() -> None:
    # long runs, so that each run's mean settles (runs of the same code differ by up to ~10% here)
    p = trainer_parser(__doc__, devices=4, num_images=256, steps=120, warmup=10)
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs, alternating the variants")
    args = p.parse_args()
    args.devices = args.devices[0]

    work = tempfile.mkdtemp(prefix="bench_replay_overlap_")
    pipeline, _, latents = prepare(work, args.num_images, args.devices)
    rows = []
    for pair in range(1, args.repeats + 1):
        times = {}
        for name, (variant, _) in VARIANTS.items():
            adopt_file = os.path.join(work, f"adopt-{pair}-{name}.json")
            s = train_summary(latents, pipeline, os.path.join(work, f"out-{pair}-{name}"), args.steps, args.warmup,
                              args.batch, args.devices, extra=["--use_ema"],
                              before=ADOPT_TIMER.format(variant=variant, path=adopt_file))
            if not s["replayed_steps"]:
                raise SystemExit(f"{name}: the step was not replayed; nothing to compare")
            with open(adopt_file) as f:
                # the first 2 calls are the recordings'; then the replayed steps, warm-up left out
                adopt = json.load(f)[2 + args.warmup:]
            times[name] = s["mean_step_time_s"], statistics.median(adopt), max(adopt)
            print(f"  pair {pair}, {name}: {times[name][0]:.3f} s/step, re-pointing {1e3 * times[name][1]:.1f} ms "
                  "(median)", file=sys.stderr, flush=True)
        rows.append(times)
    print(command_line())
    print(f"tiny pipeline, latent shards, 64 px, global batch {args.batch}, bf16, --use_ema, {args.devices} CPU "
          f"devices; mean step time of steps {args.warmup + 1}..{args.steps} (the trainer's own); load average at "
          f"the end {os.getloadavg()[0]:.1f}")
    print()
    print("| pair | outputs held | step time (s) | re-pointing the state, median (ms) | re-pointing, max (ms) "
          "| step time held / none |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for pair, t in enumerate(rows, 1):
        for name, (_, label) in VARIANTS.items():
            step, median, worst = t[name]
            ratio = f"{t['held'][0] / t['none'][0]:.3f}" if name == "none" else ""
            print(f"| {pair} | {label} | {step:.3f} | {1e3 * median:.1f} | {1e3 * worst:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
