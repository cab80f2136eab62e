"""Raw image–caption data: a `datasets` dataset (hub id, local dataset, or an imagefolder with
metadata.jsonl) → fixed-shape host batches of pixels and token ids. The encoders run inside the
training step on these (as diffusers' examples do); pre-encoded latents plug in as another source.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torchvision import transforms

from ..errors import ConfigError
from .config import DataConfig

log = logging.getLogger(__name__)


def load_image_caption_dataset(data: DataConfig, process_index: int = 0, process_count: int = 1,
                               part: str = "train") -> Any:
    """Load the training split of `data.dataset_name` (or the imagefolder `data.train_data_dir`) and keep this
    process's contiguous 1/process_count of it.

    With `data.heldout_fraction` > 0 a fixed random ceil(fraction * N) samples are held out for evaluation (the
    same ones whatever --seed and the host count): `part="train"` returns the rest, `part="heldout"` them.
    Raises ConfigError (one line) when the data cannot be found or lacks a column.
    """
    import datasets

    try:
        if data.dataset_name is not None:
            ds = datasets.load_dataset(data.dataset_name, data.dataset_config_name, cache_dir=data.cache_dir,
                                       split="train")
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=data.train_data_dir, cache_dir=data.cache_dir,
                                       split="train")
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        where = data.dataset_name or data.train_data_dir
        raise ConfigError(f"cannot load a training dataset from {where!r}: {str(e).splitlines()[0]}") from None
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
    if process_count > 1:
        # Each host trains on its own part; hosts never see each other's samples within an epoch.
        ds = ds.shard(num_shards=process_count, index=process_index, contiguous=True)
    return ds


def image_transform(resolution: int, center_crop: bool, random_flip: bool) -> transforms.Compose:
    """PIL image → (3, resolution, resolution) float tensor in [-1, 1]."""
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Captions → (B, tokenizer.model_max_length) int64 ids, padded and truncated to a fixed length."""
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
        return_tensors="pt",
    ).input_ids


class ImageCaptionBatches:
    """Endless, fixed-shape host batches `{"pixel_values": (B, 3, R, R), "input_ids": (B, L)}`.

    Epochs are reshuffled with a generator seeded from `seed` and the epoch number, so the data order is
    the same whatever the device count. The last partial batch of an epoch is dropped (fixed shapes).
    """

    ndims = {"pixel_values": 4, "input_ids": 2}

    def __init__(self, dataset: Any, tokenizer: Any, data: DataConfig):
        if len(dataset) < data.batch_size:
            raise ConfigError(
                f"this host's dataset has {len(dataset)} samples, fewer than --train_batch_size {data.batch_size}"
            )
        self.batch_size, self.num_workers, self.seed = data.batch_size, data.num_workers, data.seed
        self.pixel_dtype = data.text_dtype  # the frozen encoders' dtype
        transform = image_transform(data.resolution, data.center_crop, data.random_flip)
        rng = random.Random(data.seed)

        def preprocess(examples: dict[str, list]) -> dict[str, Any]:
            captions = []
            for c in examples[data.caption_column]:
                # Datasets with several captions per image (lists) get one picked at random.
                captions.append(c if isinstance(c, str) else rng.choice(list(c)))
            return {
                "pixel_values": [transform(img.convert("RGB")) for img in examples[data.image_column]],
                "input_ids": tokenize(tokenizer, captions),
            }

        self.dataset = dataset.with_transform(preprocess)

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]).to(self.pixel_dtype),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
        }

    def ordered(self) -> OrderedImageBatches:
        """A re-iterable single pass in dataset order: the evaluation reader."""
        return OrderedImageBatches(self)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=True,
                num_workers=self.num_workers, collate_fn=self._collate,
                persistent_workers=False,
            )
            yield from loader
            epoch += 1


class OrderedImageBatches:
    """Re-iterable single pass over an `ImageCaptionBatches`' dataset in order (no shuffling, last partial batch
    dropped), with the same preprocessing and collation as training."""

    def __init__(self, batches: ImageCaptionBatches):
        self.batches, self.ndims = batches, batches.ndims

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        b = self.batches
        yield from torch.utils.data.DataLoader(
            b.dataset, batch_size=b.batch_size, shuffle=False, drop_last=True, num_workers=b.num_workers,
            collate_fn=b._collate,
        )
