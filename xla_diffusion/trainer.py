"""The training loop: data → device (sharded) → compiled step, with metrics leaving the device only
through step closures, a compilation bound, and the pipeline export at the end."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import runtime
from .config import ConfigError, TrainConfig
from .data.randomness import CaptionDropout
from .ema import EmaWeights
from .evaluation import InLoopEvaluator
from .train_step import LrSchedule, StepConfig, make_optimizer, train_step

log = logging.getLogger(__name__)


class TooManyCompilations(RuntimeError):
    """The step graph changed between steps (a recompilation past --max_compilations)."""


@dataclass
class StepMonitor:
    """Host-side bookkeeping fed by step closures: losses, throughput, compile counts."""

    global_batch: int
    tracker: Any
    progress: Any = None
    compile_base: int = 0
    last_time: float = field(default_factory=time.perf_counter)
    last_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    excluded_compilations: int = 0  # compiled by in-loop evaluation, not by the step

    def compilations(self) -> int:
        """Graphs the training step compiled (evaluation graphs excluded)."""
        return runtime.compile_count() - self.compile_base - self.excluded_compilations

    def exclude(self, compilations: int, seconds: float) -> None:
        """Keep work done between steps (evaluation) out of the step's compile count and step time."""
        self.excluded_compilations += compilations
        self.last_time += seconds

    def on_step_done(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """Runs as a step closure: the tensors are already computed, reading them starts no graph."""
        now = time.perf_counter()
        dt = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_time, self.last_step = now, step
        metrics = {
            "step": step,
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "step_time_s": dt,
            "images_per_s": self.global_batch / dt,
            "compilations": self.compilations(),
        }
        self.history.append(metrics)
        self.tracker.log(metrics)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")


def check_batch_divisible(per_host_batch: int, rt: runtime.Runtime) -> int:
    """Global batch size; raises ConfigError when it cannot be split evenly over the devices."""
    global_batch = per_host_batch * rt.process_count
    if global_batch % rt.num_devices:
        raise ConfigError(
            f"global batch {global_batch} (--train_batch_size {per_host_batch} x {rt.process_count} hosts) "
            f"is not divisible by the {rt.num_devices} data-parallel devices of the mesh"
        )
    return global_batch


def build_data_source(cfg: TrainConfig, models: Any, rt: runtime.Runtime, manifest: Any) -> Any:
    """Endless host batches with their per-step randomness: pre-encoded latent shards when
    --train_data_dir holds a latent dataset (a manifest.json at its root, local or gs://), else raw
    image–caption data encoded in the step. `manifest` is `data.latents.read_manifest` of the training
    data (None: not a latent dataset), read by the caller, which also needs it to choose the models."""
    from .data.images import ImageCaptionBatches, load_image_caption_dataset
    from .data.latents import build_latent_source
    from .data.randomness import WithDiffusionRandomness
    from .models import frozen_dtype

    if manifest is not None:
        return build_latent_source(cfg, models, rt, manifest)
    dataset = load_image_caption_dataset(
        cfg.dataset_name, cfg.train_data_dir, cfg.image_column, cfg.caption_column,
        dataset_config_name=cfg.dataset_config_name, cache_dir=cfg.cache_dir,
        max_train_samples=cfg.max_train_samples, process_index=rt.process_index, process_count=rt.process_count,
        heldout_fraction=cfg.eval_heldout_fraction,  # held out for --eval_steps (xla_diffusion.evaluation)
    )
    batches = ImageCaptionBatches(
        dataset, models.tokenizer, cfg.image_column, cfg.caption_column, cfg.train_batch_size,
        cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.dataloader_num_workers, cfg.seed,
        pixel_dtype=frozen_dtype(cfg.mixed_precision),
    )
    return WithDiffusionRandomness(
        batches, models.latent_shape(cfg.resolution), models.noise_scheduler.config.num_train_timesteps,
        seed=cfg.seed, process_index=rt.process_index,
    )


def empty_prompt(source: Any, models: Any) -> dict[str, torch.Tensor]:
    """The empty prompt "" in the form the source carries captions: token ids (L,), or text-encoder states
    (L, D) that a pre-encoded source provides as `empty_prompt`."""
    from .data.images import tokenize

    if "input_ids" in source.ndims:
        return {"input_ids": tokenize(models.tokenizer, [""])[0]}
    provided = getattr(source, "empty_prompt", None)
    if provided is None:
        raise ConfigError("--proportion_empty_prompts needs the empty prompt's text states, which this dataset lacks")
    return provided


def device_loader(source: Any, cfg: TrainConfig, rt: runtime.Runtime) -> Any:
    """MpDeviceLoader that places every batch key sharded on dim 0 over the whole mesh."""
    import torch_xla.distributed.parallel_loader as pl

    # One spec per key: a single spec for tensors of different rank would silently replicate them.
    sharding = {k: runtime.batch_sharding_spec(rt.mesh, nd) for k, nd in source.ndims.items()}
    return pl.MpDeviceLoader(
        source, rt.device, input_sharding=sharding,
        loader_prefetch_size=cfg.loader_prefetch_size, device_prefetch_size=cfg.device_prefetch_size,
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole training job; returns the summary process 0 writes beside the export."""
    from .export import export_pipeline
    from .data.latents import read_manifest as read_latent_manifest
    from .models import frozen_dtype, load_models
    from .tracking import JsonlTracker, NullTracker

    rt = runtime.init_runtime(cfg.fsdp_size, cfg.compile_cache_dir)
    global_batch = check_batch_divisible(cfg.train_batch_size, rt)
    torch.manual_seed(cfg.seed)
    # Latent shards replace the VAE (and the text encoder when they hold text states): not even loaded.
    latents = read_latent_manifest(cfg.train_data_dir) if cfg.dataset_name is None else None
    models = load_models(
        cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.cache_dir,
        load_vae=latents is None, load_text_encoder=latents is None or not latents.has_text_states,
    )
    prediction_type = cfg.prediction_type or models.noise_scheduler.config.prediction_type
    source = build_data_source(cfg, models, rt, latents)
    if cfg.proportion_empty_prompts > 0:
        source = CaptionDropout(source, cfg.proportion_empty_prompts, empty_prompt(source, models), cfg.seed,
                                rt.process_index)
    if rt.is_main_process:
        log.info(
            "mesh %s over %d devices, %d hosts; global batch %d; prediction %s; precision %s",
            dict(zip(runtime.MESH_AXES, rt.mesh.mesh_shape)), rt.num_devices, rt.process_count, global_batch,
            prediction_type, cfg.mixed_precision,
        )

    # Cast frozen parts on the host: a dtype cast on the device would be one more compiled graph.
    dtype = frozen_dtype(cfg.mixed_precision)
    vae = models.vae.to(dtype=dtype).to(rt.device) if models.vae is not None else None
    text_encoder = models.text_encoder.to(dtype=dtype).to(rt.device) if models.text_encoder is not None else None
    unet = models.unet.to(rt.device)  # fp32 master weights
    optimizer = make_optimizer(
        unet, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay, cfg.adam_epsilon
    )
    lr_schedule = LrSchedule(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps)
    ema = EmaWeights(list(unet.parameters()), cfg.ema_decay) if cfg.use_ema else None
    alphas_cumprod = models.noise_scheduler.alphas_cumprod.float().to(rt.device)
    step_cfg = StepConfig(
        prediction_type=prediction_type, snr_gamma=cfg.snr_gamma, max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.mixed_precision == "bf16",
        # Latent shards carry the scaling of the VAE that made them; the step applies it (encode_latents).
        scaling_factor=latents.scaling_factor if latents else models.vae.config.scaling_factor,
        shift_factor=latents.shift_factor if latents else getattr(models.vae.config, "shift_factor", None),
    )

    tracker = JsonlTracker(os.path.join(cfg.output_dir, "logs", "metrics.jsonl")) if rt.is_main_process \
        and "://" not in cfg.output_dir else NullTracker()
    progress = None
    if rt.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_train_steps, desc="steps", dynamic_ncols=True)
    monitor = StepMonitor(global_batch, tracker, progress, compile_base=runtime.compile_count())
    evaluator = InLoopEvaluator.create(cfg, models, rt, tracker, unet, vae, text_encoder, alphas_cumprod, step_cfg)
    profiler = runtime.Profiler(cfg.profile_dir, cfg.profile_start_step, cfg.profile_duration)

    loader = iter(device_loader(source, cfg, rt))
    t_start, t_timed, timed_from, eval_at_timing = time.perf_counter(), None, 0, 0.0
    try:
        for step in range(1, cfg.max_train_steps + 1):
            profiler.maybe_start(step)
            batch = next(loader)
            lr = lr_schedule.set_step(step - 1)
            if ema is not None:
                ema.set_update(step)
            loss, grad_norm = train_step(unet, vae, text_encoder, optimizer, batch, alphas_cumprod, step_cfg, ema)
            if step % cfg.logging_steps == 0 or step == cfg.max_train_steps:
                runtime.add_step_closure(monitor.on_step_done, (step, loss, grad_norm, lr))
            runtime.sync()
            if progress is not None:
                progress.update(1)
            if monitor.compilations() > cfg.max_compilations:
                raise TooManyCompilations(
                    f"the training step compiled {monitor.compilations()} XLA graphs by step {step}, more than "
                    f"--max_compilations {cfg.max_compilations}: something in the step changes shape or "
                    "constant values between steps (set PT_XLA_DEBUG_LEVEL=2 to see why)"
                )
            if evaluator is not None:
                with ema.applied() if ema is not None else contextlib.nullcontext():
                    monitor.exclude(*evaluator.maybe_run(step))
            if step == cfg.timing_warmup_steps and step < cfg.max_train_steps:
                runtime.wait_device_ops()
                t_timed, timed_from = time.perf_counter(), step
                eval_at_timing = evaluator.seconds if evaluator is not None else 0.0
    finally:
        if progress is not None:
            progress.close()  # before any error line, so the bar never prints after it
    runtime.wait_device_ops()
    t_end = time.perf_counter()
    timed_steps = cfg.max_train_steps - timed_from
    eval_seconds = (evaluator.seconds if evaluator is not None else 0.0) - eval_at_timing  # not step time
    mean_step = (t_end - (t_timed if t_timed is not None else t_start) - eval_seconds) / max(timed_steps, 1)
    summary = {
        "steps": cfg.max_train_steps,
        "global_batch_size": global_batch,
        "num_devices": rt.num_devices,
        "num_processes": rt.process_count,
        "mesh": dict(zip(runtime.MESH_AXES, (int(x) for x in rt.mesh.mesh_shape))),
        "mixed_precision": cfg.mixed_precision,
        "prediction_type": prediction_type,
        "ema_decay": ema.decay if ema is not None else None,  # the last step's; None: no EMA
        "mean_step_time_s": mean_step,
        "timed_steps": timed_steps,
        "images_per_s": global_batch / mean_step,
        "compilations": monitor.compilations(),
        **(evaluator.summary() if evaluator is not None else {}),
        "final_loss": monitor.history[-1]["loss"] if monitor.history else None,
        "data": "latent_shards" if latents else "images",
        "encoders_loaded": [n for n in ("vae", "text_encoder") if getattr(models, n) is not None],
        "wall_time_s": t_end - t_start,
    }
    tracker.close()
    if rt.is_main_process:
        log.info(
            "done: %d steps, %.3f s/step after warm-up, %.1f images/s, %d XLA compilations",
            cfg.max_train_steps, mean_step, summary["images_per_s"], summary["compilations"],
        )
        with ema.applied() if ema is not None else contextlib.nullcontext():
            export_pipeline(
                models.source, unet, cfg.output_dir, revision=cfg.revision, variant=cfg.variant,
                extra_files={"train_summary.json": summary}, prediction_type=prediction_type,
                sample_size=cfg.resolution // models.vae_scale,
            )
    return summary
