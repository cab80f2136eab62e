"""Load the parts of a Stable Diffusion pipeline: frozen VAE and text encoder, trainable UNet, tokenizer
and noise scheduler, from a hub id, a local folder or a gs:// folder. No mesh or device logic here."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from . import fsio
from .errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class Models:
    tokenizer: Any
    text_encoder: Any  # transformers.CLIPTextModel, frozen (None when not loaded)
    vae: Any  # diffusers.AutoencoderKL, frozen (None when not loaded)
    unet: Any  # diffusers.UNet2DConditionModel, trained (None when not loaded)
    noise_scheduler: Any  # diffusers.DDPMScheduler (the training schedule)
    source: str  # the local folder or hub id the parts came from
    vae_config: Any  # the VAE's config, also when the VAE itself was not loaded (pre-encoded latents)

    @property
    def vae_scale(self) -> int:
        """Spatial downsampling factor of the VAE (8 for Stable Diffusion): the project's one formula for it."""
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a resolution × resolution image."""
        side = resolution // self.vae_scale
        return (self.vae_config.latent_channels, side, side)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path) or path.count("/") != 1


def resolve_model_path(path: str, cache_dir: str | None = None) -> str:
    """Local folder or hub id as is; a gs:// (or other fsspec URL) folder is copied to a local cache."""
    if fsio.is_remote(path):
        if not fsio.exists(fsio.join(path, "model_index.json")):
            raise ModelLoadError(f"no diffusers pipeline (model_index.json) at {path}")
        _, root = fsio.url_to_fs(path)
        local = os.path.join(cache_dir or tempfile.gettempdir(), "xla_diffusion_models", root.strip("/"))
        if not os.path.exists(os.path.join(local, "model_index.json")):
            log.info("copying %s to %s", path, local)
            fsio.download_tree(path, local)
        return local
    if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ModelLoadError(f"--pretrained_model_name_or_path {path!r}: no such folder")
    return os.path.expanduser(path)


def _config_only(cls: Any, source: str, subfolder: str, common: dict[str, Any]) -> Any:
    """A model's config (attribute access, class defaults filled in) without building the model."""
    from diffusers.configuration_utils import FrozenDict

    init, _, _ = cls.extract_init_dict(cls.load_config(source, subfolder=subfolder, **common))
    return FrozenDict(init)


def load_models(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    *,
    load_vae: bool = True,
    load_text_encoder: bool = True,
    load_unet: bool = True,
) -> Models:
    """Load the parts on the CPU in fp32; the ones switched off stay None (training on pre-encoded latents
    needs neither encoder; encoding needs no UNet). Raises ModelLoadError with a one-line reason."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_model_path(pretrained_model_name_or_path, cache_dir)
    common = {"revision": revision, "cache_dir": cache_dir}
    text_encoder = vae = unet = None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        if load_text_encoder:
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, **common)
            text_encoder.requires_grad_(False).eval()
        if load_vae:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **common)
            vae.requires_grad_(False).eval()
        vae_config = vae.config if load_vae else _config_only(AutoencoderKL, source, "vae", common)
        if load_unet:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **common)
            unet.train()
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the pipeline from {pretrained_model_name_or_path!r}: {first}") from None
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler, source, vae_config)


def frozen_dtype(mixed_precision: str) -> torch.dtype:
    """Weight dtype of the frozen encoders: bf16 under --mixed_precision bf16, else fp32."""
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32
