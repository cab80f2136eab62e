"""Latent-shard loader throughput (samples/s) from local disk and from a GCS emulator, next to the rate at
which the trainer consumes samples.

The loader is the trainer's own (`LatentShardBatches`: shards split over workers, shuffle buffer, endless
resampling, fixed-shape batches of 16), timed over `--batches` batches after the first (which waits for
the shuffle buffer to fill). The consumption rate is the trainer's images/s on the same latents (tiny
pipeline, 64 px, global batch 16, bf16, 4 CPU devices, steps after warm-up). The emulator is a
single-threaded Python HTTP server on loopback: its numbers bound the reader's overhead, not GCS's.

    .venv/bin/python bench/latent_loader.py [--batches 200] [--workers 0 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.common import command_line, prepare, train_summary  # noqa: E402


def loader_rate(root: str, workers: int, batches: int, batch: int) -> float:
    """Samples/s of the trainer's latent reader over `batches` batches after the first."""
    from xla_diffusion.data.latents import LatentShardBatches, read_manifest

    source = LatentShardBatches(read_manifest(root), batch, num_workers=workers, shuffle_buffer=1000, seed=0)
    it = iter(source)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="trainer steps for the consumption rate")
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    from tests.gcs_emulator import make_bucket, start_emulator
    from xla_diffusion import fsio

    work = tempfile.mkdtemp(prefix="bench_latent_loader_")
    pipeline, _, latents = prepare(work, args.num_images, devices=4)
    emulator = start_emulator()
    try:
        remote = make_bucket("bench") + "/latents"
        fs, path = fsio.url_to_fs(remote)
        fs.put(latents.rstrip("/") + "/", path, recursive=True)
        rows = []
        for where, root in (("local disk", latents), ("GCS emulator (loopback)", remote)):
            for w in args.workers:
                rate = loader_rate(root, w, args.batches, args.batch)
                rows.append((where, w, rate))
                print(f"  {where}, {w} workers: {rate:.0f} samples/s", file=sys.stderr, flush=True)
        s = train_summary(remote, pipeline, os.path.join(work, "train"), args.steps, args.warmup, args.batch, 4)
    finally:
        emulator.stop()
    consumption = s["images_per_s"]
    print(command_line())
    print(f"{args.num_images} samples in {len(fsio.list_files(latents, '.tar'))} shards (4x16x16 latents + 16x32 "
          f"text states, bf16); batch {args.batch}; shuffle buffer 1000; {args.batches} batches after the first")
    print()
    print("| source | loader workers | loader samples/s | trainer consumes (samples/s) | loader / trainer |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for where, w, rate in rows:
        print(f"| {where} | {w} | {rate:.0f} | {consumption:.1f} | {rate / consumption:.0f}x |")
    print()
    print(f"trainer: tiny pipeline, 64 px, global batch {args.batch}, bf16, 4 CPU devices, latents read from the "
          f"emulator, mean of steps {args.warmup + 1}..{args.steps}: {s['mean_step_time_s']:.3f} s/step")


if __name__ == "__main__":
    main()
