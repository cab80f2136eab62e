"""The run's side of checkpointing: when to save (every --checkpointing_steps, and at a preemption notice),
what a checkpoint holds (the TrainState's device tensors; the global step and the data position the steps
consumed), how a run resumes from one, and SIGTERM.

Everything else a run changes is derived from the global step: the lr (diffusers' schedule at that step),
the EMA decay (its warm-up at that update), and every host random draw (noise, timesteps, posterior eps,
caption dropout per host batch; crops, flips and caption choices per sample), which are seeded by the batch
or sample index (data.randomness). So the host state is small: `{"global_step": N, "data": position}`.

SIGTERM is a preemption notice. On one host the first SIGTERM sets a flag: the loop finishes the step it is
in, saves a checkpoint of it (unless that step was just saved), waits until it is durable, prints where it is
and how to resume, and the run exits 0. The handler restores the default action, so a second SIGTERM ends
the process at once; the checkpoint being written then lacks its COMPLETE marker and is skipped, and every
earlier one is untouched. On several hosts XLA's preemption sync manager takes SIGTERM instead
(`runtime.activate_preemption_sync`): the hosts agree through the XLA coordination service on the step to
stop at, and all of them checkpoint that step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import fsio, runtime
from .checkpoint import CheckpointError, CheckpointInfo, config_fingerprint, training_state
from .checkpoint import step_dir as checkpoint_dir
from .checkpointer import Checkpointer
from .errors import ConfigError
from .tracking import metrics_path

log = logging.getLogger(__name__)

# Config fields a resume must not change: the model, the data and how it is read, the batch, the objective and
# the seed (each changes what the remaining steps compute). The step count, the lr schedule, logging,
# evaluation, checkpointing, the loader worker count of the image path and the mesh may change.
FINGERPRINT_FIELDS = (
    "pretrained_model_name_or_path", "revision", "variant", "dataset_name", "dataset_config_name", "train_data_dir",
    "image_column", "caption_column", "max_train_samples", "eval_heldout_fraction", "resolution", "center_crop",
    "random_flip", "image_interpolation_mode", "shuffle_buffer_size", "train_batch_size",
    "gradient_accumulation_steps", "prediction_type",
    "snr_gamma", "p2_gamma", "p2_k", "noise_offset", "input_perturbation", "proportion_empty_prompts", "use_ema",
    "seed",
)
# Fingerprinted only when on: checkpoints from before DREAM existed (it was refused then) still resume without it.
DREAM_FIELDS = ("dream_training", "dream_detail_preservation")


def run_fingerprint(cfg: Any) -> dict[str, Any]:
    """The config fields a resumed run must share with its checkpoint (a TrainConfig's)."""
    return config_fingerprint(cfg, FINGERPRINT_FIELDS + (DREAM_FIELDS if cfg.dream_training else ()))


def check_output_dir(output_dir: str) -> None:
    """Create OUTPUT_DIR and write a probe file there, before any device work; ConfigError (one line) when
    that fails (a parent that is a file, no permission, read-only disk, unreachable bucket)."""
    probe = fsio.join(output_dir, f".probe_{os.getpid()}")
    try:
        fsio.makedirs(output_dir)
        fsio.write_bytes_atomic(probe, b"")
        fsio.remove(probe)
    except Exception as e:  # noqa: BLE001 (any failure to write there is the same one line)
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"--output_dir {output_dir} cannot be written: {type(e).__name__}: {detail}") from None


def trim_metrics(path: str | None, step: int) -> None:
    """Drop the records of steps after `step` from the run's metrics.jsonl (local, process 0): a run that
    resumes at `step` logs them again, and the steps a killed run did after its last checkpoint must not
    appear twice. (TensorBoard and wandb keep what they received; their readers show the last value of a
    step.)"""
    if path is None or not os.path.isfile(path):
        return
    kept = [r for r in fsio.read_jsonl(path) if int(r.get("step", 0)) <= step]
    fsio.write_bytes_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode("utf-8"))


class Preemption:
    """Whether the run must stop now with a checkpoint. One host: our SIGTERM handler (installed by
    `install`, main thread only). Several hosts: XLA's preemption sync manager, so that every host stops at
    the same step."""

    def __init__(self, process_count: int):
        self.shared = process_count > 1
        self.notified = False
        self._previous: Any = None
        if self.shared:
            runtime.activate_preemption_sync()

    def install(self) -> None:
        if not self.shared and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.notified = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        log.info("SIGTERM: the run stops after this step with a checkpoint (a second SIGTERM exits at once)")

    def due(self, step: int) -> bool:
        return runtime.preemption_sync_point(step) if self.shared else self.notified


class RunCheckpoints:
    """The checkpoints of one run (every process builds one, and calls the same methods at the same steps)."""

    def __init__(self, cfg: Any, rt: runtime.Runtime):
        self.output_dir, self.every = cfg.output_dir, cfg.checkpointing_steps
        self.metrics_path = metrics_path(cfg.logging_dir, cfg.output_dir)
        self.is_main = rt.is_main_process
        self.fingerprint = run_fingerprint(cfg)
        self.store = Checkpointer(cfg.output_dir, cfg.checkpoints_total_limit, mesh=rt.mesh)
        self.preemption = Preemption(rt.process_count)
        self.saved_step: int | None = None
        self.stalls: list[float] = []
        self.resumed_from: str | None = None
        self.preempted_at: tuple[int, str] | None = None

    @staticmethod
    def tensors(state: Any) -> dict[str, Any]:
        return training_state(state.unet, state.optimizer, state.ema.shadow if state.ema is not None else None)

    def begin(self, found: CheckpointInfo | None, state: Any) -> dict[str, Any] | None:
        """Before the first step: load `found` (if any) into the state's tensors in place and set its step;
        returns the data position to start from (None: the start). The metrics log keeps only the steps
        up to the one the run starts from."""
        position = None
        if found is not None:
            t0 = time.perf_counter()
            host = self.store.restore(found, self.tensors(state), self.fingerprint)
            try:
                state.step, position = int(host["global_step"]), dict(host["data"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"checkpoint {found.path} has no training host state ({e})") from None
            self.resumed_from, self.saved_step = found.path, state.step
            if self.is_main:
                log.info("resumed from %s at step %d in %.1f s", found.path, state.step, time.perf_counter() - t0)
        if self.is_main:
            trim_metrics(self.metrics_path, state.step)
        return position

    def after_step(self, step: int, state: Any, data_position: dict[str, Any],
                   before_save: Callable[[], None] = lambda: None) -> bool:
        """At the end of step `step`: save when due (the cadence, or a preemption notice), calling `before_save`
        first; True when the run must stop now (preempted, with its checkpoint durable)."""
        preempted = self.preemption.due(step)
        if (self.every and step % self.every == 0 or preempted) and self.saved_step != step:
            before_save()
            t0 = time.perf_counter()
            self.store.save(step, self.tensors(state), {"global_step": step, "data": data_position},
                            self.fingerprint)
            self.stalls.append(time.perf_counter() - t0)
            self.saved_step = step
        if not preempted:
            return False
        self.preempted_at = (step, self.store.wait() or checkpoint_dir(self.output_dir, step))
        return True

    def report_preemption(self) -> None:
        """The one line a preempted run ends with (process 0; after the progress bar is closed)."""
        if self.is_main and self.preempted_at is not None:
            step, path = self.preempted_at
            log.warning("preempted at step %d: checkpoint %s is complete; run the same command with "
                        "--resume_from_checkpoint latest to continue", step, path)

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the pending save (durable before the export starts or the process ends)."""
        self.preemption.uninstall()
        try:
            self.store.close()
        except CheckpointError as e:
            if raise_errors:
                raise
            print(f"warning: {e}", file=sys.stderr)

    def summary(self) -> dict[str, Any]:
        return {"checkpoints_saved": len(self.stalls),
                "checkpoint_stall_s": sum(self.stalls) / len(self.stalls) if self.stalls else None,
                "resumed_from": self.resumed_from}
