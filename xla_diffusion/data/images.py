"""Raw image–caption data: a `datasets` dataset (hub id, local dataset, or an imagefolder with
metadata.jsonl) → fixed-shape host batches of pixels and token ids. The encoders run inside the
training step on these (as diffusers' examples do); pre-encoded latents plug in as another source.

The training stream is a pure function of the host batch index k, so its position is one integer: epoch
e = k // (N // B) visits the samples in a permutation seeded by (seed, e), batch k takes positions
[b·B, (b+1)·B) of it (b = k mod N // B), and each sample's crop, flip and caption choice come from a
generator seeded by (seed, host, e, sample index). Resuming at batch k costs one permutation, whatever k is,
and any number of loader workers give the same batches (the DataLoader returns them in order).

An image that cannot be decoded is skipped and counted by reason, and the next sample of the permutation
takes its place, so the batch keeps its shape.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from .config import DataConfig
from .randomness import sample_generator

log = logging.getLogger(__name__)


def load_image_caption_dataset(data: DataConfig, process_index: int = 0, process_count: int = 1,
                               part: str = "train") -> Any:
    """Load the training split of `data.dataset_name` (or the imagefolder `data.train_data_dir`) and keep this
    process's contiguous 1/process_count of it.

    With `data.heldout_fraction` > 0 a fixed random ceil(fraction * N) samples are held out for evaluation (the
    same ones whatever --seed and the host count): `part="train"` returns the rest, `part="heldout"` them.
    Raises ConfigError (one line) when the data cannot be found, is empty or lacks a column.
    """
    import datasets

    where = data.dataset_name or data.train_data_dir
    if data.dataset_name is None:
        _check_imagefolder(data.train_data_dir)
    try:
        if data.dataset_name is not None:
            ds = datasets.load_dataset(data.dataset_name, data.dataset_config_name, cache_dir=data.cache_dir,
                                       split="train")
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=data.train_data_dir, cache_dir=data.cache_dir,
                                       split="train")
    except Exception as e:  # noqa: BLE001 (whatever datasets raises on unreadable input is one line for the user)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot load a training dataset from {where!r}: {type(e).__name__}: {first}") from None
    if len(ds) == 0:
        raise ConfigError(f"the dataset at {where!r} is empty")
    for flag, column in (("--image_column", data.image_column), ("--caption_column", data.caption_column)):
        if column not in ds.column_names:
            raise ConfigError(
                f"{flag} {column!r} is not a column of the dataset; it has: {', '.join(ds.column_names)}"
            )
    if data.max_train_samples is not None:
        ds = ds.select(range(min(data.max_train_samples, len(ds))))
    if data.heldout_fraction > 0:
        # Split before the split over hosts, so no host trains on any host's held-out samples.
        n_heldout = min(len(ds) - 1, math.ceil(data.heldout_fraction * len(ds)))
        order = np.random.default_rng(0).permutation(len(ds))
        ds = ds.select(sorted(order[:n_heldout] if part == "heldout" else order[n_heldout:]))
    return host_part(ds, process_index, process_count)


def host_part(ds: Any, process_index: int, process_count: int) -> Any:
    """This host's contiguous 1/process_count of `ds`: hosts never see each other's samples within an epoch."""
    if process_count > 1:
        ds = ds.shard(num_shards=process_count, index=process_index, contiguous=True)
    return ds


def _check_imagefolder(folder: str | None) -> None:
    """An imagefolder whose metadata.jsonl holds no record is an empty dataset (datasets raises IndexError)."""
    import os

    meta = os.path.join(folder or "", "metadata.jsonl")
    if folder and os.path.isfile(meta):
        with open(meta, encoding="utf-8", errors="replace") as f:
            if not any(line.strip() for line in f):
                raise ConfigError(f"the dataset at {folder!r} is empty: its metadata.jsonl has no records")


# ------------------------------------------------------------------------------------------- samples


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_image(value: Any) -> Image.Image:
    """An RGB PIL image from what a dataset's image column holds: a PIL image, or (undecoded) a dict with
    `bytes` and/or `path`, raw bytes or a path. Raises BadSample("missing_image" | "unreadable_image" |
    "damaged_image")."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        img = Image.open(io.BytesIO(value) if isinstance(value, bytes | bytearray) else value)
        img.load()  # decode now: a truncated file fails here, not in a later transform
        return img.convert("RGB")
    except FileNotFoundError as e:
        raise BadSample("missing_image", str(e)) from None
    except Image.UnidentifiedImageError as e:
        raise BadSample("unreadable_image", str(e)) from None
    except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as e:
        raise BadSample("damaged_image", f"{type(e).__name__}: {e}") from None


def pick_caption(value: Any, generator: torch.Generator | None) -> str:
    """The caption of a sample: a string, or one picked at random from a list of them (datasets with several
    captions per image). Raises BadSample("bad_caption") for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(c, str) for c in value):
        return value[int(torch.randint(len(value), (1,), generator=generator))]
    raise BadSample("bad_caption", f"caption {value!r:.80} is not a string or a list of strings")


def image_pixels(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                 generator: torch.Generator | None = None, interpolation: str = "bilinear") -> torch.Tensor:
    """PIL image → (3, resolution, resolution) float tensor in [-1, 1]: resize the short side to `resolution`
    (`interpolation`: a torchvision InterpolationMode name, diffusers' --image_interpolation_mode), crop
    (center, or at a random offset), flip with probability ½ if `random_flip`. The random
    choices come from `generator` (torch's global one when None), like torchvision's RandomCrop and
    RandomHorizontalFlip."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = TF.resize(img, resolution, interpolation=InterpolationMode[interpolation.upper()])
    if center_crop:
        img = TF.center_crop(img, resolution)
    else:
        w, h = img.size
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        img = TF.crop(img, top, left, resolution, resolution)
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), [0.5], [0.5])


def image_transform(resolution: int, center_crop: bool, random_flip: bool, interpolation: str = "bilinear") -> Any:
    """PIL image → (3, resolution, resolution) float tensor in [-1, 1] (`image_pixels`, random choices from
    torch's global generator)."""
    return lambda img: image_pixels(img.convert("RGB"), resolution, center_crop, random_flip, None, interpolation)


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Captions → (B, tokenizer.model_max_length) int64 ids, padded and truncated to a fixed length."""
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
        return_tensors="pt",
    ).input_ids


def _undecoded(dataset: Any, image_column: str) -> Any:
    """The dataset with its image column left undecoded, so that a bad image is ours to skip, not an
    exception inside `datasets`."""
    import datasets

    if isinstance(dataset.features.get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


class _Samples(torch.utils.data.Dataset):
    """Map-style dataset over keys (k, epoch, position): the sample at `position` of the epoch's permutation
    as (pixels, caption, skipped, k); when it cannot be used, the next one of the permutation that can
    (its own failure is counted in `skipped`, by reason)."""

    def __init__(self, dataset: Any, data: DataConfig, seed: int, pixel_dtype: torch.dtype):
        self.dataset, self.data, self.seed, self.pixel_dtype = dataset, data, seed, pixel_dtype
        self.n = len(dataset)
        self._perm: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.data.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def sample(self, index: int, epoch: int) -> tuple[torch.Tensor, str]:
        """Sample `index` of the dataset, with the random choices of (seed, host, epoch, index)."""
        g = sample_generator(self.seed, epoch, index)
        row = self.dataset[index]
        caption = pick_caption(row[self.data.caption_column], g)
        img = decode_image(row[self.data.image_column])
        pixels = image_pixels(img, self.data.resolution, self.data.center_crop, self.data.random_flip, g,
                              self.data.interpolation)
        return pixels.to(self.pixel_dtype), caption

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, str, dict[str, int], int]:
        k, epoch, position = key
        perm = self.permutation(epoch)
        skipped: Counter = Counter()
        reasons: Counter = Counter()
        for attempt in range(self.n):
            index = perm[(position + attempt) % self.n]
            try:
                pixels, caption = self.sample(index, epoch)
                return pixels, caption, dict(skipped), k
            except BadSample as e:
                reasons[e.reason] += 1
                if attempt == 0:  # each bad sample is counted once, at its own position
                    skipped[e.reason] += 1
                    log.warning("skipping sample %d: %s", index, e)
        raise DataError(f"none of the {self.n} samples of this host's dataset can be used ({dict(reasons)})")


class _BatchKeys(torch.utils.data.Sampler):
    """Endless batches of keys from host batch `start` on: batch k is positions [b·B, (b+1)·B) of epoch
    k // (N // B)'s permutation (the last partial batch of an epoch is dropped: fixed shapes)."""

    def __init__(self, n: int, batch_size: int, start: int):
        self.batch_size, self.start = batch_size, start
        self.per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        k = self.start
        while True:
            epoch, b = divmod(k, self.per_epoch)
            yield [(k, epoch, b * self.batch_size + i) for i in range(self.batch_size)]
            k += 1


class ImageCaptionBatches:
    """Endless, fixed-shape host batches `{"pixel_values": (B, 3, R, R), "input_ids": (B, L)}`.

    `iter_from(position)` yields `(batch, meta)` from host batch `position["batches"]` on (0 when None);
    meta = {"index": k, "skipped": {reason: count}} (the samples this batch skipped). Iterating the object
    itself yields the batches alone, from the start.
    """

    ndims = {"pixel_values": 4, "input_ids": 2}
    num_samples: int | None = None  # the training samples of all hosts, when the caller knows them

    def __init__(self, dataset: Any, tokenizer: Any, data: DataConfig, process_index: int = 0):
        if len(dataset) < data.batch_size:
            raise ConfigError(
                f"this host's dataset has {len(dataset)} samples, fewer than --train_batch_size {data.batch_size}"
            )
        self.batch_size, self.num_workers, self.tokenizer = data.batch_size, data.num_workers, tokenizer
        self.prefetch_factor = data.prefetch_factor if data.num_workers else None
        self.samples = _Samples(_undecoded(dataset, data.image_column), data, data.seed * 1_000_003 + process_index,
                                data.text_dtype)  # pixels in the frozen encoders' dtype

    def _collate(self, items: list[tuple[torch.Tensor, str, dict[str, int], int]]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        skipped: Counter = Counter()
        for item in items:
            skipped.update(item[2])
        batch = {"pixel_values": torch.stack([i[0] for i in items]),
                 "input_ids": tokenize(self.tokenizer, [i[1] for i in items])}
        return batch, {"index": items[0][3], "skipped": dict(skipped)}

    def iter_from(self, position: dict[str, Any] | None) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        start = int((position or {}).get("batches", 0))
        yield from torch.utils.data.DataLoader(
            self.samples, batch_sampler=_BatchKeys(self.samples.n, self.batch_size, start),
            num_workers=self.num_workers, collate_fn=self._collate, prefetch_factor=self.prefetch_factor,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (batch for batch, _ in self.iter_from(None))

    def ordered(self) -> OrderedImageBatches:
        """A re-iterable single pass in dataset order: the evaluation reader."""
        return OrderedImageBatches(self)


class _OrderedSamples(torch.utils.data.Dataset):
    def __init__(self, samples: _Samples):
        self.samples = samples

    def __len__(self) -> int:
        return self.samples.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | str:
        try:
            return self.samples.sample(index, 0)
        except BadSample as e:
            return e.reason


def _first(x: Any) -> Any:
    return x


class OrderedImageBatches:
    """Re-iterable single pass over an `ImageCaptionBatches`' dataset in order (no shuffling, last partial batch
    dropped), with the same preprocessing; samples that cannot be used are skipped and counted in `skipped`."""

    def __init__(self, batches: ImageCaptionBatches):
        self.batches, self.ndims = batches, batches.ndims
        self.skipped: Counter = Counter()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        b = self.batches
        chunk: list[tuple[torch.Tensor, str]] = []
        loader = torch.utils.data.DataLoader(_OrderedSamples(b.samples), batch_size=None, num_workers=b.num_workers,
                                             collate_fn=_first)
        for item in loader:
            if isinstance(item, str):
                self.skipped[item] += 1
                continue
            chunk.append(item)
            if len(chunk) == b.batch_size:
                yield {"pixel_values": torch.stack([c[0] for c in chunk]),
                       "input_ids": tokenize(b.tokenizer, [c[1] for c in chunk])}
                chunk = []
