"""Buffer donation in the replayed step: what the compiled step copies when XLA gives a state input's memory to
another state tensor's new value, and what it costs the step.

torch_xla marks the state's buffers (weights, AdamW moments, EMA shadows, step count) as donors. XLA's
OptimizeInputOutputBufferAlias pass then gives each donor to an output of the same byte size: donors in
parameter order against outputs in output order, whatever the data flow. A weight, its two moments and its EMA
shadow all have one size, so a pair can be crossed (exp_avg's memory for exp_avg_sq's new value), and XLA then
copies both every step. Since stop 28 the recorded graph returns the state in the order of its buffers'
parameter numbers (`donation.donation_order`), which makes every pair right. With flat state one more copy
remained, of the whole weights buffer: the loss, an output the update does not depend on, read a bias straight
from that buffer. Since stop 28 the loss and the gradients pass through a barrier before the update
(`train_step.FLAT_LOSS_BARRIER`).

For each UNet (`--unets`) and step graph (`--modes`), the trainer (latent shards, bf16, `--use_ema`) runs as it
is (the default) and with both turned off (`replay.ORDER_FOR_DONATION = False`, `train_step.FLAT_LOSS_BARRIER =
False`: as until stop 28), alternating, with XLA's HLO dumps on. Per run, per device, read from the step
graph's optimized HLO and buffer assignment: the bytes its entry computation copies (`hlo.entry_copy_bytes`),
the donated state, its temporaries and all it allocates; and the trainer's mean step time after the warm-up.

    .venv/bin/python bench/donation.py [--unets tiny sd2-base/8] [--modes replay replay_flat] [--steps 20]
        [--warmup 5] [--repeat 1]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import command_line, prepare, train_summary, trainer_parser  # noqa: E402
from bench.host_overhead import UNETS, narrow_unet_pipeline  # noqa: E402
from xla_diffusion import hlo  # noqa: E402

ORDERS = {True: "since stop 28 (the default)", False: "until stop 28"}
UNTIL_STOP_28 = ("import xla_diffusion.replay as r\nimport xla_diffusion.train_step as t\n"
                 "r.ORDER_FOR_DONATION = False\nt.FLAT_LOSS_BARRIER = False")
MODES = ("replay", "replay_flat")


def main() -> None:
    p = trainer_parser(__doc__, devices=4, num_images=256, steps=20, warmup=5)
    p.add_argument("--unets", nargs="+", default=list(UNETS), choices=list(UNETS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    args.devices = args.devices[0]

    work = tempfile.mkdtemp(prefix="bench_donation_")
    pipeline, _, latents = prepare(work, args.num_images, args.devices)
    flags = os.environ.get("XLA_FLAGS", "")
    rows = []
    for unet in args.unets:
        pipe = pipeline if unet == "tiny" else narrow_unet_pipeline(pipeline, os.path.join(work, "pipeline-sd2"))
        for mode in args.modes:
            for k in range(args.repeat):
                for ordered in (True, False):
                    name = f"{unet.replace('/', '-')}-{mode}-{ordered}-{k}"
                    dump = os.path.join(work, "dump-" + name)
                    os.environ["XLA_FLAGS"] = (flags + " " + hlo.hlo_dump_flags(dump)).strip()
                    before = None if ordered else UNTIL_STOP_28
                    s = train_summary(latents, pipe, os.path.join(work, "out-" + name), args.steps, args.warmup,
                                      args.batch, args.devices, extra=["--step_graph", mode, "--use_ema"],
                                      before=before)
                    module = hlo.step_module(dump)
                    memory = hlo.buffer_assignment_bytes(module.buffer_assignment)
                    text = module.hlo_text
                    row = (unet, mode, ordered, hlo.entry_copy_bytes(text), hlo.donated_bytes(text), memory, s)
                    shutil.rmtree(dump)  # XLA's CPU dumps hold the LLVM IR of every kernel: hundreds of MB
                    rows.append(row)
                    print(f"  {unet}, {mode}, {ORDERS[ordered]}: copies {row[3] / 1e6:.1f} MB, "
                          f"{s['mean_step_time_s']:.3f} s/step", file=sys.stderr, flush=True)
    os.environ["XLA_FLAGS"] = flags
    print(command_line())
    print(f"latent shards (tiny VAE, 64 px -> 4x16x16 latents), global batch {args.batch}, bf16, --use_ema, "
          f"{args.devices} CPU devices; the trainer's mean step time over steps {args.warmup + 1}..{args.steps}; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print("Per device, MB: what the step graph's entry computation copies, the state it donates, its temporaries "
          "and all it allocates (XLA's buffer assignment)")
    print()
    print("| UNet | step graph | donation and barrier | copied per step | donated state | temporaries | allocated "
          "| step time (s) | vs. since stop 28 | XLA compilations |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ordered_time = {}
    for unet, mode, ordered, copied, donated, memory, s in rows:
        key = (unet, mode)
        if ordered:
            ordered_time[key] = s["mean_step_time_s"]
        ratio = s["mean_step_time_s"] / ordered_time[key] if key in ordered_time else float("nan")
        print(f"| {UNETS[unet]} | `{mode}` | {ORDERS[ordered]} | {copied / 1e6:.1f} | {donated / 1e6:.1f} "
              f"| {memory['temp'] / 1e6:.1f} | {memory['total'] / 1e6:.1f} | {s['mean_step_time_s']:.3f} "
              f"| {ratio:.2f}x | {s['compilations']} |")


if __name__ == "__main__":
    main()
