"""Where a step's device time goes, per XLA op kind, with per-tensor state (`--step_graph replay`) and flat
state (`replay_flat`).

bench/host_overhead.py measures flat state's device wait longer than per-tensor state's on this backend
(SD2-base structure / 8: +19% in one run of stop 28, +7.6% in one of stop 29). This bench says which ops make the
difference. Per UNet and step graph, the trainer (latent shards, bf16, `--use_ema`) runs with a device profile
(PROFILE_DIR, the window from `--profile_start_step`) and XLA's per-instruction trace events on
(`--xla_cpu_enable_xprof_traceme=true`). `xplane.op_times` reads the capture: per op kind, the time one device
spends on it in one step. The table lists the kinds whose time differs most between the two layouts, then the
totals. Times are wall time on the op's thread, 4 devices sharing 2 cores: compare the columns, not the absolute
values; the profiler's own cost is in them too.

    .venv/bin/python bench/device_profile.py [--unets sd2-base/8] [--modes replay replay_flat] [--rows 14]
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import command_line, prepare, train_summary, trainer_parser  # noqa: E402
from bench.host_overhead import UNETS, narrow_unet_pipeline  # noqa: E402
from xla_diffusion import xplane  # noqa: E402

MODES = ("replay", "replay_flat")


def _ms(by_mode: dict[str, tuple[xplane.OpTimes, dict]], mode: str, kind: str) -> float:
    return 1e3 * by_mode[mode][0].seconds.get(kind, 0.0)


def main() -> None:
    p = trainer_parser(__doc__, devices=4, num_images=256, steps=14, warmup=6)
    p.add_argument("--unets", nargs="+", default=["sd2-base/8"], choices=list(UNETS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--duration_ms", type=int, default=6000, help="profile window, from the step after --warmup")
    p.add_argument("--rows", type=int, default=14, help="op kinds listed, by the largest difference between modes")
    args = p.parse_args()
    args.devices = args.devices[0]

    work = tempfile.mkdtemp(prefix="bench_device_profile_")
    pipeline, _, latents = prepare(work, args.num_images, args.devices)
    saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", "PROFILE_DIR")}
    results: dict[str, dict[str, tuple[xplane.OpTimes, dict]]] = {}
    for unet in args.unets:
        pipe = pipeline if unet == "tiny" else narrow_unet_pipeline(pipeline, os.path.join(work, "pipeline-sd2"))
        for mode in args.modes:
            name = f"{unet.replace('/', '-')}-{mode}"
            profile_dir = os.path.join(work, "profile-" + name)
            os.environ["XLA_FLAGS"] = f"{saved['XLA_FLAGS'] or ''} --xla_cpu_enable_xprof_traceme=true".strip()
            os.environ["PROFILE_DIR"] = profile_dir
            s = train_summary(latents, pipe, os.path.join(work, "out-" + name), args.steps, args.warmup, args.batch,
                              args.devices, extra=["--step_graph", mode, "--use_ema", "--profile_start_step",
                                                   str(args.warmup + 1), "--profile_duration", str(args.duration_ms)])
            times = xplane.op_times(xplane.latest_capture(profile_dir))
            shutil.rmtree(profile_dir)
            results.setdefault(unet, {})[mode] = (times, s)
            print(f"  {unet}, {mode}: {1e3 * sum(times.seconds.values()):.0f} ms of ops per device-step, "
                  f"{times.runs} device-steps captured", file=sys.stderr, flush=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

    print(command_line())
    print(f"latent shards (tiny VAE, 64 px -> 4x16x16 latents), global batch {args.batch}, bf16, --use_ema, "
          f"{args.devices} CPU devices on {os.cpu_count()} cores; profile from step {args.warmup + 1}, "
          f"{args.duration_ms} ms; ms per device per step, wall time on the op's thread")
    for unet, by_mode in results.items():
        modes = list(by_mode)
        kinds = set().union(*(t.seconds for t, _ in by_mode.values()))
        ms = functools.partial(_ms, by_mode)
        first, last = modes[0], modes[-1]
        rows = sorted(kinds, key=lambda k: -abs(ms(last, k) - ms(first, k)))[:args.rows]
        print()
        print(f"{UNETS[unet]}:")
        print()
        print("| op kind | " + " | ".join(f"`{m}`" for m in modes) + (f" | `{last}` - `{first}` |"
                                                                       if len(modes) > 1 else " |"))
        print("| --- |" + " ---: |" * (len(modes) + (len(modes) > 1)))
        for k in rows:
            diff = f" | {ms(last, k) - ms(first, k):+.1f}" if len(modes) > 1 else ""
            print(f"| {k} | " + " | ".join(f"{ms(m, k):.1f}" for m in modes) + diff + " |")
        totals = [sum(ms(m, k) for k in kinds) for m in modes]
        diff = f" | {totals[-1] - totals[0]:+.1f}" if len(modes) > 1 else ""
        print("| **all ops** | " + " | ".join(f"**{t:.1f}**" for t in totals) + diff + " |")
        steps = [1e3 * by_mode[m][1]["mean_step_time_s"] for m in modes]
        diff = f" | {steps[-1] - steps[0]:+.1f}" if len(modes) > 1 else ""
        print("| the trainer's step time (with the profiler) | " + " | ".join(f"{t:.1f}" for t in steps) + diff
              + " |")


if __name__ == "__main__":
    main()
