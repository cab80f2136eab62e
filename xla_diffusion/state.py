"""The training state: everything a run changes and a checkpoint must hold — the fp32 UNet master weights on
the mesh, AdamW and its moments, the lr schedule, the EMA shadows and the number of optimizer updates done."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import runtime
from .ema import EmaWeights
from .flat_state import FLAT_ELEMENTS, REPLICATED, StateLayout
from .optim import LrSchedule, SharedStepAdamW, existing_group_step, make_optimizer, prime_optimizer


@dataclass
class TrainState:
    unet: torch.nn.Module  # on the device, fp32, in train mode
    optimizer: torch.optim.Optimizer
    lr_schedule: LrSchedule
    ema: EmaWeights | None
    step: int = 0  # optimizer updates done
    # step_tensors()'s list, with what it was listed for (see there)
    _step_tensors: tuple[tuple[int, int, int], list[torch.Tensor], tuple[torch.Tensor, ...]] | None = field(
        default=None, repr=False, compare=False)

    @classmethod
    def create(cls, unet: torch.nn.Module, cfg: Any) -> TrainState:
        """A fresh state around a UNet already on the device, from the optimisation fields of a TrainConfig."""
        optimizer = make_optimizer(
            unet, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay, cfg.adam_epsilon
        )
        # AdamW's state exists from the start (zeros, as its first step would make them), so a checkpoint
        # restores into it in place and a fresh and a resumed run step the same tensors.
        prime_optimizer(optimizer)
        return cls(
            unet=unet, optimizer=optimizer,
            lr_schedule=LrSchedule(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps),
            # the step computes the EMA decay from AdamW's step count: no transfer per step
            ema=EmaWeights(list(unet.parameters()), cfg.ema_decay, update_count=update_count(optimizer))
            if cfg.use_ema else None,
        )

    def begin_step(self) -> float:
        """Fill the device scalars of update `step + 1` from the host (the lr, when it changes; the EMA decay only
        for an EMA without an update count); returns the lr."""
        # one transfer call for the values that changed (the lr of a constant schedule does not)
        targets, values = self.lr_schedule.device_values(self.step)
        if self.ema is not None:
            ema_targets, ema_values = self.ema.device_values(self.step + 1)
            targets, values = targets + ema_targets, values + ema_values
        runtime.fill_scalars(targets, values)
        return self.lr_schedule.lr

    def step_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step updates in place, in a fixed order: the UNet's parameters, AdamW's
        per-parameter tensors (by key), the EMA shadows (what `replay.StepReplay` hands the step as its state).
        The caller must not change the list: it is kept between steps."""
        # Listed once and kept: walking the optimizer's state every step cost 1.7 ms of host CPU per step for
        # SD2-base's 2,745 tensors, and the list stays the same once the state is primed (a checkpoint restores
        # into these tensors in place). What could change it is checked each call, cheaply: AdamW state for
        # more parameters, and the EMA shadows, which `EmaWeights.applied` swaps for other tensor objects.
        shadow = self.ema.shadow if self.ema is not None else []
        key = (len(self.optimizer.state), len(self.optimizer.param_groups), len(shadow))
        cached = self._step_tensors
        # (the shadows it was listed with are kept apart: comparing them allocates nothing)
        if cached is None or cached[0] != key or not all(map(operator.is_, cached[2], shadow)):
            cached = self._step_tensors = (key, self._list_step_tensors() + shadow, tuple(shadow))
        return cached[1]

    def _list_step_tensors(self) -> list[torch.Tensor]:
        """The parameters and AdamW's per-parameter tensors of `step_tensors()` (the walk it keeps)."""
        # the optimizer's own list: walking the module tree (`unet.parameters()`) each step cost ~6 ms of host
        # time per step for the tiny UNet (the same parameters, in the same order: make_optimizer got them so)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        out = list(params)
        seen: set[int] = set()  # SharedStepAdamW gives a group's parameters one `step` tensor: listed once
        for p in params:
            st = self.optimizer.state.get(p, {})
            for k in sorted(st):
                t = st[k]
                if not isinstance(t, torch.Tensor):
                    continue
                if t.ndim == 0:
                    if id(t) in seen:
                        continue
                    seen.add(id(t))
                out.append(t)
        return out

    def flat_layout(self, tensors: list[torch.Tensor]) -> StateLayout | None:
        """How a replayed step keeps `tensors` (this state's `step_tensors()`) in flat buffers: per chunk of a param
        group's parameters (at most FLAT_ELEMENTS elements), one buffer each for their weights, exp_avg,
        exp_avg_sq and EMA shadows, in parameter order, so AdamW and the EMA update whole buffers at once
        (`SharedStepAdamW.flat_chunks`, `EmaWeights.flat_chunks`). A parameter stays a tensor of its own when any
        of its four is sharded (FSDP), when it takes no gradient, or when it is larger than a buffer. With
        torch's AdamW (no flat update) the generic layout, whose buffers are gathered from their tensors."""
        if not isinstance(self.optimizer, SharedStepAdamW):
            return StateLayout.of(tensors)
        index = {id(t): i for i, t in enumerate(tensors)}
        shadows = dict(zip(map(id, self.ema.params), self.ema.shadow)) if self.ema is not None else None

        def parts(p: torch.Tensor) -> list[torch.Tensor | None]:
            st = self.optimizer.state.get(p, {})
            return [p, st.get("exp_avg"), st.get("exp_avg_sq")] + ([shadows.get(id(p))] if shadows is not None else [])

        def flat_ok(p: torch.Tensor) -> bool:
            return p.requires_grad and p.numel() <= FLAT_ELEMENTS and all(
                t is not None and id(t) in index and t.dtype == p.dtype and t.shape == p.shape
                and runtime.sharding_spec_string(t) in REPLICATED for t in parts(p))

        chunks: list[tuple[dict, list[torch.Tensor]]] = []
        for group in self.optimizer.param_groups:
            current: list[torch.Tensor] = []
            size = 0
            for p in filter(flat_ok, group["params"]):
                if current and size + p.numel() > FLAT_ELEMENTS:
                    chunks.append((group, current))
                    current, size = [], 0
                current.append(p)
                size += p.numel()
            if current:
                chunks.append((group, current))
        if not chunks:
            return None
        kinds = len(parts(chunks[0][1][0]))  # buffers per chunk: weights, exp_avg, exp_avg_sq[, shadows]
        members = [[index[id(parts(p)[k])] for p in params] for _, params in chunks for k in range(kinds)]
        covered = {i for m in members for i in m}
        loose = [i for i in range(len(tensors)) if i not in covered]

        @contextlib.contextmanager
        def bind(buffers: list[torch.Tensor]) -> Iterator[None]:
            own = [buffers[kinds * j:kinds * (j + 1)] for j in range(len(chunks))]
            self.optimizer.flat_chunks = [(g, ps, *b[:3]) for (g, ps), b in zip(chunks, own)]
            if self.ema is not None:
                self.ema.flat_chunks = [(ps, b[0], b[3]) for (_, ps), b in zip(chunks, own)]
            try:
                yield
            finally:
                self.optimizer.flat_chunks = []
                if self.ema is not None:
                    self.ema.flat_chunks = []

        return StateLayout(members, loose, bind)

    def step_scalars(self) -> list[torch.Tensor]:
        """The 0-d device tensors `begin_step` fills for each step: every param group's lr, the EMA decay (when the
        step does not compute it from the update count)."""
        lrs = [g["lr"] for g in self.optimizer.param_groups if isinstance(g["lr"], torch.Tensor)]
        decay = self.ema.decay_tensor if self.ema is not None else None
        return lrs + ([decay] if decay is not None else [])

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within the block the UNet holds the weights to evaluate and export: the EMA when there is one."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            yield


def update_count(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The 0-d device tensor counting a primed optimizer's updates (its first param group's step count; the
    group's one tensor with SharedStepAdamW): the number of the update being made once its step has run."""
    count = existing_group_step(optimizer, optimizer.param_groups[0])
    if count is None:
        raise ValueError("the optimizer has no step count yet: prime it first (optim.prime_optimizer)")
    return count
