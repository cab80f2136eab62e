"""The trainer's data source, chosen by what `--train_data_dir` holds: pre-encoded latent shards (a latent
dataset with a manifest.json, local or gs://) or raw image–caption data encoded in the step. Both paths take
the same small `DataConfig` and yield endless fixed-shape host batches with their per-step randomness, from
any position (`iter_from`, see data.feed) without replaying the batches before it."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .config import DataConfig
from .images import ImageCaptionBatches, host_part, load_image_caption_dataset, tokenize
from .latents import build_latent_source
from .randomness import WithDiffusionRandomness


def build_data_source(data: DataConfig, models: Any, rt: Any, manifest: Any) -> Any:
    """Endless host batches with their per-step randomness: from latent shards when `manifest` (the training
    data's `data.latents.read_manifest`, read by the caller, which also needs it to choose the models) is
    given, else from raw image–caption data."""
    if manifest is not None:
        return build_latent_source(data, models, rt, manifest)
    dataset = load_image_caption_dataset(data)  # every host's samples (memory-mapped), then this host's part
    batches = ImageCaptionBatches(host_part(dataset, rt.process_index, rt.process_count), models.tokenizer, data,
                                  rt.process_index)
    batches.num_samples = len(dataset)
    return WithDiffusionRandomness(
        batches, models.latent_shape(data.resolution), models.noise_scheduler.config.num_train_timesteps,
        seed=data.seed, process_index=rt.process_index, extra_draws=data.extra_draws,
    )


def empty_prompt(source: Any, models: Any) -> dict[str, torch.Tensor]:
    """The empty prompt "" in the form the source carries captions: token ids (L,), or text-encoder states
    (L, D) that a pre-encoded source provides as `empty_prompt`."""
    if "input_ids" in source.ndims:
        return {"input_ids": tokenize(models.tokenizer, [""])[0]}
    provided = getattr(source, "empty_prompt", None)
    if provided is None:
        raise ConfigError("--proportion_empty_prompts needs the empty prompt's text states, which this dataset lacks")
    return provided
