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

from ..config import ConfigError

log = logging.getLogger(__name__)


def load_image_caption_dataset(
    dataset_name: str | None,
    train_data_dir: str | None,
    image_column: str,
    caption_column: str,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    heldout_fraction: float = 0.0,
    part: str = "train",
) -> Any:
    """Load the training split and keep this process's contiguous 1/process_count of it.

    With `heldout_fraction` > 0 a fixed random ceil(fraction * N) samples are held out for evaluation (the
    same ones whatever --seed and the host count): `part="train"` returns the rest, `part="heldout"` them.
    Raises ConfigError (one line) when the data cannot be found or lacks a column.
    """
    import datasets

    try:
        if dataset_name is not None:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        where = dataset_name or train_data_dir
        raise ConfigError(f"cannot load a training dataset from {where!r}: {str(e).splitlines()[0]}") from None
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in ds.column_names:
            raise ConfigError(
                f"{flag} {column!r} is not a column of the dataset; it has: {', '.join(ds.column_names)}"
            )
    if max_train_samples is not None:
        ds = ds.select(range(min(max_train_samples, len(ds))))
    if heldout_fraction > 0:
        # Split before the split over hosts, so no host trains on any host's held-out samples.
        n_heldout = min(len(ds) - 1, math.ceil(heldout_fraction * len(ds)))
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

    def __init__(
        self,
        dataset: Any,
        tokenizer: Any,
        image_column: str,
        caption_column: str,
        batch_size: int,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        pixel_dtype: torch.dtype = torch.float32,
    ):
        if len(dataset) < batch_size:
            raise ConfigError(
                f"this host's dataset has {len(dataset)} samples, fewer than --train_batch_size {batch_size}"
            )
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed
        self.pixel_dtype = pixel_dtype
        transform = image_transform(resolution, center_crop, random_flip)
        rng = random.Random(seed)

        def preprocess(examples: dict[str, list]) -> dict[str, Any]:
            captions = []
            for c in examples[caption_column]:
                # Datasets with several captions per image (lists) get one picked at random.
                captions.append(c if isinstance(c, str) else rng.choice(list(c)))
            return {
                "pixel_values": [transform(img.convert("RGB")) for img in examples[image_column]],
                "input_ids": tokenize(tokenizer, captions),
            }

        self.dataset = dataset.with_transform(preprocess)

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]).to(self.pixel_dtype),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
        }

    def ordered_pass(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass in dataset order (no shuffling, last partial batch dropped): the evaluation reader."""
        yield from torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True, num_workers=self.num_workers,
            collate_fn=self._collate,
        )

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
