"""The input side of data_prep/encode.py: image shards → padded host batches.

Listing and splitting the input shards, decoding and validating samples (SkipSample, counted per shard),
and BatchMaker, which turns each shard into LocalBatches (a ShardEnd for a shard with no usable sample).
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from xla_diffusion import fsio
from xla_diffusion.data.tar_stream import iter_tar_samples
from xla_diffusion.errors import ConfigError

if TYPE_CHECKING:
    from data_prep.encode_config import EncodeConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# PIL modes that convert to RGB meaningfully (16-bit / float modes would be clipped into garbage).
RGB_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "La", "P", "PA", "CMYK", "YCbCr", "1"}


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
