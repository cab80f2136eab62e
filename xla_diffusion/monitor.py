"""Host-side bookkeeping of the loop: metrics fed by step closures, the progress bar, the compilation bound,
and the one clock that times steps.

The clock runs on "active" time: wall time minus the time spent in `paused()` blocks (in-loop evaluation), so
logged step times, images/s and the run's mean step time never include evaluation, and compilations inside
those blocks are kept out of the step's count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from . import runtime
from .errors import TooManyCompilations

if TYPE_CHECKING:
    from .flops import Utilisation


class StepMonitor:
    def __init__(self, global_batch: int, max_steps: int, tracker: Any, max_compilations: int,
                 timing_warmup_steps: int, show_progress: bool, start_step: int = 0,
                 utilisation: Utilisation | None = None):
        self.global_batch, self.max_steps, self.tracker = global_batch, max_steps, tracker
        self.utilisation = utilisation  # FLOPs per step and peak: MFU beside images/s (None: not reported)
        self.max_compilations, self.timing_warmup_steps = max_compilations, timing_warmup_steps
        self.history: list[dict[str, Any]] = []
        self.compile_base = runtime.compile_count()
        self.excluded_compilations = 0  # compiled inside paused() blocks, not by the step
        # graphs compiled outside paused() blocks that are not the step's either: packing and unpacking the
        # replayed step's flat state (flat_state.StateLayout)
        self.other_compilations: Callable[[], int] = lambda: 0
        self.paused_s = 0.0
        self.start = time.perf_counter()
        self.start_step = start_step  # the step a resumed run starts after
        self._last_log = (self._clock(), start_step)  # (active time, step) of the last logged step
        self._timed_from = (self._clock(), start_step)  # where the timed window (after warm-up) starts
        self.progress = None
        if show_progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=max_steps, initial=start_step, desc="steps", dynamic_ncols=True)

    def _clock(self) -> float:
        return time.perf_counter() - self.paused_s

    def compilations(self) -> int:
        """Graphs the training step compiled (those of paused() blocks excluded)."""
        return runtime.compile_count() - self.compile_base - self.excluded_compilations - self.other_compilations()

    @contextlib.contextmanager
    def paused(self, count_compilations: bool = True) -> Iterator[None]:
        """Work between steps (evaluation): its time and compilations are not the step's. With
        `count_compilations=False` its compilations are left to `other_compilations`, which counts them."""
        t0, c0 = time.perf_counter(), runtime.compile_count()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0
            if count_compilations:
                self.excluded_compilations += runtime.compile_count() - c0

    def on_step_done(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                     extra: dict[str, Any] | None = None) -> None:
        """Runs as a step closure: the tensors are already computed, reading them starts no graph. `extra`:
        host values logged with the step's metrics (e.g. the data's skip counts)."""
        now = self._clock()
        last_time, last_step = self._last_log
        dt = (now - last_time) / max(step - last_step, 1)
        self._last_log = (now, step)
        metrics = {
            "step": step,
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "step_time_s": dt,
            "images_per_s": self.global_batch / dt,
            "compilations": self.compilations(),
            **(extra or {}),
            **self._mfu(dt),
        }
        self.history.append(metrics)
        self.tracker.log(metrics)
        if self.progress is not None:
            mfu = {"mfu": f"{metrics['mfu']:.1%}"} if "mfu" in metrics else {}
            self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}", **mfu)

    def _mfu(self, step_time_s: float) -> dict[str, float]:
        """{"mfu": value} for a step time, or {} when MFU is not reported."""
        value = self.utilisation.mfu(step_time_s) if self.utilisation is not None else None
        return {} if value is None else {"mfu": value}

    def after_step(self, step: int) -> None:
        """After the step's graph was launched: progress, the compilation bound, the start of the timed window."""
        if self.progress is not None:
            self.progress.update(1)
        if self.compilations() > self.max_compilations:
            raise TooManyCompilations(
                f"the training step compiled {self.compilations()} XLA graphs by step {step}, more than "
                f"--max_compilations {self.max_compilations}: something in the step changes shape or "
                "constant values between steps (set PT_XLA_DEBUG_LEVEL=2 to see why)"
            )
        if step == self.start_step + self.timing_warmup_steps and step < self.max_steps:
            runtime.wait_device_ops()
            self._timed_from = (self._clock(), step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()  # before any error line, so the bar never prints after it
            self.progress = None

    def timing(self, last_step: int) -> dict[str, Any]:
        """Once the loop is done: the mean step time over the timed window, and wall and evaluation time."""
        runtime.wait_device_ops()
        t0, s0 = self._timed_from
        timed_steps = last_step - s0
        mean = (self._clock() - t0) / max(timed_steps, 1)
        work = self.utilisation.summary() if self.utilisation is not None else {}
        return {"mean_step_time_s": mean, "timed_steps": timed_steps, "images_per_s": self.global_batch / mean,
                **work, "mfu": self._mfu(mean).get("mfu"), "compilations": self.compilations(),
                "eval_time_s": self.paused_s, "wall_time_s": time.perf_counter() - self.start}
