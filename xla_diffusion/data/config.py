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
    batch_size: int  # per host and step: --train_batch_size x --gradient_accumulation_steps when training
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
    interpolation: str = "bilinear"  # of the raw images' resize (a torchvision InterpolationMode name)
    prefetch_factor: int = 2  # batches each loader worker prefetches
    extra_draws: tuple[str, ...] = ()  # optional per-step draws (randomness.EXTRA_DRAWS) the objective needs

    @classmethod
    def from_train_config(cls, cfg: Any, text_dtype: torch.dtype) -> DataConfig:
        """The data part of a `TrainConfig`. A host batch feeds one optimizer update: with gradient accumulation
        it holds every micro-batch (the step splits it)."""
        return cls(
            dataset_name=cfg.dataset_name, train_data_dir=cfg.train_data_dir,
            batch_size=cfg.train_batch_size * cfg.gradient_accumulation_steps,
            resolution=cfg.resolution, seed=cfg.seed, dataset_config_name=cfg.dataset_config_name,
            cache_dir=cfg.cache_dir, image_column=cfg.image_column, caption_column=cfg.caption_column,
            max_train_samples=cfg.max_train_samples, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
            num_workers=cfg.dataloader_num_workers, shuffle_buffer_size=cfg.shuffle_buffer_size,
            text_dtype=text_dtype, heldout_fraction=cfg.eval_heldout_fraction,
            interpolation=cfg.image_interpolation_mode, prefetch_factor=cfg.loader_prefetch_factor,
            extra_draws=tuple(name for name, flag in (("offset_draw", cfg.noise_offset),
                                                      ("perturbation_draw", cfg.input_perturbation)) if flag),
        )

    def for_evaluation(self, batch_size: int | None = None) -> DataConfig:
        """The same data read the way evaluation reads it: center crop, no flip, and batches of `batch_size`
        when given (the training micro-batch, not the accumulated batch of an update)."""
        return dataclasses.replace(self, center_crop=True, random_flip=False, batch_size=batch_size or self.batch_size)
