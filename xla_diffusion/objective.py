"""Diffusion training math as pure functions (DDPM family, discrete time).

Notation: `x0` clean latents (B, C, H, W); `noise` ~ N(0, I) of the same shape; `t` integer timesteps
(B,); `alphas_cumprod` the schedule's cumulative product of (1 - beta), shape (T,). All randomness is
passed in, so tests reproduce a step exactly and the math is checked against diffusers' schedulers.
No function here branches on tensor values: they trace into one XLA graph.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' names; "sample" is x0


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
    """What the network regresses to: the noise (epsilon), the velocity (v_prediction) or the clean latents
    x0 (sample), shape (B, C, H, W)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def min_snr_weights(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma per-sample loss weights (Hang et al. 2023), shape (B,).

    The weight min(SNR, gamma) applies to the x0-space loss; expressed for an epsilon target it is
    min(SNR, gamma) / SNR, for a v target min(SNR, gamma) / (SNR + 1) and for a sample (x0) target
    min(SNR, gamma) itself (see `x0_loss_scale`).
    """
    s = snr(t, alphas_cumprod)
    return torch.clamp(s, max=gamma) / x0_loss_scale(s, prediction_type)


def x0_loss_scale(snr_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """c with |target - pred|² = c · |x0 - x̂0|² at a fixed x_t, shape of `snr_t` (B,): SNR for epsilon
    (x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)), SNR + 1 = 1 / (1 - a) for v (x0 = sqrt(a) x_t - sqrt(1 - a) v),
    1 for sample. A weighting defined on one target's MSE moves to another by the ratio of their c."""
    if prediction_type == "epsilon":
        return snr_t
    if prediction_type == "v_prediction":
        return snr_t + 1
    if prediction_type == "sample":
        return torch.ones_like(snr_t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def p2_weights(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, k: float, prediction_type: str
) -> torch.Tensor:
    """P2 per-sample loss weights (Choi et al. 2022, "Perception Prioritized Training of Diffusion Models"),
    shape (B,).

    P2 weights the epsilon MSE (L_simple) by 1 / (k + SNR)^gamma (the paper uses k = 1, gamma in {0.5, 1};
    gamma = 0 is L_simple). For a v or sample target the weight is carried over so the objective stays the
    same function of the model's x0 estimate: times SNR / (SNR + 1) for v, times SNR for sample.
    """
    s = snr(t, alphas_cumprod)
    eps_weight = (k + s) ** -gamma
    # Written out rather than as SNR / x0_loss_scale: with a zero-terminal-SNR schedule SNR / SNR is 0 / 0.
    if prediction_type == "epsilon":
        return eps_weight
    if prediction_type == "v_prediction":
        return eps_weight * s / (s + 1)
    if prediction_type == "sample":
        return eps_weight * s
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def predicted_x0(
    model_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean latents (B, C, H, W) implied by a prediction of `prediction_type` for x_t (what diffusers'
    schedulers call pred_original_sample)."""
    a = _gather(alphas_cumprod, t, x_t.ndim)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_pred) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_pred
    if prediction_type == "sample":
        return model_pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def offset_noise(noise: torch.Tensor, offset_draw: torch.Tensor, noise_offset: float) -> torch.Tensor:
    """Noise with a per-sample, per-channel constant added ("offset noise", as diffusers' --noise_offset):
    noise + noise_offset * offset_draw, with `offset_draw` ~ N(0, 1) of shape (B, C, 1, 1) drawn by the caller.
    It lets the model change an image's mean brightness, which zero-mean noise at every pixel hides."""
    return noise + noise_offset * offset_draw.to(noise.dtype)


def perturbed_noise(noise: torch.Tensor, perturbation_draw: torch.Tensor, input_perturbation: float) -> torch.Tensor:
    """The noise that builds the model's input under input perturbation (Ning et al. 2023, diffusers'
    --input_perturbation): noise + input_perturbation * perturbation_draw, `perturbation_draw` ~ N(0, I) shaped
    like `noise`. The target keeps the unperturbed noise, so the model learns to undo a slightly wrong x_t."""
    return noise + input_perturbation * perturbation_draw.to(noise.dtype)


def training_noise(
    noise: torch.Tensor,
    offset_draw: torch.Tensor | None = None,
    noise_offset: float = 0.0,
    perturbation_draw: torch.Tensor | None = None,
    input_perturbation: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target noise, input noise), both (B, C, H, W), in diffusers' order: the offset goes into both, the
    perturbation only into the noise that builds x_t = add_noise(x0, input noise, t). A zero option adds no
    operation (the branch is on the configuration, not on a tensor)."""
    if (noise_offset and offset_draw is None) or (input_perturbation and perturbation_draw is None):
        raise ValueError("noise_offset / input_perturbation need their standard normal draws passed in")
    if noise_offset:
        noise = offset_noise(noise, offset_draw, noise_offset)
    input_noise = perturbed_noise(noise, perturbation_draw, input_perturbation) if input_perturbation else noise
    return noise, input_noise


def dream_update(
    x_t: torch.Tensor,
    noise: torch.Tensor,
    model_pred: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    detail_preservation: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DREAM (Zhou et al. 2023, "DREAM: Diffusion Rectification and Estimation-Adaptive Models"), for epsilon
    prediction: the model's own noise estimate `model_pred` (B, C, H, W) for x_t, made without gradients,
    moves both the input and the target by delta = lambda * (noise - model_pred), lambda = sqrt(1 - a_t) ** p
    (p = `detail_preservation`; the paper uses 1). Returns (x_t + sqrt(1 - a_t) * delta, noise + delta): the
    new input and the new epsilon target, the two values diffusers' `compute_dream_and_update_latents` gives.
    The input then carries part of the model's own error, as x_t does when sampling, where each x_t is built
    from the model's earlier predictions."""
    sigma = (1 - _gather(alphas_cumprod, t, x_t.ndim)).sqrt()
    delta = (noise - model_pred.detach().to(noise.dtype)) * sigma**detail_preservation
    return x_t + sigma * delta, noise + delta


def diffusion_loss(
    model_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
    p2_gamma: float | None = None,
    p2_k: float = 1.0,
) -> torch.Tensor:
    """Scalar training loss: per-sample MSE to the target (in fp32), optionally min-SNR (`snr_gamma`) or
    P2 (`p2_gamma`, `p2_k`) weighted, then averaged over the batch. Without weighting this equals
    F.mse_loss(pred, target) as diffusers does. `noise` is the target noise (see `training_noise`)."""
    if snr_gamma is not None and p2_gamma is not None:
        raise ValueError("min-SNR (snr_gamma) and P2 (p2_gamma) are two loss weightings: choose one")
    tgt = target(prediction_type, x0, noise, t, alphas_cumprod).float()
    per_sample = ((model_pred.float() - tgt) ** 2).mean(dim=tuple(range(1, model_pred.ndim)))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(t, alphas_cumprod, snr_gamma, prediction_type)
    if p2_gamma is not None:
        per_sample = per_sample * p2_weights(t, alphas_cumprod, p2_gamma, p2_k, prediction_type)
    return per_sample.mean()
