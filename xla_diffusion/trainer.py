"""The training job, read top to bottom as its steps: config → runtime → data → models → state → loop → export.

Metrics leave the device only through step closures, the step compiles once (bounded by --max_compilations),
and process 0 alone writes shared outputs (logs, validation samples, the pipeline export).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from . import hub, runtime, sharding
from .checkpoint import find_resume_checkpoint
from .config import TrainConfig
from .data.config import DataConfig
from .data.feed import DataFeed
from .data.latents import LatentManifest, read_manifest
from .data.randomness import CaptionDropout
from .data.source import build_data_source, empty_prompt
from .errors import ConfigError
from .evaluation import InLoopEvaluator
from .export import export_pipeline
from .models import Models, frozen_dtype, load_models
from .monitor import StepMonitor
from .replay import StepReplay
from .resume import RunCheckpoints, check_output_dir
from .state import TrainState
from .tracking import make_trackers, public_config
from .train_step import FrozenParts, StepConfig, train_step

if TYPE_CHECKING:
    from .flops import Utilisation

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole training job; returns the summary process 0 writes beside the export (a preempted run
    returns without exporting: `{"preempted": True, "steps": N}`)."""
    check_output_dir(cfg.output_dir)  # checkpoints: bad paths are one line before any device work
    resume_from = find_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    rt = runtime.init_runtime(cfg.fsdp_size, cfg.compile_cache_dir)
    global_batch = check_batch_divisible(cfg.train_batch_size, rt, cfg.gradient_accumulation_steps)
    torch.manual_seed(cfg.seed)
    latents = read_manifest(cfg.train_data_dir) if cfg.dataset_name is None else None
    models = load_training_models(cfg, latents)
    source = training_data(cfg, models, rt, latents)
    cfg = resolve_epochs(cfg, rt, source.num_samples)
    step_cfg = StepConfig.for_models(models, cfg.prediction_type, cfg.snr_gamma, cfg.max_grad_norm,
                                     bf16=cfg.mixed_precision == "bf16", latents=latents,
                                     accumulation_steps=cfg.gradient_accumulation_steps, **objective_options(cfg))
    repo_id = create_hub_repo(cfg, rt)
    frozen = FrozenParts.place(models, frozen_dtype(cfg.mixed_precision), rt.device)
    if cfg.enable_flash_attention:
        use_flash_attention(models.unet)
    if cfg.gradient_checkpointing:
        sharding.enable_gradient_checkpointing(models.unet)
    # fp32 master weights on the mesh, split over its fsdp axis (replicated at --fsdp_size 1); AdamW's moments
    # and the EMA shadows are made from them with the same sharding
    specs = sharding.fsdp_shard(models.unet, rt.mesh)
    state = TrainState.create(models.unet, cfg)
    utilisation = training_utilisation(cfg, models, source.ndims, latents, global_batch, rt)
    checkpoints = RunCheckpoints(cfg, rt)
    position = checkpoints.begin(resume_from, state)  # None: from the start
    if rt.is_main_process:
        log.info("mesh %s over %d devices, %d hosts; global batch %d (%d micro-batches); %d of %d UNet tensors "
                 "sharded over fsdp; prediction %s; precision %s", dict(zip(runtime.MESH_AXES, rt.mesh.mesh_shape)),
                 rt.num_devices, rt.process_count, global_batch, cfg.gradient_accumulation_steps,
                 sum(sharding.FSDP_AXIS in s for s in specs.values()), len(specs), step_cfg.prediction_type,
                 cfg.mixed_precision)
    tracker = make_tracker(cfg, rt)
    evaluator = InLoopEvaluator.create(cfg, models, rt, tracker, state.unet, frozen, step_cfg)
    monitor = StepMonitor(global_batch, cfg.max_train_steps, tracker, cfg.max_compilations,
                          cfg.timing_warmup_steps, show_progress=rt.is_main_process, start_step=state.step,
                          utilisation=utilisation)
    feed = DataFeed(source, position)  # counts the batches the steps consume, not the prefetched ones
    loader = iter(runtime.device_loader(feed, feed.ndims, rt.mesh, cfg.loader_prefetch_size,
                                        cfg.device_prefetch_size))
    checkpoints.preemption.install()
    replay = StepReplay(cfg.step_graph != "trace", flat=cfg.step_graph == "replay_flat", layout=state.flat_layout)
    monitor.other_compilations = lambda: replay.layout_compilations
    try:
        preempted = run_loop(cfg, state, frozen, step_cfg, loader, monitor, evaluator, feed, checkpoints, replay)
        checkpoints.close()  # the last save is durable before the export
    finally:
        monitor.close()
        checkpoints.close(raise_errors=False)
    if preempted:
        checkpoints.report_preemption()
        tracker.close()
        return {"preempted": True, "steps": state.step}
    summary = {**run_summary(cfg, rt, state, step_cfg, models, monitor, evaluator, latents),
               "data_skipped": dict(feed.position["skipped"]), **checkpoints.summary(),
               "replayed_steps": replay.replayed_steps, "replay_refused": replay.refused,
               "state_layout_compilations": replay.layout_compilations}
    tracker.close()
    if rt.is_main_process:
        log.info("done: %d steps, %.3f s/step after warm-up, %.1f images/s, %d XLA compilations",
                 state.step, summary["mean_step_time_s"], summary["images_per_s"], summary["compilations"])
        with state.averaged():
            export_pipeline(models.source, state.unet, cfg.output_dir, revision=cfg.revision, variant=cfg.variant,
                            extra_files={"train_summary.json": summary}, prediction_type=step_cfg.prediction_type,
                            sample_size=cfg.resolution // models.vae_scale)
        publish(cfg, summary, evaluator, repo_id)
    return summary


def check_batch_divisible(per_host_batch: int, rt: runtime.Runtime, accumulation_steps: int = 1) -> int:
    """The global batch of one optimizer update (all hosts' micro-batches of --train_batch_size, times the
    accumulation steps); raises ConfigError when a global (micro-)batch cannot be split evenly over the devices:
    each micro-batch is split over all of them."""
    micro_batch = per_host_batch * rt.process_count
    if micro_batch % rt.num_devices:
        what = "micro-batch" if accumulation_steps > 1 else "batch"
        raise ConfigError(
            f"global {what} {micro_batch} (--train_batch_size {per_host_batch} x {rt.process_count} hosts) "
            f"is not divisible by the {rt.num_devices} data-parallel devices of the mesh"
        )
    return micro_batch * accumulation_steps


def load_training_models(cfg: TrainConfig, latents: LatentManifest | None) -> Models:
    """The pipeline's parts on the CPU. Latent shards replace the VAE (and the text encoder when they hold
    text states): those are not even loaded."""
    return load_models(
        cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.cache_dir,
        load_vae=latents is None, load_text_encoder=latents is None or not latents.has_text_states,
        unet_revision=cfg.non_ema_revision,
    )


def training_data(cfg: TrainConfig, models: Models, rt: runtime.Runtime, latents: LatentManifest | None) -> Any:
    """This host's endless batches with their per-step randomness, and caption dropout when asked for."""
    source = build_data_source(DataConfig.from_train_config(cfg, frozen_dtype(cfg.mixed_precision)), models, rt,
                               latents)
    if cfg.proportion_empty_prompts > 0:
        source = CaptionDropout(source, cfg.proportion_empty_prompts, empty_prompt(source, models), cfg.seed,
                                rt.process_index)
    return source


def use_flash_attention(unet: torch.nn.Module) -> None:
    """--enable_flash_attention on the plain UNet: on TPU diffusers' XLA flash-attention processor, its batch
    dimension split like the inputs' (over runtime.BATCH_AXES of the global mesh); elsewhere one warning."""
    from .attention import enable_flash_attention  # imports diffusers' processors, and with them torch_xla

    enable_flash_attention(unet, runtime.on_tpu(), runtime.BATCH_AXES)


def training_utilisation(cfg: TrainConfig, models: Models, batch_ndims: dict[str, int],
                         latents: LatentManifest | None, global_batch: int, rt: runtime.Runtime) -> Utilisation:
    """The step's training FLOPs, counted once on meta copies of what it runs (the batch's keys say which:
    pixel values are encoded by the VAE in the step, token ids by the text encoder), and the peak per chip:
    --peak_tflops, else the table's for the TPU generation the runtime reports, else none (no MFU)."""
    # Imported here: importing torch_xla (diffusers' model modules do) before the CLI sets up logging would
    # give the root logger a handler, and the INFO lines would be lost.
    from .flops import Utilisation, count_train_flops, peak_tflops

    step = count_train_flops(
        models.unet.config, batch=global_batch, resolution=cfg.resolution,
        text_len=latents.text_shape[0] if latents is not None else models.tokenizer.model_max_length,
        vae_config=models.vae_config if "pixel_values" in batch_ndims else None,
        text_configs=[models.text_encoder.config] if "input_ids" in batch_ndims else (),
        vae_scale_factor=models.vae_scale, dream=cfg.dream_training,
    )
    kind = runtime.device_kind()
    peak = cfg.peak_tflops or (peak_tflops(kind) if kind else None)
    if rt.is_main_process:
        log.info("training FLOPs per step %.4g (per image %.4g: UNet forward+backward %.4g, DREAM forward %.4g, VAE "
                 "encoder %.4g, text encoder %.4g); %s", step.total, step.per_image,
                 (step.unet_fwd + step.unet_bwd) / step.batch, step.unet_dream / step.batch,
                 step.vae_enc / step.batch, step.text_enc / step.batch,
                 f"MFU against {peak:g} TFLOP/s per chip" if peak else
                 f"MFU not reported: no peak known for device {kind or 'cpu'!r} (pass --peak_tflops)")
    return Utilisation(step, rt.num_devices, peak)


def make_tracker(cfg: TrainConfig, rt: runtime.Runtime) -> Any:
    """On process 0: LOGGING_DIR/metrics.jsonl (local output folders) and the --report_to trackers, with the
    config (without its secrets) as hyper-parameters; a tracker that does nothing elsewhere."""
    return make_trackers(cfg.report_to, cfg.tracker_project_name, cfg.logging_dir, cfg.output_dir,
                         dataclasses.asdict(cfg), rt.is_main_process)


# diffusers validates every --validation_epochs epochs; its default, when --validation_prompts comes alone.
DEFAULT_VALIDATION_EPOCHS = 5


def resolve_epochs(cfg: TrainConfig, rt: runtime.Runtime, num_samples: int | None) -> TrainConfig:
    """diffusers' epoch flags as steps, and --scale_lr, once the data's size and the host count are known: the
    run's config from here on. An epoch is `num_samples // global batch` steps (the last partial batch is
    dropped). The same on every host (`num_samples` counts all hosts' samples), so all stop at the same step.
    A step is one optimizer update: with gradient accumulation it reads every micro-batch."""
    global_batch = cfg.train_batch_size * rt.process_count * cfg.gradient_accumulation_steps
    changes: dict[str, Any] = {}
    wants_validation_epochs = bool(cfg.validation_prompts) and cfg.validation_steps == 0
    if cfg.max_train_steps is None or wants_validation_epochs:
        flags = "--num_train_epochs" if cfg.max_train_steps is None else "--validation_epochs"
        if not num_samples:
            raise ConfigError(f"{flags} needs the number of training samples, which this dataset does not record "
                              "(a latent dataset without counts in its manifest): pass --max_train_steps and "
                              "--validation_steps")
        steps_per_epoch = num_samples // global_batch
        if steps_per_epoch < 1:
            raise ConfigError(f"{flags}: {num_samples} training samples make no full global batch of {global_batch}")
        if cfg.max_train_steps is None:
            changes["max_train_steps"] = cfg.num_train_epochs * steps_per_epoch
        if wants_validation_epochs:
            changes["validation_steps"] = (cfg.validation_epochs or DEFAULT_VALIDATION_EPOCHS) * steps_per_epoch
            changes["validation_epochs"] = None
        if rt.is_main_process:
            log.info("an epoch is %d steps (%d samples, global batch %d): %s", steps_per_epoch, num_samples,
                     global_batch, ", ".join(f"{k} {v}" for k, v in changes.items() if v is not None))
    if cfg.scale_lr:  # diffusers': lr x per-device batch x processes x accumulation steps
        changes["learning_rate"] = cfg.learning_rate * global_batch
        if rt.is_main_process:
            log.info("--scale_lr: learning rate %g x global batch %d = %g", cfg.learning_rate, global_batch,
                     changes["learning_rate"])
    return dataclasses.replace(cfg, **changes) if changes else cfg


def objective_options(cfg: TrainConfig) -> dict[str, Any]:
    """The objective options of StepConfig, from the config."""
    return {"noise_offset": cfg.noise_offset, "input_perturbation": cfg.input_perturbation,
            "p2_gamma": cfg.p2_gamma, "p2_k": cfg.p2_k,
            "dream_detail_preservation": cfg.dream_detail_preservation if cfg.dream_training else None}


def hub_repo_id(cfg: TrainConfig) -> str:
    """--hub_model_id, or the --output_dir folder's name (diffusers')."""
    return cfg.hub_model_id or os.path.basename(os.path.normpath(cfg.output_dir))


def create_hub_repo(cfg: TrainConfig, rt: runtime.Runtime) -> str | None:
    """With --push_to_hub, process 0 creates the repo before training: a bad token or an unreachable hub is one
    error line at the start, not after the run. Returns the repo id (None without a push, or elsewhere)."""
    if not cfg.push_to_hub:
        return None
    return hub.create_repo(hub_repo_id(cfg), cfg.hub_token, cfg.hub_private_repo, cfg.hub_revision,
                           is_main_process=rt.is_main_process)


def publish(cfg: TrainConfig, summary: dict[str, Any], evaluator: InLoopEvaluator | None,
            repo_id: str | None) -> None:
    """Process 0, after the export: the model card README.md in the export folder (run summary, the last
    validation grid and evaluation), then with --push_to_hub the folder's upload. A failed push raises HubError
    (one line, exit code 1) and leaves the export as it is."""
    last_eval = evaluator.last_eval if evaluator is not None else None
    hub.write_model_card(
        cfg.output_dir, base_model=cfg.pretrained_model_name_or_path, hyperparameters=public_config(
            dataclasses.asdict(cfg)), steps=summary["steps"], mesh=summary["mesh"],
        num_processes=summary["num_processes"], num_devices=summary["num_devices"],
        mean_step_time_s=summary["mean_step_time_s"], images_per_s=summary["images_per_s"],
        dataset=cfg.dataset_name or cfg.train_data_dir,
        validation_grid=evaluator.last_grid if evaluator is not None else None,
        validation_prompts=[r["text"] for r in evaluator.prompt_records] if evaluator is not None else (),
        eval_metrics={k: v for k, v in last_eval.items() if k == "step" or k.startswith("eval_loss")}
        if last_eval else None, repo_id=repo_id,
    )
    if repo_id is not None:
        hub.push_to_hub(cfg.output_dir, repo_id, cfg.hub_token, cfg.hub_private_repo, cfg.hub_revision,
                        is_main_process=True, ignore_patterns=(*hub.DEFAULT_IGNORE_PATTERNS, "validation/*"))


def run_loop(cfg: TrainConfig, state: TrainState, frozen: FrozenParts, step_cfg: StepConfig, loader: Any,
             monitor: StepMonitor, evaluator: InLoopEvaluator | None, feed: DataFeed, checkpoints: RunCheckpoints,
             replay: StepReplay | None = None) -> bool:
    """Steps `state.step + 1 .. --max_train_steps`: one compiled graph each, metrics through step closures,
    checkpoints when due, evaluation between steps on the averaged weights. With an enabled `replay`, the step
    is traced until it has been recorded, then its graph is replayed. Returns True when a preemption notice
    stopped it (after checkpointing)."""
    replay = replay if replay is not None else StepReplay(enabled=False)

    def unpack() -> None:
        # The state tensors hold no values while a replayed step's flat buffers do (flat_state.StateLayout): they get
        # them back before a checkpoint or an evaluation reads them, and when the loop ends. Not step time; its
        # compilations (once per layout) are counted in replay.layout_compilations.
        with monitor.paused(count_compilations=False):
            replay.unpack()
    profiler = runtime.Profiler(cfg.profile_dir, cfg.profile_start_step, cfg.profile_duration)
    worked_outside = False  # evaluation or a checkpoint since the last graph cut: the next step cuts
    for step in range(state.step + 1, cfg.max_train_steps + 1):
        profiler.maybe_start(step)
        batch = feed.take(loader)
        lr = state.begin_step()
        replaying = replay.replaying
        loss, grad_norm = replay(
            lambda: train_step(state.unet, frozen.vae, frozen.text_encoder, state.optimizer, batch,  # noqa: B023
                               frozen.alphas_cumprod, step_cfg, state.ema),
            state.step_tensors(), [batch[k] for k in sorted(batch)] + state.step_scalars(),
        )
        if replay.replaying and not replaying:
            log.info("--step_graph %s: the step graph is recorded; replaying it from step %d", cfg.step_graph,
                     step + 1)
        state.step = step
        logged = step % cfg.logging_steps == 0 or step == cfg.max_train_steps
        if logged:
            skipped = {"data_skipped": dict(feed.position["skipped"])} if feed.position["skipped"] else {}
            runtime.add_step_closure(monitor.on_step_done, (step, loss, grad_norm, lr, skipped))
        if replay.cut_needed() or worked_outside:
            runtime.sync()  # launches a traced step, or work done outside the step; runs the closure
        elif logged:
            runtime.run_step_closures()  # a replayed step left nothing pending
        monitor.after_step(step)
        saved = checkpoints.saved_step
        if checkpoints.after_step(step, state, feed.position, before_save=unpack):
            unpack()  # (the checkpoint of this step may have been saved before the notice)
            return True
        worked_outside = checkpoints.saved_step != saved
        if evaluator is not None and evaluator.due(step):
            unpack()
            with monitor.paused(), state.averaged():
                evaluator.run(step)
            worked_outside = True
    unpack()
    return False


def run_summary(cfg: TrainConfig, rt: runtime.Runtime, state: TrainState, step_cfg: StepConfig, models: Models,
                monitor: StepMonitor, evaluator: InLoopEvaluator | None, latents: LatentManifest | None
                ) -> dict[str, Any]:
    """What train_summary.json holds: the run's shape, its timing and compilations, and its last loss."""
    return {
        "steps": state.step,
        "global_batch_size": monitor.global_batch,
        "num_devices": rt.num_devices,
        "num_processes": rt.process_count,
        "mesh": dict(zip(runtime.MESH_AXES, (int(x) for x in rt.mesh.mesh_shape))),
        "mixed_precision": cfg.mixed_precision,
        "prediction_type": step_cfg.prediction_type,
        "ema_decay": state.ema.decay if state.ema is not None else None,  # the last step's; None: no EMA
        **monitor.timing(state.step),
        **(evaluator.summary() if evaluator is not None else {}),
        "final_loss": monitor.history[-1]["loss"] if monitor.history else None,
        "data": "latent_shards" if latents else "images",
        "encoders_loaded": [n for n in ("vae", "text_encoder") if getattr(models, n) is not None],
    }
