"""One training step, traced into one XLA graph: (encode) → noise → UNet → loss → backward → clip →
AdamW. No host syncs and no branches on tensor values; the Python branches below depend only on the
configuration and on which keys the batch carries, which are fixed for a run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import objective
from .xla_ops import nearest_upsample_as_broadcast


@dataclass(frozen=True)
class StepConfig:
    prediction_type: str
    snr_gamma: float | None
    max_grad_norm: float
    bf16: bool
    scaling_factor: float
    shift_factor: float | None = None


def encode_latents(vae: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: StepConfig) -> torch.Tensor:
    """Scaled latents (B, C, h, w) fp32: pre-encoded `latents`, or the VAE posterior sampled with the
    host-drawn `latent_eps` from `pixel_values` (B, 3, H, W) in [-1, 1]."""
    if "latents" in batch:
        return batch["latents"].float()
    with torch.no_grad():
        dtype = next(vae.parameters()).dtype
        posterior = vae.encode(batch["pixel_values"].to(dtype)).latent_dist
        latents = (posterior.mean + posterior.std * batch["latent_eps"].to(dtype)).float()
    if cfg.shift_factor is not None:
        latents = latents - cfg.shift_factor
    return latents * cfg.scaling_factor


def encode_text(text_encoder: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text encoder last hidden states (B, L, D): pre-encoded `encoder_hidden_states` or from `input_ids`."""
    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"]
    with torch.no_grad():
        return text_encoder(batch["input_ids"], return_dict=False)[0]


def compute_loss(
    unet: torch.nn.Module,
    vae: torch.nn.Module | None,
    text_encoder: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    alphas_cumprod: torch.Tensor,
    cfg: StepConfig,
) -> torch.Tensor:
    """Scalar diffusion loss for one batch; the UNet runs under bf16 autocast when cfg.bf16 while its
    weights stay fp32."""
    latents = encode_latents(vae, batch, cfg)
    hidden = encode_text(text_encoder, batch)
    noise, t = batch["noise"], batch["timesteps"]
    noisy = objective.add_noise(latents, noise, t, alphas_cumprod)
    with torch.autocast("xla", dtype=torch.bfloat16, enabled=cfg.bf16), nearest_upsample_as_broadcast():
        pred = unet(noisy, t, hidden, return_dict=False)[0]
    return objective.diffusion_loss(pred, latents, noise, t, alphas_cumprod, cfg.prediction_type, cfg.snr_gamma)


def train_step(
    unet: torch.nn.Module,
    vae: torch.nn.Module | None,
    text_encoder: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    alphas_cumprod: torch.Tensor,
    cfg: StepConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and one AdamW update. Returns device scalars (loss, gradient norm before
    clipping) that stay lazy until the caller's step closure reads them."""
    loss = compute_loss(unet, vae, text_encoder, batch, alphas_cumprod, cfg)
    loss.backward()
    params = [p for p in unet.parameters() if p.grad is not None]
    if cfg.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm.detach()


def make_optimizer(
    unet: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, eps: float
) -> torch.optim.Optimizer:
    """AdamW over the UNet's fp32 parameters; its moments are fp32 too (they follow the parameters)."""
    return torch.optim.AdamW(unet.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
