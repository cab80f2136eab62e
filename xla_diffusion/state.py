"""The training state: everything a run changes and a checkpoint must hold — the fp32 UNet master weights on
the mesh, AdamW and its moments, the lr schedule, the EMA shadows and the number of optimizer updates done."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .ema import EmaWeights
from .optim import LrSchedule, make_optimizer, prime_optimizer


@dataclass
class TrainState:
    unet: torch.nn.Module  # on the device, fp32, in train mode
    optimizer: torch.optim.Optimizer
    lr_schedule: LrSchedule
    ema: EmaWeights | None
    step: int = 0  # optimizer updates done

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
            ema=EmaWeights(list(unet.parameters()), cfg.ema_decay) if cfg.use_ema else None,
        )

    def begin_step(self) -> float:
        """Fill the device scalars of update `step + 1` from the host (lr, EMA decay); returns the lr."""
        lr = self.lr_schedule.set_step(self.step)
        if self.ema is not None:
            self.ema.set_update(self.step + 1)
        return lr

    def step_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step updates in place, in a fixed order: the UNet's parameters, AdamW's
        per-parameter tensors (by key), the EMA shadows (what `replay.StepReplay` hands the step as its state)."""
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
        if self.ema is not None:
            out += self.ema.shadow
        return out

    def step_scalars(self) -> list[torch.Tensor]:
        """The 0-d device tensors `begin_step` fills for each step: every param group's lr, the EMA decay."""
        lrs = [g["lr"] for g in self.optimizer.param_groups if isinstance(g["lr"], torch.Tensor)]
        return lrs + ([self.ema.decay_tensor] if self.ema is not None else [])

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within the block the UNet holds the weights to evaluate and export: the EMA when there is one."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            yield

