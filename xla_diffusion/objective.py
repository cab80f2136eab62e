"""Diffusion training math as pure functions (DDPM family, discrete time).

Notation: `x0` clean latents (B, C, H, W); `noise` ~ N(0, I) of the same shape; `t` integer timesteps
(B,); `alphas_cumprod` the schedule's cumulative product of (1 - beta), shape (T,). All randomness is
passed in, so tests reproduce a step exactly and the math is checked against diffusers' schedulers.
No function here branches on tensor values: they trace into one XLA graph.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to (B, 1, ..., 1) so it broadcasts against an `ndim`-d batch."""
    return values.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise (Ho et al. 2020, eq. 4)."""
    a = _gather(alphas_cumprod, t, x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022, sec. 4)."""
    a = _gather(alphas_cumprod, t, x0.ndim)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t), shape (B,)."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """What the network regresses to: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def min_snr_weights(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma per-sample loss weights (Hang et al. 2023), shape (B,).

    The weight min(SNR, gamma) applies to the x0-space loss; expressed for an epsilon target it is
    min(SNR, gamma) / SNR and for a v target min(SNR, gamma) / (SNR + 1).
    """
    s = snr(t, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def diffusion_loss(
    model_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Scalar training loss: per-sample MSE to the target (in fp32), optionally min-SNR weighted, then
    averaged over the batch. Without weighting this equals F.mse_loss(pred, target) as diffusers does."""
    tgt = target(prediction_type, x0, noise, t, alphas_cumprod).float()
    per_sample = ((model_pred.float() - tgt) ** 2).mean(dim=tuple(range(1, model_pred.ndim)))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(t, alphas_cumprod, snr_gamma, prediction_type)
    return per_sample.mean()
