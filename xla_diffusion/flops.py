"""Training FLOPs per step, counted exactly, and model FLOPs utilisation (MFU).

The count runs once, at start-up, on modules built from their configs on the ``meta`` device: shapes flow
through the real diffusers/transformers forward and autograd backward, ``torch.utils.flop_counter`` adds up
every matmul and convolution, and no weight is allocated, no value computed and no XLA graph built. The
trained modules are never touched: only their configs are read.

What is counted (``torch.utils.flop_counter``'s conventions, 2 FLOPs per multiply-accumulate):
- matmuls (``mm``/``addmm``/``bmm``/``baddbmm``), convolutions and their backward ops; elementwise work
  (norms, activations, softmax, the optimizer) is not, as is usual for MFU;
- attention as its two matmuls, Q·Kᵀ and P·V (4·B·heads·S_q·S_k·head_dim forward), with masks counted as
  full attention. Scaled-dot-product attention is forced onto its math path while counting: on CPU the
  default fused kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula and would
  count zero;
- the backward that training really runs: weight gradients of the trainable UNet, input gradients wherever
  autograd needs them (not for the noisy latents or the frozen text states). Recomputation (activation
  checkpointing, flash-attention's backward) is not counted: these are model FLOPs, the numerator of MFU.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel, PretrainedConfig

# Peak dense bf16 compute per chip, in TFLOP/s, from the Cloud TPU system-architecture pages. On v4 and v5p
# one chip is two TensorCores that PJRT drives as one device (megacore), so "per chip" = per device there too.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "v4": 275.0,  # https://cloud.google.com/tpu/docs/v4 : "Peak compute per chip 275 teraflops (bf16 or int8)"
    "v5e": 197.0,  # https://cloud.google.com/tpu/docs/v5e : "Peak compute per chip (bf16) 197 TFLOPs"
    "v5p": 459.0,  # https://cloud.google.com/tpu/docs/v5p : "Peak compute per chip (bf16) 459 TFLOPs"
    "v6e": 918.0,  # https://cloud.google.com/tpu/docs/v6e : "Peak compute per chip (bf16) 918 TFLOPs"
}

# "TPU v5 lite" (PJRT device kind), "v5litepod-16" (accelerator type), "TPU v6e", "v4-8", "TPU v5p", ...
_DEVICE_KIND = re.compile(r"^(?:tpu)?\s*v(\d+)\s*(litepod|lite|[a-z])?(?:-\d+)?$")
# (generation, variant) -> table key; "lite" is the e variant. libtpu names a v5p chip plain "TPU v5".
# "TPU v4 lite" (v4i, inference only) is deliberately absent.
_GENERATIONS: dict[tuple[str, str], str] = {
    ("4", ""): "v4",
    ("5", "e"): "v5e",
    ("5", "p"): "v5p",
    ("5", ""): "v5p",
    ("6", "e"): "v6e",
}


def tpu_generation(device_kind: str) -> str | None:
    """The ``PEAK_BF16_TFLOPS`` key for a TPU device-kind string, or None when the table has no entry.

    Accepts what the runtime reports (``xm.xla_device_kind()``: 'TPU v4', 'TPU v5 lite', 'TPU v5p' or
    'TPU v5', 'TPU v6 lite') and accelerator types ('v5litepod-16', 'v5p-128', 'v6e-8'). CPU, GPU and TPU
    generations outside the table ('TPU v3', 'TPU v4 lite', 'TPU7x') give None.
    """
    match = _DEVICE_KIND.match(device_kind.strip().lower())
    if match is None:
        return None
    generation, variant = match.groups()
    variant = "e" if variant in ("lite", "litepod") else (variant or "")
    return _GENERATIONS.get((generation, variant))


def peak_tflops(device_kind: str) -> float | None:
    """Peak bf16 TFLOP/s per chip for a device-kind string (see ``tpu_generation``), or None if unknown."""
    key = tpu_generation(device_kind)
    return None if key is None else PEAK_BF16_TFLOPS[key]


def mfu(flops_per_step: float, step_time_s: float, num_chips: int, peak_tflops_per_chip: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all chips, as a fraction (0.4 = 40%).

    ``flops_per_step`` is for the global batch (``StepFlops.total``), so it is divided over ``num_chips``.
    """
    if flops_per_step < 0 or step_time_s <= 0 or num_chips < 1 or peak_tflops_per_chip <= 0:
        raise ValueError(
            f"mfu needs flops >= 0, step time > 0, chips >= 1 and peak > 0; got {flops_per_step}, {step_time_s}, "
            f"{num_chips}, {peak_tflops_per_chip}"
        )
    return flops_per_step / step_time_s / (num_chips * peak_tflops_per_chip * 1e12)


def images_per_s_per_chip(flops_per_image: float, peak_tflops_per_chip: float, mfu_fraction: float) -> float:
    """Throughput one chip reaches at a given MFU: the inverse of ``mfu`` for a per-image FLOP count."""
    if flops_per_image <= 0:
        raise ValueError(f"flops_per_image must be > 0, got {flops_per_image}")
    return mfu_fraction * peak_tflops_per_chip * 1e12 / flops_per_image


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step over its whole (global) batch.

    ``vae_enc`` and ``text_enc`` are 0 when the step trains on pre-encoded latents and text states;
    ``unet_dream`` is DREAM's extra UNet forward (without gradients), 0 without --dream_training.
    """

    batch: int
    unet_fwd: int
    unet_bwd: int
    vae_enc: int = 0
    text_enc: int = 0
    unet_dream: int = 0

    @property
    def unet_train(self) -> int:
        """The UNet's work: forward + backward, and DREAM's extra forward."""
        return self.unet_fwd + self.unet_bwd + self.unet_dream

    @property
    def encoders(self) -> int:
        """The frozen encoders' forward passes."""
        return self.vae_enc + self.text_enc

    @property
    def total(self) -> int:
        return self.unet_train + self.encoders

    @property
    def per_image(self) -> float:
        return self.total / self.batch


@dataclass(frozen=True)
class Utilisation:
    """A run's work per step against its hardware: MFU from a step time.

    ``peak_tflops`` is per chip (= per PJRT device on v4 and later); None when it is unknown (no
    ``--peak_tflops`` and no TPU generation from the table): MFU is then not reported.
    """

    flops: StepFlops  # of one step over the global batch
    num_chips: int
    peak_tflops: float | None

    def mfu(self, step_time_s: float) -> float | None:
        """MFU of a step that took ``step_time_s`` (0.4 = 40%), or None without a peak."""
        if self.peak_tflops is None:
            return None
        return mfu(self.flops.total, step_time_s, self.num_chips, self.peak_tflops)

    def summary(self) -> dict[str, Any]:
        return {"flops_per_step": self.flops.total, "flops_per_image": self.flops.per_image,
                "peak_tflops": self.peak_tflops}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls and convolutions ``fn`` runs (forward, or backward if it calls one).

    Attention goes through scaled-dot-product's math path so that it is counted on every device.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _meta_empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict without the bookkeeping keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _unet_conditioning(config: Mapping[str, Any], batch: int, text_shape: tuple[int, int], num_time_ids: int):
    """Meta inputs for the UNet beside the latents: text states (B, L, D) and, for SDXL's ``text_time``
    embedding, ``text_embeds`` (B, E) and ``time_ids`` (B, num_time_ids)."""
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ValueError("count_unet_flops does not support UNets with class embeddings (class_embed_type)")
    states = _meta_empty(batch, *text_shape)
    kind = config.get("addition_embed_type")
    if kind is None:
        return states, None
    if kind != "text_time":
        raise ValueError(f"count_unet_flops supports addition_embed_type None or 'text_time', not {kind!r}")
    # projection_class_embeddings_input_dim = pooled text dim + num_time_ids * addition_time_embed_dim
    # (SDXL base: 1280 + 6 * 256 = 2816; its six ids are original size, crop offset and target size).
    pooled = config["projection_class_embeddings_input_dim"] - num_time_ids * config["addition_time_embed_dim"]
    if pooled <= 0:
        raise ValueError(f"{num_time_ids} time ids do not fit projection_class_embeddings_input_dim")
    return states, {"text_embeds": _meta_empty(batch, pooled), "time_ids": _meta_empty(batch, num_time_ids)}


def count_unet_flops(
    unet_config: Mapping[str, Any],
    batch: int,
    latent_shape: tuple[int, int, int],
    text_shape: tuple[int, int],
    num_time_ids: int = 6,
) -> tuple[int, int]:
    """(forward, backward) FLOPs of one training pass of a ``UNet2DConditionModel``.

    Args:
        unet_config: the UNet's config (``unet.config`` or a dict as in ``unet/config.json``).
        batch: images in the pass (global batch).
        latent_shape: (C, h, w) of the noisy latents; the input is (batch, C, h, w).
        text_shape: (L, D) of the text states; the input is (batch, L, D).
        num_time_ids: length of SDXL's ``time_ids`` (only read when addition_embed_type is 'text_time').

    The backward is that of training: every UNet parameter gets a gradient, the latents and text states
    (data and frozen-encoder outputs) do not.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_plain(unet_config))
    unet.train()
    sample = _meta_empty(batch, *latent_shape)
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    states, added = _unet_conditioning(unet_config, batch, text_shape, num_time_ids)
    outputs: list[torch.Tensor] = []

    def forward() -> None:
        outputs.append(unet(sample, timesteps, states, added_cond_kwargs=added).sample)

    fwd = count_flops(forward)
    # Any upstream gradient gives the same matmul shapes as d(loss)/d(prediction).
    bwd = count_flops(lambda: outputs[0].backward(torch.empty_like(outputs[0])))
    return fwd, bwd


def count_vae_encoder_flops(vae_config: Mapping[str, Any], batch: int, image_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs of ``AutoencoderKL.encode`` (encoder + quant_conv) on images of (batch, C, H, W)."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_plain(vae_config))
    images = _meta_empty(batch, *image_shape)
    with torch.no_grad():
        return count_flops(lambda: vae.encode(images))


def _text_config(config: PretrainedConfig | Mapping[str, Any]) -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    fields = _plain(config)
    return AutoConfig.for_model(fields.pop("model_type", "clip_text_model"), **fields)


def count_text_encoder_flops(text_config: PretrainedConfig | Mapping[str, Any], batch: int, text_len: int) -> int:
    """Forward FLOPs of a transformers text encoder on token ids of (batch, text_len).

    The class is the config's first ``architectures`` entry (e.g. SDXL's ``CLIPTextModelWithProjection``),
    else what ``AutoModel`` maps the config to (``CLIPTextModel`` for a CLIP text config).
    """
    config = _text_config(text_config)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        model = model_class(config) if model_class is not None else AutoModel.from_config(config)
    ids = torch.zeros(batch, text_len, dtype=torch.long, device="meta")
    with torch.no_grad():
        return count_flops(lambda: model(ids))


def _text_dim(unet_config: Mapping[str, Any]) -> int:
    dim = unet_config.get("encoder_hid_dim") or unet_config["cross_attention_dim"]
    if not isinstance(dim, int):
        raise ValueError(f"per-block cross_attention_dim {dim!r} is not supported; pass text_shape explicitly")
    return dim


def count_train_flops(
    unet_config: Mapping[str, Any],
    *,
    batch: int,
    resolution: int,
    text_len: int = 77,
    vae_config: Mapping[str, Any] | None = None,
    text_configs: Sequence[PretrainedConfig | Mapping[str, Any]] = (),
    vae_scale_factor: int | None = None,
    dream: bool = False,
) -> StepFlops:
    """FLOPs of one training step: UNet forward + backward, plus the encoders that run inside the step, plus
    one more UNet forward with ``dream`` (--dream_training's estimate, made without gradients).

    Args:
        unet_config: the trained UNet's config.
        batch: global batch (images per step).
        resolution: square image side in pixels.
        text_len: tokens per caption (77 for SD's CLIP tokenizers).
        vae_config: the VAE's config when it encodes images inside the step; None on pre-encoded latents.
        text_configs: the text encoders that run inside the step (SDXL has two); empty on pre-encoded text.
        vae_scale_factor: image pixels per latent pixel. Taken from ``vae_config`` when given
            (2 ** (len(block_out_channels) - 1), as diffusers' pipelines do); required otherwise.
    """
    if batch < 1 or resolution < 1 or text_len < 1:
        raise ValueError(f"batch, resolution and text_len must be >= 1; got {batch}, {resolution}, {text_len}")
    if vae_config is not None:
        derived = 2 ** (len(vae_config["block_out_channels"]) - 1)
        if vae_scale_factor is not None and vae_scale_factor != derived:
            raise ValueError(f"vae_scale_factor {vae_scale_factor} contradicts the VAE config ({derived})")
        vae_scale_factor = derived
    if vae_scale_factor is None:
        raise ValueError("count_train_flops needs vae_scale_factor when the VAE is not in the step")
    if resolution % vae_scale_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE scale factor {vae_scale_factor}")
    side = resolution // vae_scale_factor
    fwd, bwd = count_unet_flops(
        unet_config, batch, (unet_config["in_channels"], side, side), (text_len, _text_dim(unet_config))
    )
    vae = 0
    if vae_config is not None:
        vae = count_vae_encoder_flops(vae_config, batch, (vae_config["in_channels"], resolution, resolution))
    text = sum(count_text_encoder_flops(c, batch, text_len) for c in text_configs)
    return StepFlops(batch=batch, unet_fwd=fwd, unet_bwd=bwd, vae_enc=vae, text_enc=text,
                     unet_dream=fwd if dream else 0)
