"""Exponential moving average of the trained UNet's weights (`--use_ema`), updated inside the step's graph.

The shadow weights are fp32 device tensors beside the master weights. Their update is traced right after
the optimizer step, so it is part of the one compiled step graph. The decay of each step is never a graph
constant that would recompile the step when its value changes: the graph computes it from the optimizer's
device step count (`update_count`, the trainer's case: no transfer per step), or reads it from a 0-d device
tensor filled from the host (a transfer, like the learning rate). In-loop validation, evaluation and the
export swap the shadow tensors into the module (a Python-side exchange of `.data`: no device work, no copy),
so they run the graphs they always run, on the averaged weights.
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

    def __init__(self, params: list[torch.nn.Parameter], max_decay: float, update_count: torch.Tensor | None = None):
        """`update_count`: a 0-d device tensor holding the number of the update being made when `update()` is
        traced (AdamW's step count, which its step has just incremented); the graph then computes the decay
        from it. Without it, `set_update` sends each update's decay from the host."""
        self.params = list(params)
        self.max_decay = max_decay
        self.update_count = update_count
        # Built by a host round trip, not `clone()`: on XLA a clone is a pending lazy op that the next graph
        # cut (possibly an evaluation's) would compile as one more graph; transferred tensors are plain
        # device data, each sharded like its parameter (replicated, or split over the fsdp axis under FSDP),
        # as the step leaves them.
        device = self.params[0].device
        with torch.no_grad():
            self.shadow = [runtime.device_copy(p) for p in self.params]
        [self._decay] = runtime.to_device([torch.zeros((), dtype=torch.float32)], device)
        self.decay = self._device_decay = 0.0  # the decay of the next update, and the value `_decay` holds
        # While a replayed step is recorded with flat state (flat_state.StateLayout, bound by state.TrainState): per
        # chunk of parameters, (the parameters, the flat buffer of their updated weights, that of their shadows)
        self.flat_chunks: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = []

    @property
    def decay_tensor(self) -> torch.Tensor | None:
        """The 0-d device tensor the traced update reads its decay from (None: computed from `update_count`)."""
        return self._decay if self.update_count is None else None

    def set_update(self, update: int) -> float:
        """Set the decay for optimizer update number `update` (1-based) before the step runs; returns it."""
        runtime.fill_scalars(*self.device_values(update))
        return self.decay

    def device_values(self, update: int) -> tuple[list[torch.Tensor], list[float]]:
        """Set the decay for optimizer update number `update` (1-based), and return the device decay tensor with
        its new value when that changes (as a list of none or one; none with `update_count`, which the graph
        reads instead): the caller must fill it (`runtime.fill_scalars`, as `set_update` does)."""
        decay = self.decay = ema_decay(update, self.max_decay)
        if self.update_count is not None or decay == self._device_decay:
            return [], []
        # from device data: a CPU source would make the first update's decay, 0, a graph constant
        self._device_decay = decay
        return [self._decay], [decay]

    def _traced_decay(self) -> torch.Tensor:
        """The decay as the step's graph reads it: `ema_decay` of the update count, or the host's value."""
        if self.update_count is None:
            return self._decay
        n = self.update_count.to(torch.float32)
        # ema_decay in fp32 on the device (0 at the first update). The fp32 division is correctly rounded and the
        # host's value rounded twice (float64, then fp32); they agree at every update up to 100,000 (tested)
        return torch.where(n > 1, torch.clamp(n / (n + 9), max=self.max_decay), torch.zeros_like(n))

    @torch.no_grad()
    def update(self) -> None:
        """Trace the update into the current graph (call after optimizer.step(), before the graph runs)."""
        weight = 1.0 - self._traced_decay()
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
