"""One training step, traced into one XLA graph: (encode) → noise → UNet → loss → backward (once per
micro-batch) → clip → AdamW → EMA. No host syncs and no branches on tensor values; the Python branches below
depend only on the configuration and on which keys the batch carries, which are fixed for a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from . import objective, runtime
from .ema import EmaWeights
from .errors import ConfigError
from .xla_ops import xla_friendly_ops

# with flat state, pass the loss and gradients through a barrier before the update (see train_step; False: as until
# stop 28, for bench/donation.py's comparison)
FLAT_LOSS_BARRIER = True


@dataclass(frozen=True)
class StepConfig:
    """What the step's math needs, fixed for a run (each value is baked into the one graph)."""

    prediction_type: str
    snr_gamma: float | None
    max_grad_norm: float
    bf16: bool
    scaling_factor: float
    shift_factor: float | None = None
    # The objective options (objective.training_noise, objective.p2_weights). A non-zero noise_offset /
    # input_perturbation needs the batch's `offset_draw` / `perturbation_draw` (data.randomness.EXTRA_DRAWS).
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    p2_gamma: float | None = None
    p2_k: float = 1.0
    # Micro-batches per optimizer update (--gradient_accumulation_steps): the step's batch holds this many.
    accumulation_steps: int = 1
    # DREAM's detail preservation p (objective.dream_update), or None: DREAM off. It costs one more UNet forward
    # per step, without gradients, in the same graph.
    dream_detail_preservation: float | None = None

    def __post_init__(self) -> None:
        if self.dream_detail_preservation is not None and self.prediction_type != "epsilon":
            raise ConfigError(f"--dream_training is defined for epsilon prediction; this run trains "
                              f"{self.prediction_type} (pass --prediction_type epsilon, or leave DREAM off)")

    @classmethod
    def for_models(cls, models: Any, prediction_type: str | None = None, snr_gamma: float | None = None,
                   max_grad_norm: float = 0.0, bf16: bool = False, latents: Any = None, **options: Any
                   ) -> StepConfig:
        """The step config of `models` (a models.Models): `prediction_type` None means the scheduler's own; the
        VAE scaling is the one of the latent shards (`latents`, a LatentManifest) when training on them,
        since the step applies the scaling of the VAE that made them, else the pipeline VAE's. `options` are the
        objective options (noise_offset, input_perturbation, p2_gamma, p2_k, dream_detail_preservation)."""
        vae = latents if latents is not None else models.vae_config
        shift = latents.shift_factor if latents is not None else getattr(vae, "shift_factor", None)
        return cls(
            prediction_type=prediction_type or models.noise_scheduler.config.prediction_type,
            snr_gamma=snr_gamma, max_grad_norm=max_grad_norm, bf16=bf16,
            scaling_factor=float(vae.scaling_factor), shift_factor=None if shift is None else float(shift),
            **options,
        )

    def plain(self) -> StepConfig:
        """The unweighted objective on plain noise: what the fixed-timestep validation loss measures, so runs
        with different loss weightings or noise options compare (its batches carry no extra draws)."""
        return dataclasses.replace(self, snr_gamma=None, p2_gamma=None, noise_offset=0.0, input_perturbation=0.0,
                                   dream_detail_preservation=None)


@dataclass
class FrozenParts:
    """The frozen inputs of the step on the device: the VAE and text encoder (None when the data carries their
    outputs) in the frozen dtype, and the training schedule's alphas_cumprod (T,) fp32."""

    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    alphas_cumprod: torch.Tensor

    @classmethod
    def place(cls, models: Any, dtype: torch.dtype, device: torch.device) -> FrozenParts:
        return cls(
            vae=runtime.place_frozen(models.vae, dtype, device),
            text_encoder=runtime.place_frozen(models.text_encoder, dtype, device),
            alphas_cumprod=models.noise_scheduler.alphas_cumprod.float().to(device),
        )


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
    weights stay fp32. With cfg.noise_offset / cfg.input_perturbation the batch's `offset_draw` /
    `perturbation_draw` shape the noise (objective.training_noise). With DREAM the UNet first estimates the
    noise of x_t without gradients, and input and target move by what it missed (objective.dream_update),
    in diffusers' order: after the offset and the perturbation."""
    with xla_friendly_ops():  # the VAE encoder's GroupNorms too
        latents = encode_latents(vae, batch, cfg)
        hidden = encode_text(text_encoder, batch)
        t = batch["timesteps"]
        noise, input_noise = objective.training_noise(
            batch["noise"], batch.get("offset_draw"), cfg.noise_offset, batch.get("perturbation_draw"),
            cfg.input_perturbation,
        )
        noisy = objective.add_noise(latents, input_noise, t, alphas_cumprod)
        if cfg.dream_detail_preservation is not None:
            # An autocast region of its own: autocast caches the bf16 casts of the fp32 weights until the
            # outermost region exits, and casts made under no_grad carry no gradient. Sharing the training
            # forward's region, 142 of the tiny UNet's 208 weights got no gradient.
            with torch.no_grad(), runtime.autocast(noisy.device, cfg.bf16):
                estimate = unet(noisy, t, hidden, return_dict=False)[0]
            noisy, noise = objective.dream_update(noisy, noise, estimate, t, alphas_cumprod,
                                                  cfg.dream_detail_preservation)
        with runtime.autocast(noisy.device, cfg.bf16):
            pred = unet(noisy, t, hidden, return_dict=False)[0]
    return objective.diffusion_loss(pred, latents, noise, t, alphas_cumprod, cfg.prediction_type, cfg.snr_gamma,
                                    cfg.p2_gamma, cfg.p2_k)


def micro_batches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """`n` micro-batches of a batch of n·B rows, each B rows: micro-batch i holds rows i, n + i, 2n + i, ...

    Strided rather than contiguous because the batch is split over the devices in contiguous blocks of rows:
    when each device's block holds a whole number of n-row groups (B divides over the devices), every
    micro-batch takes the same number of rows from every block, so it stays split over all devices and the
    split moves no data between them. (Which rows form a micro-batch does not change the update: each
    micro-batch's mean loss is weighted 1/n, and the samples carry their own noise and timesteps.)"""
    if n == 1:
        return [batch]
    return [{k: v.unflatten(0, (-1, n))[:, i] for k, v in batch.items()} for i in range(n)]


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
    closure reads them.

    With cfg.accumulation_steps = n > 1 the batch holds n micro-batches (`micro_batches`); each one's loss,
    divided by n, is back-propagated in turn, so the gradients add up to those of the mean loss over the
    whole batch, and one update follows. The loop is unrolled into the one graph: a run still compiles one
    step graph (it grows with n), and no host sync happens between micro-batches. The loss returned is the
    mean over the micro-batches."""
    n = cfg.accumulation_steps
    losses = []
    for micro in micro_batches(batch, n):
        loss = compute_loss(unet, vae, text_encoder, micro, alphas_cumprod, cfg)
        (loss / n if n > 1 else loss).backward()
        losses.append(loss.detach())
    loss = losses[0] if n == 1 else torch.stack(losses).mean()
    params = [p for p in unet.parameters() if p.grad is not None]
    if cfg.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if FLAT_LOSS_BARRIER and getattr(optimizer, "flat_chunks", None):
        # Flat state (--step_graph replay_flat): AdamW updates the weights buffer in place, and the loss (an output
        # of the graph, which the update does not depend on) may read a bias straight from that buffer. XLA then
        # copies the whole buffer so that read sees the old values. Passing the loss and the gradients through one
        # barrier puts the loss before the update (bench/donation.py).
        runtime.optimization_barrier_([loss] + [p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return loss.detach(), grad_norm.detach()
