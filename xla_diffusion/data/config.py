"""The data part of the training configuration: what both readers (latent shards, raw images) need."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DataConfig:
    """What the readers need, and nothing of the rest of the training configuration."""

    dataset_name: str | None
    train_data_dir: str | None
    batch_size: int  # per host
    resolution: int
    seed: int = 0
    dataset_config_name: str | None = None
    cache_dir: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    num_workers: int = 0
    shuffle_buffer_size: int = 1000
    text_dtype: torch.dtype = torch.float32  # dtype of pixels and text states: the frozen encoders' dtype
    heldout_fraction: float = 0.0  # of raw image data, held out of training for the validation loss

    @classmethod
    def from_train_config(cls, cfg: Any, text_dtype: torch.dtype) -> DataConfig:
        """The data part of a `TrainConfig`."""
        return cls(
            dataset_name=cfg.dataset_name, train_data_dir=cfg.train_data_dir, batch_size=cfg.train_batch_size,
            resolution=cfg.resolution, seed=cfg.seed, dataset_config_name=cfg.dataset_config_name,
            cache_dir=cfg.cache_dir, image_column=cfg.image_column, caption_column=cfg.caption_column,
            max_train_samples=cfg.max_train_samples, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
            num_workers=cfg.dataloader_num_workers, shuffle_buffer_size=cfg.shuffle_buffer_size,
            text_dtype=text_dtype, heldout_fraction=cfg.eval_heldout_fraction,
        )

    def for_evaluation(self) -> DataConfig:
        """The same data read the way evaluation reads it: center crop, no flip."""
        return dataclasses.replace(self, center_crop=True, random_flip=False)
