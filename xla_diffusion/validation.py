"""The fixed-timestep validation loss (the MLPerf text-to-image metric): the training objective on a held-out
set with the timesteps and the noise fixed, so two checkpoints compare without sampling noise. Used by the
trainer's in-loop evaluation and by `eval.evaluate`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .data.randomness import sample_generator
from .errors import EvalError


def fixed_timesteps(num_train_timesteps: int, k: int) -> list[int]:
    """k evenly spaced timesteps, the centres of k equal bins of [0, T): floor((i + ½) T / k)."""
    if not 1 <= k <= num_train_timesteps:
        raise EvalError(f"the number of evaluation timesteps must be in [1, {num_train_timesteps}], got {k}")
    return [int((i + 0.5) * num_train_timesteps / k) for i in range(k)]


class FixedTimestepBatches:
    """Wrap a finite, ordered source of host batches (dicts of (B, ...) tensors); yield `(t, batch)` for every
    batch and every timestep in `timesteps`, each batch extended with

    - `timesteps`: (B,) int64, all equal to t;
    - `noise`: (B, C, h, w) float32, sample i's own fixed noise for timestep t;
    - `latent_eps`: (B, C, h, w) float32, sample i's fixed draw of the VAE posterior (same for every t).

    Sample i (counted from `index_offset`) draws from a generator seeded by (seed, i) alone, so the values do
    not depend on the batch size or the device count, and two evaluations see exactly the same noise."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], timesteps: Sequence[int],
                 latent_shape: tuple[int, int, int], seed: int = 0, index_offset: int = 0):
        self.batches, self.timesteps, self.latent_shape = batches, list(timesteps), tuple(latent_shape)
        self.seed, self.index_offset = seed, index_offset
        self.ndims = {**getattr(batches, "ndims", {}), "noise": 4, "timesteps": 1, "latent_eps": 4}

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        index = self.index_offset
        shape = (1, *self.latent_shape)
        for batch in self.batches:
            b = next(iter(batch.values())).shape[0]
            gens = [sample_generator(self.seed, index + i) for i in range(b)]
            index += b
            latent_eps = torch.cat([torch.randn(shape, generator=g) for g in gens])
            noises = [torch.cat([torch.randn(shape, generator=g) for g in gens]) for _ in self.timesteps]
            for t, noise in zip(self.timesteps, noises):
                yield t, {**batch, "latent_eps": latent_eps, "noise": noise,
                          "timesteps": torch.full((b,), t, dtype=torch.int64)}


def validation_loss(
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[tuple[int, dict[str, torch.Tensor]]],
    after_each: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Mean of `loss_fn(batch)` (a scalar: the batch's mean loss) over `(t, batch)` pairs, overall and per t:
    `{"eval_loss": ..., "eval_loss_t0062": ..., ...}`. All batches must have the same size (the mean of
    batch means is then the mean over samples). `after_each` runs after every call: on XLA a sync, so every
    call is the same graph; the values are read only at the end (already computed, a transfer, no graph)."""
    losses: list[tuple[int, torch.Tensor]] = []
    for t, batch in batches:
        losses.append((t, loss_fn(batch)))
        if after_each is not None:
            after_each()
    if not losses:
        raise EvalError("the held-out set is empty (smaller than one batch?)")
    per_t: dict[int, list[float]] = {}
    for t, loss in losses:
        per_t.setdefault(t, []).append(float(loss))
    out = {"eval_loss": float(np.mean([v for vs in per_t.values() for v in vs]))}
    out.update({f"eval_loss_t{t:04d}": float(np.mean(vs)) for t, vs in sorted(per_t.items())})
    return out
