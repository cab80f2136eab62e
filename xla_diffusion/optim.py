"""The optimizer and its learning-rate schedule.

AdamW keeps fp32 moments beside the fp32 master weights. Every per-step scalar it uses lives on the device (a
0-d lr tensor, one `capturable` step count per param group: `SharedStepAdamW`), so a changing learning rate is
graph data, never a graph constant that would recompile the step. The schedule is diffusers' own
(`diffusers.optimization.get_scheduler`): the same name gives the same lr at every step as in diffusers'
scripts, computed on the host and copied into the optimizer's lr tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import _get_scalar_dtype

from . import runtime

# The names diffusers' train_text_to_image.py accepts for --lr_scheduler.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class SharedStepAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay, no amsgrad) whose parameters share one device step count per param group.

    The update is torch's capturable single-tensor AdamW, op for op, so its results are bitwise torch's. What
    differs is where the per-step scalars come from: torch keeps a 0-d `step` per parameter and computes the bias
    corrections, step size and epsilon term from it for every parameter, ~11 scalar ops per parameter tensor in
    the step graph plus one more input and output each. Here `state[p]["step"]` is the same tensor for every
    parameter of a group, advanced once per step, and those scalars are computed once per group. For SD2-base's
    686 parameter tensors that removes ~7,500 scalar ops from the step graph and 685 of the 3,430 tensors a
    replayed step hands the compiled graph and re-points (bench/first_step.py and bench/host_overhead.py measure
    both). The checkpoint layout is unchanged: every parameter's state still has its `step`.
    """

    def __init__(self, params: Any, lr: float | torch.Tensor, betas: tuple[float, float], weight_decay: float,
                 eps: float) -> None:
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, amsgrad=False,
                         capturable=True, foreach=False)
        # While a replayed step is recorded with flat state (flat_state.StateLayout, bound by state.TrainState): per
        # chunk of a group's parameters, the flat buffers of (weights, exp_avg, exp_avg_sq), each the chunk's
        # tensors flattened and concatenated in order. The update then runs on the buffers, a few large ops.
        self.flat_chunks: list[tuple[dict, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def group_step(self, group: dict) -> torch.Tensor:
        """The group's shared step count, created (0, on the parameters' device) and given to every parameter's
        state on first use; the moments of a parameter without state are created as zeros, as torch's AdamW
        creates them inside its first step."""
        shared = existing_group_step(self, group)
        if shared is None:
            shared = torch.zeros((), dtype=_get_scalar_dtype(), device=group["params"][0].device)
        for p in group["params"]:
            st = self.state[p]
            if not st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] = shared
        return shared

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["maximize"] or group["amsgrad"]:
                raise ValueError("SharedStepAdamW implements neither maximize nor amsgrad")
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            step = self.group_step(group)
            step += 1
            # the scalars of torch's capturable path (same expressions, same order), once per group
            decay = 1 - lr * wd
            step_size_neg = (lr / (1 - beta1**step)).neg()
            denom_scale = (1 - beta2**step).sqrt() * step_size_neg
            denom_eps = eps / step_size_neg
            flat: set[int] = set()  # parameters updated through their chunk's buffers
            for g, chunk, weights, exp_avg, exp_avg_sq in self.flat_chunks:
                # a chunk with a parameter left without a gradient keeps torch's semantics (that parameter is
                # not updated at all) through the per-tensor path below
                if g is group and all(p.grad is not None for p in chunk):
                    grad = torch.cat([p.grad.reshape(-1) for p in chunk])
                    _adamw_update(weights, grad, exp_avg, exp_avg_sq, wd, decay, beta1, beta2, denom_scale,
                                  denom_eps)
                    flat.update(id(p) for p in chunk)
            for p in params:
                if id(p) not in flat:
                    st = self.state[p]
                    _adamw_update(p, p.grad, st["exp_avg"], st["exp_avg_sq"], wd, decay, beta1, beta2, denom_scale,
                                  denom_eps)
        return loss


def _adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  wd: float, decay: torch.Tensor, beta1: float, beta2: float, denom_scale: torch.Tensor,
                  denom_eps: torch.Tensor) -> None:
    """One AdamW update of `param` in place (torch's capturable single-tensor ops, in its order), elementwise:
    the same for one parameter tensor as for a flat buffer of many."""
    if wd != 0:
        param.mul_(decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    param.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / denom_scale).add_(denom_eps))


def make_optimizer(
    module: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, eps: float,
    shared_step: bool = True,
) -> torch.optim.Optimizer:
    """AdamW over the module's fp32 parameters; its moments are fp32 too (they follow the parameters).
    `shared_step=False` gives torch's own AdamW (a step count per parameter: the trainer before stop 25, kept
    for bench/first_step.py's comparison); both update the weights bitwise alike.

    The learning rate is a 0-d device tensor and the step count lives on the device (`capturable`), so every
    per-step scalar of the update is graph data computed on the device. With Python floats instead, torch_xla
    turns scalars into graph constants when they round to 0 or 1 (or coincide with another scalar):
    `1 - lr * weight_decay` reaches 1.0f as a decaying lr nears 0 and `1 - beta2**t` reaches 1.0f after ~16k
    steps, and each time the step compiles again.
    """
    device = next(module.parameters()).device
    [lr_tensor] = runtime.to_device([torch.tensor(lr, dtype=torch.float32)], device)
    if shared_step:
        return SharedStepAdamW(module.parameters(), lr=lr_tensor, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(
        module.parameters(), lr=lr_tensor, betas=betas,
        weight_decay=weight_decay, eps=eps, capturable=True, foreach=False,
    )


def existing_group_step(optimizer: torch.optim.Optimizer, group: dict) -> torch.Tensor | None:
    """The `step` tensor of the first parameter of `group` that has one (a SharedStepAdamW group's shared count),
    or None."""
    return next((optimizer.state[p]["step"] for p in group["params"] if "step" in optimizer.state.get(p, {})), None)


def prime_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam/AdamW's per-parameter state (step, exp_avg, exp_avg_sq[, max_exp_avg_sq]) as zeros, so a
    checkpoint can be loaded into it in place; parameters that already have state are left alone.

    The tensors are what `torch.optim.AdamW` itself would create at its first step (same keys, dtypes,
    devices; `step` a 0-d float32 tensor on the parameter's device under `capturable`, replicated), with each
    moment sharded like its parameter (FSDP); a SharedStepAdamW's parameters get their group's one `step`.
    They are made by host-to-device transfers, so priming compiles nothing
    and leaves the parameters untouched (torch_xla's `prime_optimizer` runs a zero-gradient step instead:
    one more compiled graph, ~14 s for the tiny UNet on 4 CPU devices).
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"prime_optimizer knows Adam/AdamW state, not {type(optimizer).__name__}")
    shared = isinstance(optimizer, SharedStepAdamW)
    for group in optimizer.param_groups:
        if group.get("fused"):
            raise TypeError("prime_optimizer does not handle fused Adam/AdamW (its step lives elsewhere)")
        group_step = existing_group_step(optimizer, group) if shared else None
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            step = group_step
            if step is None:
                # torch's own choice of dtype for `step` (float32 unless the default dtype is float64)
                step = torch.zeros((), dtype=_get_scalar_dtype())
                if group["capturable"]:
                    # device data annotated as replicated, as the step leaves it: a `.to(device)` 0.0 would be a
                    # graph constant, and an unannotated input, either making step 1 a graph of its own
                    [step] = runtime.to_device([step], p.device)
                if shared:
                    group_step = step
            state = {"step": step, "exp_avg": runtime.device_zeros_like(p), "exp_avg_sq": runtime.device_zeros_like(p)}
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = runtime.device_zeros_like(p)
            optimizer.state[p] = state


def lr_factor_fn(name: str, warmup_steps: int, total_steps: int, peak_lr: float) -> Callable[[int], float]:
    """The multiplier on the peak lr at 0-based optimizer step k, exactly as diffusers' `get_scheduler(name,
    num_warmup_steps, num_training_steps)` applies it (its LambdaLR's lambda, read off a throw-away optimizer
    with the same peak lr: the polynomial schedule's factor depends on it)."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {name!r}; expected one of {', '.join(LR_SCHEDULERS)}")
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak_lr)
    return get_scheduler(name, probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps).lr_lambdas[0]


LR_FLOOR = 1e-20  # the smallest lr given to the device optimizer (LrSchedule.set_step says why)


class LrSchedule:
    """Learning rate per optimizer step; `set_step(k)` writes it into every param group (the device lr tensor:
    a transfer, never a graph constant) before update k + 1 runs. Its only state is the step it is asked for."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        lr = optimizer.param_groups[0]["lr"]
        self.peak = float(lr.detach().cpu()) if isinstance(lr, torch.Tensor) else float(lr)
        self.factor = lr_factor_fn(name, warmup_steps, total_steps, self.peak)
        self.lr = self.peak
        self._device_lr: dict[int, float] = {}  # id of a group's device lr tensor -> the value last sent to it

    def set_step(self, step: int) -> float:
        """Set the lr for 0-based optimizer step `step` in every param group; returns it (the schedule's value)."""
        runtime.fill_scalars(*self.device_values(step))
        return self.lr

    def device_values(self, step: int) -> tuple[list[torch.Tensor], list[float]]:
        """Set the lr for 0-based optimizer step `step` in every param group whose lr is a float, and return the
        device lr tensors whose value changes, with their new value: the caller must fill them
        (`runtime.fill_scalars`, as `set_step` does). A value the tensors already hold is not sent again (a
        constant schedule's lr after the first step).

        The device lr is at least LR_FLOOR: capturable AdamW divides by -lr / bias_correction1, so at an lr of
        exactly 0 (warm-up's first step) a parameter whose gradient is 0 (both moments 0) gets 0 / (0 / -0)
        = NaN. At 1e-20 the update is 1e-20 x the Adam direction, below fp32 resolution of any weight."""
        self.lr = self.peak * self.factor(step)
        value = max(self.lr, LR_FLOOR)
        targets = []
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = self.lr
            elif self._device_lr.get(id(group["lr"])) != value:
                # from device data (`fill_scalars`): a CPU source would make an lr of 0 a graph constant
                targets.append(group["lr"])
                self._device_lr[id(group["lr"])] = value
        return targets, [value] * len(targets)
