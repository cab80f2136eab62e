"""Exponential moving average of the trained UNet's weights (`--use_ema`), updated inside the step's graph.

The shadow weights are fp32 device tensors beside the master weights. Their update is traced right after
the optimizer step, so it is part of the one compiled step graph; the decay of each step is a 0-d device
tensor filled from the host (a transfer, like the learning rate), never a graph constant that would
recompile the step when its value changes. In-loop validation, evaluation and the export swap the shadow
tensors into the module (a Python-side exchange of `.data`: no device work, no copy), so they run the
graphs they always run, on the averaged weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import runtime


def ema_decay(update: int, max_decay: float) -> float:
    """Decay applied at optimizer update number `update` (1-based): 0 at the first (the average starts as
    the weights after one update), then (update / (update + 9)) capped at `max_decay`. This is diffusers'
    EMAModel default warm-up, so short runs are not dominated by the initial weights."""
    if update <= 1:
        return 0.0
    return min(max_decay, update / (update + 9))


class EmaWeights:
    """Shadow copies of `params` (fp32, on their device) and their update rule
    shadow <- decay * shadow + (1 - decay) * param."""

    def __init__(self, params: list[torch.nn.Parameter], max_decay: float):
        self.params = list(params)
        self.max_decay = max_decay
        # Built by a host round trip, not `clone()`: on XLA a clone is a pending lazy op that the next graph
        # cut (possibly an evaluation's) would compile as one more graph; transferred tensors are plain
        # device data, each sharded like its parameter (replicated, or split over the fsdp axis under FSDP),
        # as the step leaves them.
        device = self.params[0].device
        with torch.no_grad():
            self.shadow = [runtime.device_copy(p) for p in self.params]
        [self._decay] = runtime.to_device([torch.zeros((), dtype=torch.float32)], device)
        self.decay = 0.0
        # While a replayed step is recorded with flat state (flat_state.StateLayout, bound by state.TrainState): per
        # chunk of parameters, (the parameters, the flat buffer of their updated weights, that of their shadows)
        self.flat_chunks: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = []

    @property
    def decay_tensor(self) -> torch.Tensor:
        """The 0-d device tensor the traced update reads its decay from."""
        return self._decay

    def set_update(self, update: int) -> float:
        """Set the decay for optimizer update number `update` (1-based) before the step runs; returns it."""
        self.decay = ema_decay(update, self.max_decay)
        # from device data: a CPU source would make the first update's decay, 0, a graph constant
        # the transferred buffer itself (see optim.LrSchedule.set_step: a copy_ would be graph work)
        self._decay.data = runtime.to_device([torch.tensor(self.decay, dtype=torch.float32)], self._decay.device)[0]
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Trace the update into the current graph (call after optimizer.step(), before the graph runs)."""
        weight = 1.0 - self._decay
        flat: set[int] = set()
        for params, weights, shadow in self.flat_chunks:
            # only when the optimizer updated the chunk through its buffer (else its tensors hold the weights)
            if runtime.pending_count([weights]) == 1:
                shadow.lerp_(weights, weight)  # elementwise: the per-tensor update, on the flat buffers
                flat.update(id(p) for p in params)
        for s, p in zip(self.shadow, self.params):
            if id(p) not in flat:
                s.lerp_(p.detach(), weight)

    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.data, self.shadow[i] = self.shadow[i], p.data

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the module holds the averaged weights; the training weights come back after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()
