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

Usage:
    python -m data_prep.encode --input_shards gs://bucket/images --output_dir gs://bucket/latents \\
        --pretrained_model_name_or_path PIPELINE --resolution 512 --batch_size 64 [--device cpu]
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from xla_diffusion import fsio
from xla_diffusion.config import ConfigError, _opt, parse_args
from xla_diffusion.data.latents import EMPTY_PROMPT, FORMAT, FORMAT_VERSION, MANIFEST
from xla_diffusion.data.tar_stream import iter_tar_samples

log = logging.getLogger("data_prep.encode")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# PIL modes that convert to RGB meaningfully (16-bit / float modes would be clipped into garbage).
RGB_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "La", "P", "PA", "CMYK", "YCbCr", "1"}
STATS_SUFFIX = ".stats.json"
# Manifest fields that must agree between runs writing into one output folder.
COMPATIBLE_FIELDS = (
    "pretrained_model_name_or_path", "revision", "variant", "resolution", "min_image_size", "text_states",
    "latent_shape", "text_shape", "encoder_precision", "vae", "text_encoder",
)


@dataclass(kw_only=True)
class EncodeConfig:
    """Encode image shards into latent shards (VAE posterior + text encoder states, bf16)."""

    input_shards: str = _opt(
        None, "Image shards: a folder (every *.tar in it), a glob, or a brace list like "
        "'gs://b/images/{00000..00099}.tar'; local or gs://.", required=True,
    )
    output_dir: str = _opt(None, "Where the latent shards and manifest.json go (local or gs://).", required=True)
    pretrained_model_name_or_path: str = _opt(
        None, "Diffusers pipeline whose VAE and text encoder to run (hub id, folder, gs://).", required=True
    )
    revision: str | None = _opt(None, "Revision of the pipeline on the hub.")
    variant: str | None = _opt(None, "Variant of the model files, e.g. fp16.")
    cache_dir: str | None = _opt(None, "Where downloaded models are cached.")
    resolution: int = _opt(512, "Images are resized (shorter side) and center-cropped to this square size.")
    min_image_size: int | None = _opt(
        None, "Skip images whose shorter side is below this (default: --resolution, i.e. never upscale)."
    )
    batch_size: int = _opt(
        32, "Images per encoder batch on this process; with several processes the global batch is this times "
        "their number, sharded over all devices (it must divide evenly)."
    )
    no_text_states: bool = _opt(
        False, "Store only token ids, not the text encoder's hidden states (the trainer then runs the text "
        "encoder in the step)."
    )
    num_shards: int = _opt(1, "Split the input shards into this many jobs (e.g. a batch scheduler's array size).")
    shard_index: int = _opt(0, "Which of the --num_shards jobs this is (0-based).")
    device: Literal["xla", "cpu"] = _opt("xla", "xla: the device mesh, batch sharded; cpu: eager on the host.",
                                         choices=("xla", "cpu"))
    encoder_precision: Literal["fp32", "bf16"] = _opt(
        "fp32", "Weights and compute dtype of the encoders (outputs are stored in bf16 either way).",
        choices=("fp32", "bf16"),
    )

    def __post_init__(self) -> None:
        if self.min_image_size is None:
            self.min_image_size = self.resolution
        checks = [
            (self.resolution < 8 or self.resolution % 8, "--resolution must be a positive multiple of 8"),
            (self.batch_size < 1, "--batch_size must be >= 1"),
            (self.num_shards < 1, "--num_shards must be >= 1"),
            (not 0 <= self.shard_index < self.num_shards, "--shard_index must be in [0, --num_shards)"),
            (self.min_image_size < 0, "--min_image_size must be >= 0"),
        ]
        for bad, message in checks:
            if bad:
                raise ConfigError(message)


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is its counter name in the shard stats."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def list_input_shards(spec: str) -> list[str]:
    """Full paths of the input shards: a folder's *.tar, a glob, or a brace list (webdataset notation)."""
    import braceexpand

    paths: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        fs, p = fsio.url_to_fs(pattern)
        prefix = pattern[: pattern.index("://") + 3] if fsio.is_remote(pattern) else ""
        if any(c in p for c in "*?["):
            paths += [prefix + m for m in sorted(fs.glob(p)) if m.endswith(".tar")]
        elif fs.isdir(p):
            paths += fsio.list_files(pattern, ".tar")
        elif fs.exists(p):
            paths.append(pattern)
        else:
            raise ConfigError(f"--input_shards: {pattern} does not exist")
    if not paths:
        raise ConfigError(f"--input_shards {spec!r} matches no .tar shard")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"--input_shards: two input shards are named {dup}; output shards keep input names")
    return paths


def shards_for_job(shards: list[str], num_shards: int, shard_index: int, process_index: int,
                   process_count: int) -> list[str]:
    """The input shards this process encodes: the job's part, then this process's part of that."""
    return shards[shard_index::num_shards][process_index::process_count]


def decode_image(sample: dict[str, Any], min_size: int) -> tuple[Any, tuple[int, int]]:
    """The sample's image as an RGB PIL image and its original (width, height); raises SkipSample."""
    from PIL import Image

    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise SkipSample("missing_image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # noqa: BLE001 (PIL raises many types for bad bytes; every one means "undecodable")
        raise SkipSample("bad_image") from None
    if image.mode not in RGB_CONVERTIBLE_MODES:
        raise SkipSample("bad_mode")
    if min(image.size) < max(min_size, 1):
        raise SkipSample("too_small")
    return image.convert("RGB"), image.size


def read_caption(sample: dict[str, Any]) -> str:
    if "txt" not in sample:
        raise SkipSample("missing_caption")
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample("bad_caption") from None
    if not caption:
        raise SkipSample("empty_caption")
    return caption


@dataclass
class Item:
    key: str
    caption: str
    meta: dict[str, Any]


@dataclass
class LocalBatch:
    """One process's part of a global batch: `pixels` (B, 3, R, R), `input_ids` (B, L) and `valid` (B,),
    padded to B; `items` describe the first len(items) rows. `shard_stats` is set on a shard's last batch."""

    shard: str
    items: list[Item]
    pixels: torch.Tensor
    input_ids: torch.Tensor
    valid: torch.Tensor
    shard_stats: dict[str, Any] | None = None


@dataclass
class ShardEnd:
    """A shard that yielded no sample at all (its stats still get written, so a rerun skips it)."""

    shard: str
    stats: dict[str, Any] = field(default_factory=dict)


class BatchMaker:
    """Input shards → LocalBatches (host side: read, decode, validate, preprocess, tokenize)."""

    def __init__(self, cfg: EncodeConfig, tokenizer: Any, pixel_dtype: torch.dtype):
        from xla_diffusion.data.images import image_transform

        self.cfg, self.tokenizer, self.pixel_dtype = cfg, tokenizer, pixel_dtype
        # The trainer's own transform with --center_crop: latents match on-the-fly encoding exactly.
        self.transform = image_transform(cfg.resolution, center_crop=True, random_flip=False)
        self.length = tokenizer.model_max_length

    def padding(self) -> LocalBatch:
        b, r = self.cfg.batch_size, self.cfg.resolution
        return LocalBatch("", [], torch.zeros(b, 3, r, r, dtype=self.pixel_dtype),
                          torch.zeros(b, self.length, dtype=torch.long), torch.zeros(b, dtype=torch.int32))

    def _batch(self, shard: str, items: list[Item], pixels: list[torch.Tensor]) -> LocalBatch:
        from xla_diffusion.data.images import tokenize

        batch = self.padding()
        batch.shard, batch.items = shard, items
        batch.pixels[: len(items)] = torch.stack(pixels).to(self.pixel_dtype)
        batch.input_ids[: len(items)] = tokenize(self.tokenizer, [it.caption for it in items])
        batch.valid[: len(items)] = 1
        return batch

    def shard_batches(self, shard: str) -> Iterator[LocalBatch | ShardEnd]:
        errors: Counter = Counter()
        seen = ok = 0
        items: list[Item] = []
        pixels: list[torch.Tensor] = []
        held: LocalBatch | None = None  # a full batch, held until we know whether the shard goes on
        fs, path = fsio.url_to_fs(shard)
        with fs.open(path, "rb") as f:
            for sample in iter_tar_samples(f, errors):
                seen += 1
                try:
                    caption = read_caption(sample)
                    image, (w, h) = decode_image(sample, self.cfg.min_image_size)
                    source_meta = json.loads(sample["json"]) if "json" in sample else {}
                except SkipSample as e:
                    errors[e.reason] += 1
                    continue
                except ValueError:
                    errors["bad_json"] += 1
                    continue
                meta = {"key": sample["__key__"], "source": os.path.basename(shard), "original_width": w,
                        "original_height": h}
                if isinstance(source_meta, dict) and "url" in source_meta:
                    meta["url"] = source_meta["url"]
                if held is not None:
                    yield held
                    held = None
                items.append(Item(sample["__key__"], caption, meta))
                pixels.append(self.transform(image))
                ok += 1
                if len(items) == self.cfg.batch_size:
                    held, items, pixels = self._batch(shard, items, pixels), [], []
        # A corrupt member or a cut-off shard loses files, not whole samples: those are counted on their
        # own, and the samples they leave incomplete are counted again under the reason they fail with.
        stats = {"source": os.path.basename(shard), "samples_seen": seen, "samples_written": ok,
                 "skipped": dict(sorted(errors.items()))}
        if items:
            if held is not None:
                yield held
            held = self._batch(shard, items, pixels)
        if held is None:
            yield ShardEnd(shard, stats)
        else:
            held.shard_stats = stats
            yield held


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


class Encoders:
    """The VAE encoder (+ text encoder) as one function of a padded global batch, on the XLA mesh with the
    batch sharded, or eagerly on the CPU. Outputs come back as this process's rows, on the host."""

    def __init__(self, models: Any, cfg: EncodeConfig, rt: Any | None):
        dtype = torch.bfloat16 if cfg.encoder_precision == "bf16" else torch.float32
        self.rt, self.store_text, self.local_batch = rt, not cfg.no_text_states, cfg.batch_size
        self.device = rt.device if rt is not None else torch.device("cpu")
        # Cast on the host: a cast on the device would be one more graph.
        self.vae = models.vae.to(dtype=dtype).to(self.device)
        self.text_encoder = models.text_encoder.to(dtype=dtype).to(self.device) if self.store_text else None
        self.dtype = dtype

    def _send(self, batch: LocalBatch) -> list[torch.Tensor]:
        tensors = [batch.pixels, batch.input_ids, batch.valid]
        if self.rt is None:
            return tensors
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.spmd as xs

        from xla_diffusion import runtime

        out = []
        for t in tensors:
            # minibatch: each process supplies its own rows of the global batch (multi-host).
            spec = xs.ShardingSpec(self.rt.mesh, (runtime.BATCH_AXES,) + (None,) * (t.ndim - 1),
                                   minibatch=self.rt.process_count > 1)
            out.append(xm.send_cpu_data_to_device([t], self.device, spec)[0])
        return out

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
            import torch_xla.distributed.spmd as xs

            from xla_diffusion import runtime

            for t in out.values():
                if t.ndim:
                    xs.mark_sharding(t, self.rt.mesh, (runtime.BATCH_AXES,) + (None,) * (t.ndim - 1))
            runtime.sync()
        return out

    def fetch(self, out: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        """(global number of valid rows, this process's rows of every output on the CPU)."""
        total = int(out["total_valid"].cpu())
        return total, {k: self._local_rows(t) for k, t in out.items() if k != "total_valid"}

    def _local_rows(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt is None:
            return t
        from torch_xla.distributed.spmd.xla_sharding import wrap_as_sharded_tensor

        # Only this host's shards are addressable on a multi-host runtime; they are its rows, in order.
        shards = wrap_as_sharded_tensor(t).local_shards
        if any(s.indices is Ellipsis for s in shards):  # replicated (a 1-device mesh): every row, everywhere
            b = self.local_batch
            return shards[0].data[self.rt.process_index * b : (self.rt.process_index + 1) * b]
        by_start: dict[int, torch.Tensor] = {}
        for s in shards:
            by_start.setdefault(s.indices[0].start or 0, s.data)
        return torch.cat([by_start[k] for k in sorted(by_start)])


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


def _manifest(cfg: EncodeConfig, models: Any, text_hidden: int) -> dict[str, Any]:
    vae_cfg = models.vae.config
    scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
    side = cfg.resolution // scale
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
            "downsampling_factor": scale,
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
        "latent_shape": [int(vae_cfg.latent_channels), side, side],
        "text_shape": [length, text_hidden],
        "text_states": not cfg.no_text_states,
        "dtype": "bfloat16",
        "encoder_precision": cfg.encoder_precision,
        "sample_tensors": ["latent_mean", "latent_std", "input_ids"]
        + ([] if cfg.no_text_states else ["encoder_hidden_states"]),
    }


def _check_compatible(existing: dict[str, Any], new: dict[str, Any], output_dir: str) -> None:
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


def _write_empty_prompt(path: str, models: Any, store_text: bool) -> None:
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

    from xla_diffusion import runtime
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
    manifest = _manifest(cfg, models, text_hidden)
    manifest_path = fsio.join(cfg.output_dir, MANIFEST)
    fsio.makedirs(cfg.output_dir)
    if fsio.exists(manifest_path):
        _check_compatible(fsio.read_json(manifest_path), manifest, cfg.output_dir)
    elif process_index == 0:
        fsio.write_json_atomic(manifest_path, manifest)
    if process_index == 0 and not fsio.exists(fsio.join(cfg.output_dir, EMPTY_PROMPT)):
        _write_empty_prompt(fsio.join(cfg.output_dir, EMPTY_PROMPT), models, not cfg.no_text_states)
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


def main(argv: list[str] | None = None) -> int:
    from xla_diffusion.models import ModelLoadError

    cfg = parse_args(argv, cls=EncodeConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = encode(cfg)
    except (ConfigError, ModelLoadError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2 if isinstance(e, ConfigError) else 1
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
