"""The objective's math against diffusers' own scheduler and training utilities."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from xla_diffusion import objective


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def sample():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return x0, noise, t


def test_add_noise_matches_diffusers(scheduler, sample):
    x0, noise, t = sample
    ours = objective.add_noise(x0, noise, t, scheduler.alphas_cumprod)
    torch.testing.assert_close(ours, scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)


def test_velocity_matches_diffusers(scheduler, sample):
    x0, noise, t = sample
    ours = objective.velocity(x0, noise, t, scheduler.alphas_cumprod)
    torch.testing.assert_close(ours, scheduler.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)


def test_snr_matches_diffusers(scheduler, sample):
    _, _, t = sample
    torch.testing.assert_close(objective.snr(t, scheduler.alphas_cumprod), compute_snr(scheduler, t), rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_diffusers_recipe(scheduler, sample, prediction_type):
    """diffusers' train_text_to_image.py: weights = min(snr, gamma) / snr (eps) or / (snr + 1) (v),
    loss = mean over batch of weights * per-sample MSE."""
    x0, noise, t = sample
    pred = torch.randn_like(x0)
    gamma = 5.0
    snr = compute_snr(scheduler, t)
    weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    tgt = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    expected = (((pred - tgt) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    ours = objective.diffusion_loss(pred, x0, noise, t, scheduler.alphas_cumprod, prediction_type, gamma)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)


def test_unweighted_loss_is_plain_mse(scheduler, sample):
    x0, noise, t = sample
    pred = torch.randn_like(x0)
    ours = objective.diffusion_loss(pred, x0, noise, t, scheduler.alphas_cumprod, "epsilon")
    torch.testing.assert_close(ours, torch.nn.functional.mse_loss(pred, noise))


def test_unknown_prediction_type_raises(scheduler, sample):
    x0, noise, t = sample
    with pytest.raises(ValueError, match="x0"):
        objective.target("x0", x0, noise, t, scheduler.alphas_cumprod)  # diffusers calls it "sample"
