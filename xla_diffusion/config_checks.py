"""What a TrainConfig may hold: the choices of its flags and the checks on their values (one error line each,
before any device work), and the warnings for diffusers flags that mean nothing here. `TrainConfig.__post_init__`
runs `validate` after normalising its fields."""

from __future__ import annotations

from typing import Any

from .errors import check
from .optim import LR_SCHEDULERS
from .tracking import resolve_report_to

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' names (objective.PREDICTION_TYPES)
MIXED_PRECISION = ("no", "bf16")
MIXED_PRECISION_FLAGS = ("no", "fp16", "bf16")  # diffusers' choices: fp16 is refused with a reason
STEP_GRAPHS = ("replay", "replay_flat", "trace")  # --step_graph (replay.StepReplay)
# torchvision's InterpolationMode names, the choices of diffusers' --image_interpolation_mode
INTERPOLATION_MODES = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
SAMPLERS = ("ddpm", "ddim", "euler", "euler-ancestral", "dpm-solver++", "unipc")  # sampling.SCHEDULERS' names


def validate(cfg: Any) -> None:
    """Raise ConfigError for the first bad value of a TrainConfig (its flag named in one line)."""
    check([
        (cfg.dataset_name is None and cfg.train_data_dir is None,
         "pass --dataset_name or --train_data_dir"),
        (cfg.train_batch_size < 1, "--train_batch_size must be >= 1"),
        (cfg.max_train_steps is not None and cfg.max_train_steps < 1, "--max_train_steps must be >= 1"),
        (cfg.num_train_epochs < 1, "--num_train_epochs must be >= 1"),
        (cfg.resolution < 8 or cfg.resolution % 8, "--resolution must be a positive multiple of 8"),
        (cfg.learning_rate <= 0, "--learning_rate must be > 0"),
        (cfg.lr_warmup_steps < 0, "--lr_warmup_steps must be >= 0"),
        (not 0 <= cfg.adam_beta1 < 1 or not 0 <= cfg.adam_beta2 < 1, "Adam betas must be in [0, 1)"),
        (cfg.snr_gamma is not None and cfg.snr_gamma <= 0, "--snr_gamma must be > 0"),
        (not 0 <= cfg.ema_decay < 1, "--ema_decay must be in [0, 1)"),
        (not 0 <= cfg.proportion_empty_prompts < 1, "--proportion_empty_prompts must be in [0, 1)"),
        (cfg.fsdp_size < 1, "--fsdp_size must be >= 1"),
        (cfg.gradient_accumulation_steps < 1, "--gradient_accumulation_steps must be >= 1"),
        (cfg.peak_tflops is not None and cfg.peak_tflops <= 0, "--peak_tflops must be > 0"),
        (cfg.logging_steps < 1, "--logging_steps must be >= 1"),
        (cfg.max_compilations < 1, "--max_compilations must be >= 1"),
        (cfg.dataloader_num_workers < 0, "--dataloader_num_workers must be >= 0"),
        (cfg.shuffle_buffer_size < 1, "--shuffle_buffer_size must be >= 1"),
        (cfg.validation_steps < 0 or cfg.eval_steps < 0, "--validation_steps and --eval_steps must be >= 0"),
        (cfg.validation_steps > 0 and not cfg.validation_prompts,
         "--validation_steps needs --validation_prompts"),
        (cfg.validation_epochs is not None and cfg.validation_steps > 0,
         "pass one of --validation_steps and --validation_epochs"),
        (cfg.validation_epochs is not None and cfg.validation_epochs < 1, "--validation_epochs must be >= 1"),
        (cfg.validation_epochs is not None and not cfg.validation_prompts,
         "--validation_epochs needs --validation_prompts"),
        (cfg.num_validation_images < 1, "--num_validation_images must be >= 1"),
        (cfg.validation_num_inference_steps < 1, "--validation_num_inference_steps must be >= 1"),
        (cfg.validation_scheduler not in SAMPLERS, f"--validation_scheduler must be one of {', '.join(SAMPLERS)}"),
        (not 0 < cfg.eval_fraction < 1, "--eval_fraction must be in (0, 1)"),
        (cfg.eval_timesteps < 1, "--eval_timesteps must be >= 1"),
        (cfg.max_eval_samples is not None and cfg.max_eval_samples < 1, "--max_eval_samples must be >= 1"),
        (cfg.prediction_type is not None and cfg.prediction_type not in PREDICTION_TYPES,
         f"--prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {cfg.prediction_type!r}"),
        (cfg.mixed_precision == "fp16",
         "--mixed_precision fp16: TPUs compute in bf16, pass --mixed_precision bf16"),
        (cfg.mixed_precision not in MIXED_PRECISION,
         f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}"),
        (cfg.checkpointing_steps < 0, "--checkpointing_steps must be >= 0"),
        (cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1,
         "--checkpoints_total_limit must be >= 1"),
        (cfg.lr_scheduler not in LR_SCHEDULERS, f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}"),
    ])
    _check_ecosystem_flags(cfg)


def _check_ecosystem_flags(cfg: Any) -> None:
    """The objective options, trackers, hub and diffusers-compatibility flags (one error line each)."""
    check([
        (cfg.noise_offset < 0 or cfg.input_perturbation < 0,
         "--noise_offset and --input_perturbation must be >= 0"),
        (cfg.p2_gamma is not None and cfg.p2_gamma < 0, "--p2_gamma must be >= 0"),
        (cfg.p2_k <= 0, "--p2_k must be > 0"),
        (cfg.p2_gamma is not None and cfg.snr_gamma is not None,
         "--snr_gamma and --p2_gamma are two loss weightings: pass one"),
        (not cfg.push_to_hub and (cfg.hub_model_id or cfg.hub_private_repo or cfg.hub_revision),
         "--hub_model_id, --hub_private_repo and --hub_revision need --push_to_hub"),
        (cfg.push_to_hub and cfg.hub_model_id is not None and not cfg.hub_model_id.strip(),
         "--hub_model_id must not be empty"),
        (cfg.push_to_hub and "://" in cfg.output_dir,
         "--push_to_hub uploads a local --output_dir; this one is remote"),
        (cfg.loader_prefetch_factor < 1, "--loader_prefetch_factor must be >= 1"),
        (cfg.measure_start_step is not None and cfg.measure_start_step < 0, "--measure_start_step must be >= 0"),
        (cfg.image_interpolation_mode not in INTERPOLATION_MODES,
         f"--image_interpolation_mode must be one of {', '.join(INTERPOLATION_MODES)}"),
        (cfg.dream_training and cfg.prediction_type not in (None, "epsilon"),
         f"--dream_training is defined for epsilon prediction, not --prediction_type {cfg.prediction_type}"),
        (cfg.dream_detail_preservation < 0, "--dream_detail_preservation must be >= 0"),
    ])
    resolve_report_to(cfg.report_to)  # an unknown value or a missing package: one TrackerError line


def compatibility_warnings(cfg: Any) -> list[str]:
    """One line per given diffusers flag that means nothing here but is harmless to ignore."""
    ignored = [
        (cfg.local_rank != -1, "--local_rank is ignored: one process per host drives all its chips (no torchrun)"),
        (cfg.allow_tf32, "--allow_tf32 is ignored: TF32 is an Nvidia GPU format, TPUs compute in bf16/fp32"),
        (cfg.use_8bit_adam, "--use_8bit_adam is ignored: bitsandbytes is CUDA-only; AdamW keeps its state in "
                             "fp32 (the same update, more memory; shard it with --fsdp_size)"),
        (cfg.foreach_ema, "--foreach_ema is ignored: the EMA update is already fused into the step's graph"),
        (cfg.offload_ema, "--offload_ema is ignored: the moving average stays on the devices"),
        (cfg.non_ema_revision is not None and cfg.use_ema and cfg.non_ema_revision != cfg.revision,
         "--non_ema_revision with --use_ema: the moving average starts from the --non_ema_revision weights "
         "(diffusers starts it from --revision's)"),
        (cfg.dream_detail_preservation != 1.0 and not cfg.dream_training,
         "--dream_detail_preservation is ignored without --dream_training"),
    ]
    return [message for given, message in ignored if given]
