"""The output side of data_prep/encode.py: latent shards, their stats files and the dataset's manifest.

ShardWriter (one shard, published atomically, its stats file last), OutputShards (the shards in progress and
the run's counts), the manifest (written once, checked for compatibility on reruns, re-summed at the end) and
the empty prompt's tensors.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from data_prep.encode_input import Item, LocalBatch
from xla_diffusion import fsio
from xla_diffusion.data.latents import FORMAT, FORMAT_VERSION, MANIFEST
from xla_diffusion.errors import ConfigError

if TYPE_CHECKING:
    from data_prep.encode_config import EncodeConfig

STATS_SUFFIX = ".stats.json"
# Manifest fields that must agree between runs writing into one output folder.
COMPATIBLE_FIELDS = (
    "pretrained_model_name_or_path", "revision", "variant", "resolution", "min_image_size", "text_states",
    "latent_shape", "text_shape", "encoder_precision", "vae", "text_encoder",
)


class ShardWriter:
    """Collects one output shard in a local temporary tar, then publishes it and its stats."""

    def __init__(self, dest: str):
        import webdataset as wds

        self.dest = dest
        self.tmp = fsio.local_tmp_for(dest)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish/abort)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)

    def add(self, item: Item, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save as save_safetensors

        payload = save_safetensors({k: v.contiguous().clone() for k, v in tensors.items()})
        self._tar.write({"__key__": item.key, "safetensors": payload, "txt": item.caption.encode("utf-8"),
                         "json": json.dumps(item.meta, sort_keys=True).encode("utf-8")})

    def finish(self, stats: dict[str, Any]) -> None:
        self._tar.close()
        self._file.close()
        fsio.publish_file(self.tmp, self.dest)
        # Written last: its presence is what marks the shard done for a rerun.
        fsio.write_json_atomic(stats_path(self.dest), stats)

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def stats_path(shard: str) -> str:
    return shard[: -len(".tar")] + STATS_SUFFIX


class OutputShards:
    """The output side of a run: one ShardWriter per shard in progress, and the counts."""

    def __init__(self, outputs: dict[str, str]):
        self.outputs = outputs  # input shard → output shard path
        self.writers: dict[str, ShardWriter] = {}
        self.written = self.shards_done = self.written_at_first = 0
        self.skipped: Counter = Counter()
        self.t_first: float | None = None  # when the first batch was stored (compilation is over by then)

    def finish_shard(self, shard: str, stats: dict[str, Any]) -> None:
        writer = self.writers.pop(shard, None) or ShardWriter(self.outputs[shard])
        writer.finish(stats)
        self.skipped.update(stats["skipped"])
        self.shards_done += 1

    def store(self, batch: LocalBatch, rows: dict[str, torch.Tensor]) -> None:
        """Write the batch's real rows (`rows`: this process's rows of every encoder output)."""
        if batch.items:
            writer = self.writers.get(batch.shard)
            if writer is None:
                writer = self.writers[batch.shard] = ShardWriter(self.outputs[batch.shard])
            for i, item in enumerate(batch.items):
                tensors = {k: v[i] for k, v in rows.items()}
                tensors["input_ids"] = batch.input_ids[i].to(torch.int32)
                writer.add(item, tensors)
            self.written += len(batch.items)
        if batch.shard_stats is not None:
            self.finish_shard(batch.shard, batch.shard_stats)
        if self.t_first is None:
            self.t_first, self.written_at_first = time.perf_counter(), self.written

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def build_manifest(cfg: EncodeConfig, models: Any, text_hidden: int) -> dict[str, Any]:
    vae_cfg = models.vae.config
    length = models.tokenizer.model_max_length
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
        "revision": cfg.revision,
        "variant": cfg.variant,
        "vae": {
            "id": f"{cfg.pretrained_model_name_or_path}/vae",
            "latent_channels": int(vae_cfg.latent_channels),
            "downsampling_factor": models.vae_scale,
            "scaling_factor": float(vae_cfg.scaling_factor),
            "shift_factor": None if getattr(vae_cfg, "shift_factor", None) is None else float(vae_cfg.shift_factor),
        },
        "text_encoder": {
            "id": f"{cfg.pretrained_model_name_or_path}/text_encoder",
            "hidden_size": text_hidden,
            "max_length": length,
            "output": "last_hidden_state",
        },
        "resolution": cfg.resolution,
        "preprocessing": "resize shorter side (bilinear) + center crop; [-1, 1]",
        "min_image_size": cfg.min_image_size,
        "latent_shape": list(models.latent_shape(cfg.resolution)),
        "text_shape": [length, text_hidden],
        "text_states": not cfg.no_text_states,
        "dtype": "bfloat16",
        "encoder_precision": cfg.encoder_precision,
        "sample_tensors": ["latent_mean", "latent_std", "input_ids"]
        + ([] if cfg.no_text_states else ["encoder_hidden_states"]),
    }


def check_compatible(existing: dict[str, Any], new: dict[str, Any], output_dir: str) -> None:
    for k in COMPATIBLE_FIELDS:
        if existing.get(k) != new.get(k):
            raise ConfigError(
                f"{output_dir} already holds latents made with {k}={existing.get(k)!r}, not {new.get(k)!r}; "
                "use another --output_dir"
            )


def update_manifest_counts(output_dir: str) -> dict[str, Any]:
    """Re-sum the per-shard stats into the manifest (every run ends with this; a last rerun that finds
    everything done therefore leaves exact totals even when several jobs finished at once)."""
    manifest = fsio.read_json(fsio.join(output_dir, MANIFEST))
    skipped: Counter = Counter()
    shards = samples = seen = 0
    for path in fsio.list_files(output_dir, STATS_SUFFIX):
        s = fsio.read_json(path)
        shards += 1
        samples += s["samples_written"]
        seen += s["samples_seen"]
        skipped.update(s["skipped"])
    manifest["counts"] = {"shards": shards, "samples": samples, "samples_seen": seen,
                          "skipped": dict(sorted(skipped.items()))}
    fsio.write_json_atomic(fsio.join(output_dir, MANIFEST), manifest)
    return manifest


def write_empty_prompt(path: str, models: Any, store_text: bool) -> None:
    """Token ids (and text states) of the empty caption, for caption dropout / classifier-free guidance."""
    from safetensors.torch import save as save_safetensors

    from xla_diffusion.data.images import tokenize

    ids = tokenize(models.tokenizer, [""])
    tensors = {"input_ids": ids[0].to(torch.int32)}
    if store_text:
        with torch.no_grad():
            hidden = models.text_encoder.float()(ids, return_dict=False)[0][0]
        tensors["encoder_hidden_states"] = hidden.to(torch.bfloat16)
    fsio.write_bytes_atomic(path, save_safetensors(tensors))
