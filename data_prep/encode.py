"""Image shards → latent shards: run the frozen VAE encoder (and text encoder) once, so training runs only
the UNet.

Input: webdataset image shards as img2dataset writes them (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`;
see data_prep/download.py, or data_prep/shards.py for an imagefolder). Output, per input shard `NAME.tar`,
a latent shard `NAME.tar` (format in xla_diffusion/data/latents.py) plus `NAME.stats.json`, and at the
output root `manifest.json` and `empty_prompt.safetensors`. Local folders and gs:// work alike.

- Preprocessing is the trainer's on-the-fly one with --center_crop (resize the shorter side, center crop),
  so training on latents sees what training on images with --center_crop sees.
- The encoders run on the XLA device mesh with the batch sharded over all devices (one compiled graph:
  every batch is padded to the same shape), or eagerly on the CPU with --device cpu.
- Work split: the job takes input shards `shard_index::num_shards` (for any batch scheduler), and every
  process of a multi-host runtime its own `process_index::process_count` of those.
- Idempotent and resumable: a shard is written to a temporary file and published by rename (local) or by a
  finished upload (GCS), its stats file after it; a rerun skips shards whose stats file exists. Batches
  never span two shards, so a shard's bytes do not depend on which other shards the run had to do.
- Bad samples (undecodable image, unsupported mode, too small, missing or empty caption, corrupt tar
  member) are skipped and counted per shard in `NAME.stats.json`; the manifest sums them.

The input side lives in data_prep/encode_input.py, the output side (shards, stats, manifest) in
data_prep/encode_output.py; this module holds the config, the encoders and the run.

Usage:
    python -m data_prep.encode --input_shards gs://bucket/images --output_dir gs://bucket/latents \\
        --pretrained_model_name_or_path PIPELINE --resolution 512 --batch_size 64 [--device cpu]
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from data_prep.encode_config import EncodeConfig
from data_prep.encode_input import BatchMaker, LocalBatch, ShardEnd, list_input_shards, shards_for_job
from data_prep.encode_output import (
    STATS_SUFFIX,
    OutputShards,
    build_manifest,
    check_compatible,
    stats_path,
    update_manifest_counts,
    write_empty_prompt,
)
from xla_diffusion import fsio, runtime
from xla_diffusion.cli import run_cli
from xla_diffusion.config import parse_args
from xla_diffusion.data.latents import EMPTY_PROMPT, MANIFEST
from xla_diffusion.errors import ConfigError

log = logging.getLogger("data_prep.encode")


class Encoders:
    """The VAE encoder (+ text encoder) as one function of a padded global batch, on the XLA mesh with the
    batch sharded, or eagerly on the CPU. Outputs come back as this process's rows, on the host."""

    def __init__(self, models: Any, cfg: EncodeConfig, rt: Any | None):
        dtype = torch.bfloat16 if cfg.encoder_precision == "bf16" else torch.float32
        self.rt, self.store_text, self.local_batch = rt, not cfg.no_text_states, cfg.batch_size
        self.device = rt.device if rt is not None else torch.device("cpu")
        self.vae = runtime.place_frozen(models.vae, dtype, self.device)
        self.text_encoder = runtime.place_frozen(models.text_encoder, dtype, self.device) if self.store_text else None

    def _send(self, batch: LocalBatch) -> list[torch.Tensor]:
        tensors = [batch.pixels, batch.input_ids, batch.valid]
        if self.rt is None:
            return tensors
        # Each process supplies its own rows of the global batch.
        return [runtime.to_mesh(t, self.rt.mesh) for t in tensors]

    def submit(self, batch: LocalBatch) -> dict[str, torch.Tensor]:
        """Start encoding (asynchronous on XLA): `latent_mean`, `latent_std` (B, C, h, w) bf16,
        `encoder_hidden_states` (B, L, D) bf16 when stored, and `total_valid` (global count of real rows)."""
        pixels, input_ids, valid = self._send(batch)
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
            out = {"latent_mean": posterior.mean.to(torch.bfloat16), "latent_std": posterior.std.to(torch.bfloat16)}
            if self.text_encoder is not None:
                out["encoder_hidden_states"] = self.text_encoder(input_ids, return_dict=False)[0].to(torch.bfloat16)
            # Summed over the global batch: every process learns whether any process still had data.
            out["total_valid"] = valid.sum()
        if self.rt is not None:
            for t in out.values():
                runtime.mark_batch_sharded(t, self.rt.mesh)
            runtime.sync()
        return out

    def fetch(self, out: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        """(global number of valid rows, this process's rows of every output on the CPU)."""
        total = int(out["total_valid"].cpu())
        return total, {k: self._local_rows(t) for k, t in out.items() if k != "total_valid"}

    def _local_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rt is None else runtime.local_rows(t, self.rt, self.local_batch)


def run_rounds(encoders: Encoders, next_batch: Any, store: Any) -> None:
    """Lock-step rounds: every process submits one local batch per round (padding once it has run out),
    and all stop after the first round in which no process had data, so multi-host runs stay in step.
    Round k+1 is submitted before round k's results are fetched, overlapping device and host work."""
    batch = next_batch()
    pending = encoders.submit(batch)
    while True:
        following = next_batch()
        following_pending = encoders.submit(following)
        total, rows = encoders.fetch(pending)
        if total == 0:
            return
        store(batch, rows)
        batch, pending = following, following_pending


def _prefetch(gen: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run a host generator in a thread, `depth` items ahead, so decoding overlaps device work."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for x in gen:
                q.put(x)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        x = q.get()
        if x is done:
            return
        if isinstance(x, BaseException):
            raise x
        yield x


def encode(cfg: EncodeConfig) -> dict[str, Any]:
    """Encode this process's share of the input shards; returns a summary (counts, throughput)."""
    from transformers import CLIPTextConfig

    from xla_diffusion.models import load_models, resolve_model_path

    t0 = time.perf_counter()
    inputs = list_input_shards(cfg.input_shards)
    rt = runtime.init_runtime(fsdp_size=1) if cfg.device == "xla" else None
    process_index, process_count = (rt.process_index, rt.process_count) if rt else (0, 1)
    if rt is not None and (cfg.batch_size * process_count) % rt.num_devices:
        raise ConfigError(
            f"--batch_size {cfg.batch_size} x {process_count} processes is not divisible by the {rt.num_devices} "
            "devices of the mesh"
        )
    mine = shards_for_job(inputs, cfg.num_shards, cfg.shard_index, process_index, process_count)
    outputs = {s: fsio.join(cfg.output_dir, os.path.basename(s)) for s in mine}
    if any(os.path.normpath(s) == os.path.normpath(o) for s, o in outputs.items()):
        raise ConfigError("--output_dir is the folder of the input shards; the latent shards would replace them")
    done = set(fsio.list_files(cfg.output_dir, STATS_SUFFIX))  # one listing, not one request per shard
    todo = [s for s in mine if stats_path(outputs[s]) not in done]

    models = load_models(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.cache_dir,
                         load_unet=False, load_text_encoder=not cfg.no_text_states)
    source = resolve_model_path(cfg.pretrained_model_name_or_path, cfg.cache_dir)
    text_hidden = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", revision=cfg.revision).hidden_size
    manifest = build_manifest(cfg, models, text_hidden)
    manifest_path = fsio.join(cfg.output_dir, MANIFEST)
    fsio.makedirs(cfg.output_dir)
    if fsio.exists(manifest_path):
        check_compatible(fsio.read_json(manifest_path), manifest, cfg.output_dir)
    elif process_index == 0:
        fsio.write_json_atomic(manifest_path, manifest)
    if process_index == 0 and not fsio.exists(fsio.join(cfg.output_dir, EMPTY_PROMPT)):
        write_empty_prompt(fsio.join(cfg.output_dir, EMPTY_PROMPT), models, not cfg.no_text_states)
    log.info("process %d/%d: %d input shards for this process, %d already done, %d to encode",
             process_index, process_count, len(mine), len(mine) - len(todo), len(todo))

    maker = BatchMaker(cfg, models.tokenizer, torch.bfloat16 if cfg.encoder_precision == "bf16" else torch.float32)
    batches = _prefetch(b for s in todo for b in maker.shard_batches(s))
    out = OutputShards(outputs)

    def next_batch() -> LocalBatch:
        # Shards without a single usable sample are finished on the spot; an exhausted process pads.
        for b in batches:
            if isinstance(b, ShardEnd):
                out.finish_shard(b.shard, b.stats)
                continue
            return b
        return maker.padding()

    # A single process with nothing left to do (a rerun) skips the rounds and their compilation; on a
    # multi-host runtime every process takes part in every round, with or without data.
    if todo or process_count > 1:
        try:
            run_rounds(Encoders(models, cfg, rt), next_batch, out.store)
            if rt is not None:
                runtime.wait_device_ops()
        except BaseException:
            out.abort()
            raise
    t_end = time.perf_counter()
    if process_index == 0:
        update_manifest_counts(cfg.output_dir)
    steady = t_end - out.t_first if out.t_first is not None else 0.0
    return {
        "output_dir": cfg.output_dir,
        "process_index": process_index,
        "process_count": process_count,
        "input_shards": len(inputs),
        "shards_for_this_process": len(mine),
        "shards_skipped_done": len(mine) - len(todo),
        "shards_written": out.shards_done,
        "samples_written": out.written,
        "samples_skipped": dict(sorted(out.skipped.items())),
        "wall_time_s": t_end - t0,
        # Excludes model loading and the first batch (graph compilation on XLA).
        "images_per_s": (out.written - out.written_at_first) / steady if steady > 0 else None,
        "device": cfg.device,
    }


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(encode(parse_args(argv, cls=EncodeConfig)), sort_keys=True))


if __name__ == "__main__":
    sys.exit(run_cli(main))
