"""Bits per dimension of latents under a discrete-time diffusion's variational bound (Ho et al. 2020;
Kingma et al. 2021, VDM), with the model's own noise schedule. Float64 throughout."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xla_diffusion.errors import EvalError


@dataclass(frozen=True)
class VLBSchedule:
    """Float64 tables of a discrete DDPM schedule (0-based t = 0..T-1, diffusers' indexing: x_t ~
    q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I) with a_t = alphas_cumprod[t]; a_{-1} = 1 is the clean data).

    For t >= 1 the posterior q(x_{t-1} | x_t, x0) = N(c0_t x0 + ct_t x_t, var_t) (Ho et al. 2020, eqs. 6-7):
    c0_t = beta_t sqrt(a_{t-1}) / (1 - a_t), ct_t = sqrt(alpha_t) (1 - a_{t-1}) / (1 - a_t),
    var_t = beta_t (1 - a_{t-1}) / (1 - a_t)."""

    alphas_cumprod: torch.Tensor  # (T,)
    betas: torch.Tensor  # (T,)
    coef_x0: torch.Tensor  # (T,), entry 0 unused
    coef_xt: torch.Tensor  # (T,), entry 0 unused
    posterior_var: torch.Tensor  # (T,), entry 0 unused

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> VLBSchedule:
        a = alphas_cumprod.double().cpu()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        betas = 1 - a / prev
        return cls(
            alphas_cumprod=a, betas=betas,
            coef_x0=betas * prev.sqrt() / (1 - a), coef_xt=(1 - betas).sqrt() * (1 - prev) / (1 - a),
            posterior_var=betas * (1 - prev) / (1 - a),
        )

    def predicted_x0(self, x_t: torch.Tensor, t: int, model_output: torch.Tensor, prediction_type: str
                     ) -> torch.Tensor:
        """x0 implied by the model's output at step t (all float64)."""
        a = self.alphas_cumprod[t]
        if prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
        if prediction_type == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * model_output
        raise EvalError(f"bits/dim: unknown prediction_type {prediction_type!r}")


def prior_kl(x0: torch.Tensor, sched: VLBSchedule) -> torch.Tensor:
    """KL(q(x_{T-1} | x0) || N(0, I)) in nats, summed over dims: (B,). Per dim ½(a x0² - a - log(1 - a))."""
    a = sched.alphas_cumprod[-1]
    per_dim = 0.5 * (a * x0.double() ** 2 - a - torch.log1p(-a))
    return per_dim.flatten(1).sum(1)


def _log_bin_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails (mirrors the bin to the left tail)."""
    mirror = (lo + hi) > 0
    lo, hi = torch.where(mirror, -hi, lo), torch.where(mirror, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


def decoder_nll(x0: torch.Tensor, x0_pred: torch.Tensor, sched: VLBSchedule, bin_width: float) -> torch.Tensor:
    """-log p(x0 | x_0) in nats, summed over dims: (B,). p is N(x0_pred, beta_0) per dim (the posterior mean at
    t = 0 is the predicted x0, its variance beta_0 as in Ho et al.), discretised to bins of width `bin_width`
    centred on x0: the probability mass of [x0 - w/2, x0 + w/2]."""
    sigma = sched.betas[0].sqrt()
    centre = (x0.double() - x0_pred.double()) / sigma
    half = bin_width / 2 / sigma
    return -_log_bin_mass(centre - half, centre + half).flatten(1).sum(1)


def diffusion_kl(x0: torch.Tensor, x_t: torch.Tensor, x0_pred: torch.Tensor, t: int, sched: VLBSchedule
                 ) -> torch.Tensor:
    """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in nats for t >= 1, summed over dims: (B,). Both are
    Gaussians with the fixed posterior variance; p's mean is the posterior mean with x0 replaced by the
    model's x0_pred, so the KL is |mean_q - mean_p|² / (2 var_t)."""
    x_t = x_t.double()
    mean_q = sched.coef_x0[t] * x0.double() + sched.coef_xt[t] * x_t
    mean_p = sched.coef_x0[t] * x0_pred.double() + sched.coef_xt[t] * x_t
    return ((mean_q - mean_p) ** 2).flatten(1).sum(1) / (2 * sched.posterior_var[t])


def timestep_strata(num_train_timesteps: int, k: int | None, generator: torch.Generator) -> list[tuple[int, float]]:
    """(t, weight) pairs estimating sum over t = 1..T-1: one uniform draw from each of k equal strata, weighted
    by the stratum's size (unbiased, lower variance than k i.i.d. draws). k None or >= T-1: every t, weight 1."""
    n = num_train_timesteps - 1
    if k is None or k >= n:
        return [(t, 1.0) for t in range(1, num_train_timesteps)]
    if k < 1:
        raise EvalError(f"bits/dim needs at least 1 timestep, got {k}")
    edges = [1 + (i * n) // k for i in range(k + 1)]
    out = []
    for lo, hi in zip(edges, edges[1:]):
        t = lo + int(torch.randint(0, hi - lo, (1,), generator=generator))
        out.append((t, float(hi - lo)))
    return out


def bits_per_dim(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    num_timesteps: int | None = 32,
    generator: torch.Generator | None = None,
    bin_width: float = 2 / 255,
) -> dict[str, torch.Tensor]:
    """Negative log-likelihood bound of latents x0 (B, C, h, w) (the scaled latents the model is trained on)
    under the model's discrete-time diffusion, in bits per latent dimension, per sample:

        L = KL(q(x_{T-1}|x0) || N(0,I)) + sum_{t=1}^{T-1} KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) - log p(x0|x_0)

    divided by (C h w ln 2). The sum over t is estimated from `num_timesteps` stratified draws (None: all
    T-1 terms); each term draws x_t ~ q(x_t | x0) from `generator`. The decoder term discretises each latent
    dimension to bins of width `bin_width` (default 2/255: the resolution of 8-bit pixels on [-1, 1]); the
    bound is therefore the code length of latents quantised to that grid. `predict(x_t, t)` returns the model's
    output (epsilon or v, per `prediction_type`) for x_t (B, C, h, w) and t (B,) int64, with any conditioning
    closed over.

    Returns per-sample tensors (B,) float64: `bpd` and its parts `prior`, `diffusion`, `decoder` (bits/dim).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sched = VLBSchedule.from_alphas_cumprod(alphas_cumprod)
    num_train = len(sched.alphas_cumprod)
    b = x0.shape[0]
    dims = x0[0].numel()
    x0 = x0.float().cpu()

    def noisy(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(x0.shape, generator=generator)
        a = sched.alphas_cumprod[t]
        x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
        with torch.no_grad():
            out = predict(x_t, torch.full((b,), t, dtype=torch.int64))
        return x_t, sched.predicted_x0(x_t.double(), t, out.double().cpu(), prediction_type)

    x_t, x0_pred = noisy(0)
    decoder = decoder_nll(x0, x0_pred, sched, bin_width)
    diffusion = torch.zeros(b, dtype=torch.float64)
    for t, weight in timestep_strata(num_train, num_timesteps, generator):
        x_t, x0_pred = noisy(t)
        diffusion = diffusion + weight * diffusion_kl(x0, x_t, x0_pred, t, sched)
    prior = prior_kl(x0, sched)
    to_bits = 1.0 / (dims * math.log(2))
    parts = {"prior": prior * to_bits, "diffusion": diffusion * to_bits, "decoder": decoder * to_bits}
    return {"bpd": parts["prior"] + parts["diffusion"] + parts["decoder"], **parts}


def unet_predictor(unet: torch.nn.Module, encoder_hidden_states: torch.Tensor) -> Callable[..., torch.Tensor]:
    """predict(x_t, t) for bits_per_dim: a diffusers UNet conditioned on text states (B, L, D), in eval mode
    on whatever device the UNet lives."""
    device = next(unet.parameters()).device

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t.to(device), t.to(device), encoder_hidden_states.to(device), return_dict=False)[0]

    return predict

