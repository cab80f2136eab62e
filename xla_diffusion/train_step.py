"""One training step, traced into one XLA graph: (encode) → noise → UNet → loss → backward → clip →
AdamW. No host syncs and no branches on tensor values; the Python branches below depend only on the
configuration and on which keys the batch carries, which are fixed for a run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import objective
from .ema import EmaWeights
from .xla_ops import nearest_upsample_as_broadcast


@dataclass(frozen=True)
class StepConfig:
    prediction_type: str
    snr_gamma: float | None
    max_grad_norm: float
    bf16: bool
    scaling_factor: float
    shift_factor: float | None = None


def encode_latents(vae: torch.nn.Module | None, batch: dict[str, torch.Tensor], cfg: StepConfig) -> torch.Tensor:
    """Scaled latents (B, C, h, w) fp32: pre-encoded `latents`, or the VAE posterior sampled with the
    host-drawn `latent_eps` (B, C, h, w), its mean and std either pre-encoded (`latent_mean`, `latent_std`
    (B, C, h, w), bf16 from latent shards; the VAE is not touched and may be None) or computed here from
    `pixel_values` (B, 3, H, W) in [-1, 1]. Both go through the same sampling, shift and scaling below."""
    if "latents" in batch:
        return batch["latents"].float()
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
    else:
        with torch.no_grad():
            dtype = next(vae.parameters()).dtype
            posterior = vae.encode(batch["pixel_values"].to(dtype)).latent_dist
            mean, std = posterior.mean, posterior.std
    latents = (mean + std * batch["latent_eps"].to(mean.dtype)).float()
    if cfg.shift_factor is not None:
        latents = latents - cfg.shift_factor
    return latents * cfg.scaling_factor


def encode_text(text_encoder: torch.nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text encoder last hidden states (B, L, D): pre-encoded `encoder_hidden_states` (the text encoder is
    not touched and may be None) or computed from `input_ids` (B, L)."""
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
    ema: EmaWeights | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, one AdamW update and, with `ema`, the moving-average update, all in one graph.
    Returns device scalars (loss, gradient norm before clipping) that stay lazy until the caller's step
    closure reads them."""
    loss = compute_loss(unet, vae, text_encoder, batch, alphas_cumprod, cfg)
    loss.backward()
    params = [p for p in unet.parameters() if p.grad is not None]
    if cfg.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return loss.detach(), grad_norm.detach()


def make_optimizer(
    unet: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, eps: float
) -> torch.optim.Optimizer:
    """AdamW over the UNet's fp32 parameters; its moments are fp32 too (they follow the parameters).

    The learning rate is a 0-d device tensor and the step count lives on the device (`capturable`), so
    every per-step scalar of the update is graph data computed on the device. With Python floats instead,
    torch_xla turns scalars into graph constants when they round to 0 or 1 (or coincide with another
    scalar): `1 - lr * weight_decay` reaches 1.0f as a decaying lr nears 0 and `1 - beta2**t` reaches
    1.0f after ~16k steps, and each time the step compiles again.
    """
    device = next(unet.parameters()).device
    return torch.optim.AdamW(
        unet.parameters(), lr=torch.tensor(lr, dtype=torch.float32, device=device), betas=betas,
        weight_decay=weight_decay, eps=eps, capturable=True, foreach=False,
    )


class LrSchedule:
    """Learning rate per step: linear warm-up over `warmup_steps`, then constant, linear decay or cosine
    decay to 0 at `total_steps` (diffusers' names). The value is computed on the host and copied into the
    optimizer's device lr tensor (a transfer, never a graph constant). Warm-up starts at 1/(warmup+1)."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
        if name not in ("constant", "constant_with_warmup", "linear", "cosine"):
            raise ValueError(f"unknown lr_scheduler {name!r}")
        self.optimizer, self.name, self.warmup, self.total = optimizer, name, warmup_steps, total_steps
        lr = optimizer.param_groups[0]["lr"]
        self.peak = float(lr.detach().cpu()) if isinstance(lr, torch.Tensor) else float(lr)
        self.lr = self.peak

    def factor(self, step: int) -> float:
        """Multiplier on the peak lr for 0-based `step`."""
        import math

        if self.name != "constant" and step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min((step - self.warmup) / max(1, self.total - self.warmup), 1.0)
        if self.name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def set_step(self, step: int) -> float:
        """Set the lr for 0-based `step` in every param group; returns it."""
        self.lr = self.peak * self.factor(step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(torch.tensor(self.lr, dtype=torch.float32))
            else:
                group["lr"] = self.lr
        return self.lr
