"""Per-step randomness drawn on the host and shipped with the batch.

Drawing noise, timesteps and the VAE posterior sample on the host from seeded generators (one per host batch,
seeded by its index, so there is no generator state to checkpoint) makes a run
reproducible bit for bit whatever the mesh shape or device count (device RNG streams differ between a
1-device and a sharded graph), lets tests replay a step exactly, and keeps the step graph free of RNG
state. The cost is a small host→device copy: latent-sized tensors, ~1/48 of the pixels at SD's f=8.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def sample_generator(seed: int, index: int, *more: int) -> torch.Generator:
    """The CPU generator of sample `index` (sampling and the fixed-timestep validation loss): its initial noise
    and any noise a stochastic scheduler adds come from it alone, so a sample does not depend on its batch.
    SeedSequence mixes (seed, index, *more) so nearby tuples give unrelated streams. The training streams
    seed one per host batch or per sample the same way, so their randomness has no state to save."""
    state = np.random.SeedSequence([seed, index, *more]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


# The optional draws of the objective options, by batch key: whether the draw is per channel (B, C, 1, 1) or
# latent-sized (B, C, h, w). objective.training_noise takes them.
EXTRA_DRAWS = {"offset_draw": "channel", "perturbation_draw": "latent"}


class _PerBatch:
    """A wrapper of a host batch source that adds to every batch values drawn from that batch's own generator,
    seeded by (seed, host batch index): nothing to save in a checkpoint, and a resumed stream draws exactly
    what the uninterrupted one drew.

    Sources have `iter_from(position)`, yielding `(batch, meta)` with the host batch index in `meta["index"]`;
    iterating the wrapper itself yields the batches alone, from the start."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], seed: int):
        self.batches, self.seed = batches, seed

    def draw(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def iter_from(self, position: dict | None) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
        for batch, meta in self.batches.iter_from(position):
            yield self.draw(dict(batch), sample_generator(self.seed, meta["index"])), meta

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (batch for batch, _ in self.iter_from(None))


class WithDiffusionRandomness(_PerBatch):
    """Wrap a batch source, adding to each batch:

    - `noise`: (B, C, h, w) float32 N(0, I), the diffusion noise;
    - `timesteps`: (B,) int64 uniform in [0, num_train_timesteps);
    - `latent_eps`: (B, C, h, w) float32 N(0, I), to sample the VAE posterior mean + std * eps
      (only when `with_latent_eps`, i.e. when the step encodes images);
    - the `extra_draws` asked for (names of EXTRA_DRAWS), float32 N(0, 1): `offset_draw` (B, C, 1, 1) for
      --noise_offset, `perturbation_draw` (B, C, h, w) for --input_perturbation. They come from a second
      seeded generator, so switching them on leaves the noise and timesteps of a run unchanged.

    `num_samples` (the training samples of all hosts, or None when unknown) is passed through from `batches`.
    """

    def __init__(
        self,
        batches: Any,
        latent_shape: tuple[int, int, int],
        num_train_timesteps: int,
        seed: int,
        process_index: int = 0,
        with_latent_eps: bool = True,
        extra_draws: tuple[str, ...] = (),
    ):
        # Distinct streams per host: hosts hold different samples and must not share noise.
        super().__init__(batches, seed * 1_000_003 + process_index + 1)
        self.latent_shape, self.num_train_timesteps = tuple(latent_shape), num_train_timesteps
        self.with_latent_eps = with_latent_eps
        unknown = set(extra_draws) - set(EXTRA_DRAWS)
        if unknown:
            raise ValueError(f"unknown extra draws {sorted(unknown)}; expected some of {sorted(EXTRA_DRAWS)}")
        self.extra_draws = tuple(name for name in EXTRA_DRAWS if name in extra_draws)  # a fixed order
        self.ndims = {**getattr(batches, "ndims", {}), "noise": 4, "timesteps": 1}
        if with_latent_eps:
            self.ndims["latent_eps"] = 4
        self.ndims.update({name: 4 for name in self.extra_draws})
        self.num_samples = getattr(batches, "num_samples", None)

    def draw(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        b = next(iter(batch.values())).shape[0]
        batch["noise"] = torch.randn((b, *self.latent_shape), generator=g)
        batch["timesteps"] = torch.randint(0, self.num_train_timesteps, (b,), generator=g)
        if self.with_latent_eps:
            batch["latent_eps"] = torch.randn((b, *self.latent_shape), generator=g)
        if self.extra_draws:
            # Their own per-batch stream: switching an option on leaves the noise and timesteps unchanged.
            g_extra = torch.Generator().manual_seed(g.initial_seed() ^ 0x5DEECE66D)
            for name in self.extra_draws:
                shape = (self.latent_shape[0], 1, 1) if EXTRA_DRAWS[name] == "channel" else self.latent_shape
                batch[name] = torch.randn((b, *shape), generator=g_extra)
        return batch


class CaptionDropout(_PerBatch):
    """Replace each sample's caption by the empty prompt with probability `p` (host-drawn, seeded), so
    the model also learns the unconditional prediction that classifier-free guidance needs.

    `empty` maps the batch key that carries the caption (`input_ids` (L,) or `encoder_hidden_states`
    (L, D)) to its value for the empty prompt "".
    """

    def __init__(self, batches: Any, p: float, empty: dict[str, torch.Tensor], seed: int, process_index: int = 0):
        super().__init__(batches, seed * 1_000_003 + process_index + 500_009)
        self.p, self.empty = p, empty
        self.ndims = getattr(batches, "ndims", {})
        self.num_samples = getattr(batches, "num_samples", None)

    def draw(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        key = next(k for k in self.empty if k in batch)
        drop = torch.rand(batch[key].shape[0], generator=g) < self.p
        value = batch[key].clone()
        value[drop] = self.empty[key].to(value.dtype)
        batch[key] = value
        return batch
