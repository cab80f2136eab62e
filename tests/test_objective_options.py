"""The objective options users ask for, each against its formula and, where diffusers has it, against
diffusers' schedulers and training utilities: prediction_type "sample" (x0), noise offset, input perturbation,
P2 weighting, DREAM."""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from xla_diffusion import objective

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def _scheduler(prediction_type: str = "epsilon", **kw) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type, clip_sample=False, **kw)


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return _scheduler()


@pytest.fixture(scope="module")
def sample():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return x0, noise, t


# ------------------------------------------------------------------------------------ prediction "sample"


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_perfect_prediction_of_the_target_is_x0_to_diffusers(sample, prediction_type):
    """diffusers' DDPMScheduler configured with `prediction_type` reads our target back as x0."""
    x0, noise, t = sample
    sched = _scheduler(prediction_type)
    x_t = objective.add_noise(x0, noise, t, sched.alphas_cumprod)
    tgt = objective.target(prediction_type, x0, noise, t, sched.alphas_cumprod)
    for i, ti in enumerate(t.tolist()):
        out = sched.step(tgt[i : i + 1], ti, x_t[i : i + 1]).pred_original_sample
        torch.testing.assert_close(out, x0[i : i + 1], rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predicted_x0_matches_diffusers(sample, prediction_type):
    x0, noise, t = sample
    sched = _scheduler(prediction_type)
    x_t = objective.add_noise(x0, noise, t, sched.alphas_cumprod)
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    ours = objective.predicted_x0(pred, x_t, t, sched.alphas_cumprod, prediction_type)
    for i, ti in enumerate(t.tolist()):
        theirs = sched.step(pred[i : i + 1], ti, x_t[i : i + 1]).pred_original_sample
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=1e-4, atol=1e-4)


def test_sample_loss_is_mse_to_x0(scheduler, sample):
    x0, noise, t = sample
    pred = torch.randn_like(x0)
    ours = objective.diffusion_loss(pred, x0, noise, t, scheduler.alphas_cumprod, "sample")
    torch.testing.assert_close(ours, torch.nn.functional.mse_loss(pred, x0))


def test_min_snr_for_sample_is_the_x0_weight(scheduler, sample):
    """diffusers' recipe divides min(SNR, gamma) by SNR (epsilon) or SNR + 1 (v) only: an x0 target keeps
    min(SNR, gamma)."""
    _, _, t = sample
    expected = torch.clamp(compute_snr(scheduler, t), max=5.0)
    torch.testing.assert_close(objective.min_snr_weights(t, scheduler.alphas_cumprod, 5.0, "sample"), expected)


def _predictions_from_x0_estimate(x0_hat, x_t, t, alphas_cumprod):
    """The epsilon, v and x0 predictions that all mean the same x0 estimate at x_t (float64)."""
    a = alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    return {"epsilon": eps_hat, "v_prediction": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat, "sample": x0_hat}


@pytest.mark.parametrize("weighting", [{"snr_gamma": 5.0}, {"p2_gamma": 1.0, "p2_k": 1.0},
                                       {"p2_gamma": 0.5, "p2_k": 1.0}])
def test_weighted_loss_is_the_same_objective_for_every_target(weighting):
    """Min-SNR and P2 are defined on one parameterisation; carried over, the weighted loss of an x0 estimate
    is the same whichever target the model predicts."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g).double(), torch.randn(5, 4, 8, 8, generator=g).double()
    x0_hat = x0 + 0.3 * torch.randn(5, 4, 8, 8, generator=g).double()
    t = torch.tensor([20, 200, 450, 700, 900])
    ac = _scheduler().alphas_cumprod.double()
    x_t = objective.add_noise(x0, noise, t, ac).double()
    preds = _predictions_from_x0_estimate(x0_hat, x_t, t, ac)
    losses = {pt: objective.diffusion_loss(preds[pt], x0, noise, t, ac, pt, **weighting) for pt in PREDICTION_TYPES}
    torch.testing.assert_close(losses["v_prediction"], losses["epsilon"], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["sample"], losses["epsilon"], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------ P2


@pytest.mark.parametrize("gamma,k", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.1), (0.0, 1.0)])
def test_p2_weights_are_the_formula(scheduler, sample, gamma, k):
    """Epsilon target: weight = 1 / (k + SNR)^gamma (Choi et al. 2022)."""
    _, _, t = sample
    expected = 1.0 / (k + compute_snr(scheduler, t)) ** gamma
    torch.testing.assert_close(objective.p2_weights(t, scheduler.alphas_cumprod, gamma, k, "epsilon"), expected,
                               rtol=1e-5, atol=0)


def test_p2_loss_is_the_weighted_mean(scheduler, sample):
    x0, noise, t = sample
    pred = torch.randn_like(x0)
    w = 1.0 / (1.0 + compute_snr(scheduler, t)) ** 0.5
    expected = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    ours = objective.diffusion_loss(pred, x0, noise, t, scheduler.alphas_cumprod, "epsilon", p2_gamma=0.5, p2_k=1.0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)


def test_p2_gamma_zero_is_the_plain_loss(scheduler, sample):
    x0, noise, t = sample
    pred = torch.randn_like(x0)
    ours = objective.diffusion_loss(pred, x0, noise, t, scheduler.alphas_cumprod, "epsilon", p2_gamma=0.0)
    torch.testing.assert_close(ours, torch.nn.functional.mse_loss(pred, noise))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_p2_is_finite_under_zero_terminal_snr(prediction_type):
    sched = _scheduler(rescale_betas_zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) == 0.0
    w = objective.p2_weights(torch.arange(1000), sched.alphas_cumprod, 1.0, 1.0, prediction_type)
    assert torch.isfinite(w).all()


def test_min_snr_and_p2_together_are_refused(scheduler, sample):
    x0, noise, t = sample
    with pytest.raises(ValueError, match="choose one"):
        objective.diffusion_loss(x0, x0, noise, t, scheduler.alphas_cumprod, "epsilon", snr_gamma=5.0, p2_gamma=1.0)


# ------------------------------------------------------------------------- noise offset, input perturbation


def test_noise_offset_is_diffusers_formula(sample):
    """diffusers: noise += noise_offset * randn((B, C, 1, 1)): one constant per sample and channel."""
    _, noise, _ = sample
    draw = torch.randn(6, 4, 1, 1, generator=torch.Generator().manual_seed(3))
    out = objective.offset_noise(noise, draw, 0.1)
    torch.testing.assert_close(out, noise + 0.1 * draw.expand_as(noise))
    diff = out - noise
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff), rtol=0, atol=1e-6)  # constant over H, W


def test_input_perturbation_is_diffusers_formula(scheduler, sample):
    """diffusers: new_noise = noise + p * randn_like(noise); x_t from new_noise; the target from noise."""
    x0, noise, t = sample
    g = torch.Generator().manual_seed(4)
    offset_draw, perturbation_draw = torch.randn(6, 4, 1, 1, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    tgt_noise, in_noise = objective.training_noise(noise, offset_draw, 0.05, perturbation_draw, 0.1)
    offset = noise + 0.05 * offset_draw
    torch.testing.assert_close(tgt_noise, offset)
    torch.testing.assert_close(in_noise, offset + 0.1 * perturbation_draw)
    torch.testing.assert_close(objective.perturbed_noise(offset, perturbation_draw, 0.1), in_noise)
    torch.testing.assert_close(objective.add_noise(x0, in_noise, t, scheduler.alphas_cumprod),
                               scheduler.add_noise(x0, offset + 0.1 * perturbation_draw, t), rtol=1e-5, atol=1e-6)
    pred = torch.randn_like(x0)
    loss = objective.diffusion_loss(pred, x0, tgt_noise, t, scheduler.alphas_cumprod, "epsilon")
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, offset))


def test_zero_options_add_nothing(sample):
    _, noise, _ = sample
    tgt, inp = objective.training_noise(noise)
    assert tgt is noise and inp is noise


def test_options_without_draws_are_refused(sample):
    _, noise, _ = sample
    with pytest.raises(ValueError, match="draws"):
        objective.training_noise(noise, noise_offset=0.1)
    with pytest.raises(ValueError, match="draws"):
        objective.training_noise(noise, input_perturbation=0.1)


# ------------------------------------------------------------------------------- in the training step


def _pre_encoded_batch(seed: int, timesteps: list[int]) -> dict[str, torch.Tensor]:
    """A host batch of 2 for the tiny UNet (4x16x16 latents, 16x32 text states) with the host draws of offset
    noise and input perturbation."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 16, 16)
    return {"latents": torch.randn(shape, generator=g), "encoder_hidden_states": torch.randn(2, 16, 32, generator=g),
            "noise": torch.randn(shape, generator=g), "timesteps": torch.tensor(timesteps),
            "offset_draw": torch.randn(2, 4, 1, 1, generator=g), "perturbation_draw": torch.randn(shape, generator=g)}


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_step_loss_with_every_option_is_the_hand_computed_one(tiny_pipeline, prediction_type):
    """train_step.compute_loss with offset noise, input perturbation and P2 from the batch's host draws equals
    the loss written out the way diffusers' training loop does it (its add_noise, the UNet, the target, the
    weights 1 / (k + SNR)^gamma carried to the target)."""
    from xla_diffusion.models import load_models
    from xla_diffusion.train_step import StepConfig, compute_loss

    models = load_models(tiny_pipeline, load_vae=False, load_text_encoder=False)
    unet, sched = models.unet.eval(), models.noise_scheduler
    batch = _pre_encoded_batch(seed=5, timesteps=[10, 700])
    cfg = StepConfig(prediction_type=prediction_type, snr_gamma=None, max_grad_norm=0.0, bf16=False,
                     scaling_factor=1.0, noise_offset=0.1, input_perturbation=0.2, p2_gamma=1.0, p2_k=1.0)
    alphas = sched.alphas_cumprod.float()
    with torch.no_grad():
        ours = compute_loss(unet, None, None, batch, alphas, cfg)
        noise = batch["noise"] + 0.1 * batch["offset_draw"]
        noisy = sched.add_noise(batch["latents"], noise + 0.2 * batch["perturbation_draw"], batch["timesteps"])
        pred = unet(noisy, batch["timesteps"], batch["encoder_hidden_states"]).sample
        target = noise if prediction_type == "epsilon" else batch["latents"]
        snr = compute_snr(sched, batch["timesteps"])
        weight = (1 + snr) ** -1.0 * (1 if prediction_type == "epsilon" else snr)
        expected = (weight * ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))).mean()
        # the validation loss measures the plain objective: no weights, plain noise (its batches have no draws)
        undrawn = {k: v for k, v in batch.items() if "draw" not in k}
        plain = compute_loss(unet, None, None, undrawn, alphas, cfg.plain())
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert not torch.isclose(ours, plain)


# ------------------------------------------------------------------------------------------------- DREAM


class _FixedEstimate(torch.nn.Module):
    """Answers every call with the same noise estimate, in the output form diffusers' DREAM reads (`.sample`)."""

    def __init__(self, estimate: torch.Tensor):
        super().__init__()
        self.estimate = estimate

    def forward(self, *args, **kwargs):
        return type("Output", (), {"sample": self.estimate})()


@pytest.mark.parametrize("p", [1.0, 0.5, 0.0])
def test_dream_update_is_diffusers_formula(scheduler, sample, p):
    """Input and target as diffusers' compute_dream_and_update_latents moves them, for an estimate that misses."""
    from diffusers.training_utils import compute_dream_and_update_latents

    x0, noise, t = sample
    x_t = objective.add_noise(x0, noise, t, scheduler.alphas_cumprod)
    estimate = noise + 0.3 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    ours = objective.dream_update(x_t, noise, estimate, t, scheduler.alphas_cumprod, p)
    theirs = compute_dream_and_update_latents(_FixedEstimate(estimate), scheduler, t, noise, x_t, noise,
                                              torch.zeros(6, 1, 1), p)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0], x_t)  # the estimate missed: the input moved
    # a perfect estimate moves nothing
    still = objective.dream_update(x_t, noise, noise, t, scheduler.alphas_cumprod, p)
    torch.testing.assert_close(still[0], x_t)
    torch.testing.assert_close(still[1], noise)


class _AutocastForward(torch.nn.Module):
    """A UNet whose every call runs in a bf16 autocast region of its own, as accelerate wraps a prepared model's
    forward under diffusers' --mixed_precision bf16."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.unet(*args, **kwargs)


@pytest.mark.parametrize("bf16", [False, True])
def test_step_loss_and_gradients_with_dream_are_diffusers_loop(tiny_pipeline, bf16):
    """train_step.compute_loss with DREAM (after offset noise and input perturbation, with min-SNR) gives the loss
    and the UNet gradients of diffusers' training loop written out: its add_noise, compute_dream_and_update_latents
    with the same UNet, the prediction, the min-SNR-weighted MSE. The estimate carries no gradient in either.
    Under bf16 autocast every weight still gets its gradient (with the no-grad estimate inside the training
    forward's autocast region, 142 of 208 got none: the region's cached bf16 weight casts had no grad_fn)."""
    from diffusers.training_utils import compute_dream_and_update_latents

    from xla_diffusion.models import load_models
    from xla_diffusion.train_step import StepConfig, compute_loss

    models = load_models(tiny_pipeline, load_vae=False, load_text_encoder=False)
    unet, sched = models.unet.train(), models.noise_scheduler
    batch = _pre_encoded_batch(seed=8, timesteps=[30, 800])
    cfg = StepConfig(prediction_type="epsilon", snr_gamma=5.0, max_grad_norm=0.0, bf16=bf16, scaling_factor=1.0,
                     noise_offset=0.1, input_perturbation=0.2, dream_detail_preservation=1.0)

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None for p in unet.parameters())
        return [p.grad.clone() for p in unet.parameters()]

    ours = compute_loss(unet, None, None, batch, sched.alphas_cumprod.float(), cfg)
    our_grads = gradients(ours)
    t, hidden = batch["timesteps"], batch["encoder_hidden_states"]
    noise = batch["noise"] + 0.1 * batch["offset_draw"]
    noisy = sched.add_noise(batch["latents"], noise + 0.2 * batch["perturbation_draw"], t)
    theirs = _AutocastForward(unet) if bf16 else unet
    noisy, target = compute_dream_and_update_latents(theirs, sched, t, noise, noisy, noise, hidden, 1.0)
    pred = theirs(noisy, t, hidden).sample
    snr = compute_snr(sched, t)
    weight = torch.clamp(snr, max=5.0) / snr
    expected = (weight * ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    for a, b in zip(our_grads, gradients(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # DREAM changed the objective, and the validation loss (cfg.plain()) leaves it out
    without = compute_loss(unet, None, None, batch, sched.alphas_cumprod.float(),
                           dataclasses.replace(cfg, dream_detail_preservation=None))
    assert not torch.isclose(ours, without)
    assert cfg.plain().dream_detail_preservation is None


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_dream_is_refused_for_other_predictions(prediction_type):
    """diffusers raises NotImplementedError mid-training for v-prediction; here the step config refuses it
    (the scheduler's own prediction type is known only once the models are loaded) with one error line."""
    from xla_diffusion.errors import ConfigError
    from xla_diffusion.train_step import StepConfig

    with pytest.raises(ConfigError, match=f"--dream_training is defined for epsilon prediction; this run trains "
                                          f"{prediction_type}"):
        StepConfig(prediction_type=prediction_type, snr_gamma=None, max_grad_norm=0.0, bf16=False,
                   scaling_factor=1.0, dream_detail_preservation=1.0)
