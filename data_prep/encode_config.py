"""The flags of data_prep/encode.py, checked before any device work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from xla_diffusion.config import option
from xla_diffusion.errors import check


@dataclass(kw_only=True)
class EncodeConfig:
    """Encode image shards into latent shards (VAE posterior + text encoder states, bf16)."""

    input_shards: str = option(
        None, "Image shards: a folder (every *.tar in it), a glob, or a brace list like "
        "'gs://b/images/{00000..00099}.tar'; local or gs://.", required=True,
    )
    output_dir: str = option(None, "Where the latent shards and manifest.json go (local or gs://).", required=True)
    pretrained_model_name_or_path: str = option(
        None, "Diffusers pipeline whose VAE and text encoder to run (hub id, folder, gs://).", required=True
    )
    revision: str | None = option(None, "Revision of the pipeline on the hub.")
    variant: str | None = option(None, "Variant of the model files, e.g. fp16.")
    cache_dir: str | None = option(None, "Where downloaded models are cached.")
    resolution: int = option(512, "Images are resized (shorter side) and center-cropped to this square size.")
    min_image_size: int | None = option(
        None, "Skip images whose shorter side is below this (default: --resolution, i.e. never upscale)."
    )
    batch_size: int = option(
        32, "Images per encoder batch on this process; with several processes the global batch is this times "
        "their number, sharded over all devices (it must divide evenly)."
    )
    no_text_states: bool = option(
        False, "Store only token ids, not the text encoder's hidden states (the trainer then runs the text "
        "encoder in the step)."
    )
    num_shards: int = option(1, "Split the input shards into this many jobs (e.g. a batch scheduler's array size).")
    shard_index: int = option(0, "Which of the --num_shards jobs this is (0-based).")
    device: Literal["xla", "cpu"] = option("xla", "xla: the device mesh, batch sharded; cpu: eager on the host.",
                                         choices=("xla", "cpu"))
    encoder_precision: Literal["fp32", "bf16"] = option(
        "fp32", "Weights and compute dtype of the encoders (outputs are stored in bf16 either way).",
        choices=("fp32", "bf16"),
    )

    def __post_init__(self) -> None:
        if self.min_image_size is None:
            self.min_image_size = self.resolution
        check([
            (self.resolution < 8 or self.resolution % 8, "--resolution must be a positive multiple of 8"),
            (self.batch_size < 1, "--batch_size must be >= 1"),
            (self.num_shards < 1, "--num_shards must be >= 1"),
            (not 0 <= self.shard_index < self.num_shards, "--shard_index must be in [0, --num_shards)"),
            (self.min_image_size < 0, "--min_image_size must be >= 0"),
        ])
