"""Typed training configuration and the command line built from it.

Flag names and meanings follow diffusers' `train_text_to_image.py` / `train_text_to_image_xla.py`, so
users' commands carry over. Every value is checked here, before any device work, and a bad one becomes
one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from .cli import OneLineParser
from .config_checks import (  # noqa: F401 (the choices: re-exported for callers)
    INTERPOLATION_MODES,
    MIXED_PRECISION,
    MIXED_PRECISION_FLAGS,
    PREDICTION_TYPES,
    SAMPLERS,
    STEP_GRAPHS,
    compatibility_warnings,
    validate,
)
from .errors import ConfigError, UserError  # noqa: F401 (ConfigError: re-exported for callers)
from .optim import LR_SCHEDULERS


def option(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(kw_only=True)
class TrainConfig:
    """Fine-tune the UNet of a Stable Diffusion pipeline with PyTorch/XLA SPMD (run the same command on
    every host)."""

    # model
    pretrained_model_name_or_path: str = option(
        None, "Hub id, local folder or gs:// folder of a diffusers Stable Diffusion pipeline.", required=True
    )
    revision: str | None = option(None, "Revision (branch, tag or commit) of the pretrained model on the hub.")
    variant: str | None = option(None, "Variant of the model files to load, e.g. fp16.")
    cache_dir: str | None = option(None, "Where downloaded models and datasets are cached.")
    # data
    dataset_name: str | None = option(None, "A datasets hub id or local dataset folder/script to train on.")
    dataset_config_name: str | None = option(None, "Config name of the dataset, if it has several.")
    train_data_dir: str | None = option(
        None, "A local image folder with metadata.jsonl (datasets' imagefolder layout), or a latent dataset "
        "made by data_prep/encode.py (a folder or gs:// prefix with manifest.json and *.tar shards: the step then "
        "skips the VAE, and the text encoder when the shards hold text states); used when --dataset_name is "
        "not given."
    )
    image_column: str = option("image", "Dataset column holding the images.")
    caption_column: str = option("text", "Dataset column holding the captions.")
    max_train_samples: int | None = option(None, "Truncate the training set to this many samples (debugging).")
    resolution: int = option(512, "Training resolution; images are resized then cropped to this square size.")
    center_crop: bool = option(False, "Center-crop instead of random-crop after resizing.")
    random_flip: bool = option(False, "Randomly flip images horizontally.")
    dataloader_num_workers: int = option(0, "Host data-loader worker processes (0 loads in the main process).")
    shuffle_buffer_size: int = option(
        1000, "Latent shards are read in chunks of this many samples, each emitted in a seeded random order."
    )
    loader_prefetch_size: int = option(1, "Batches the host loader queues ahead (MpDeviceLoader).")
    device_prefetch_size: int = option(1, "Batches kept on the devices ahead of the step (MpDeviceLoader).")
    # optimisation
    train_batch_size: int = option(
        16, "Batch size PER HOST (process). The global batch is this times the number of hosts; it is "
        "sharded over all devices of the mesh, so it must divide evenly among them."
    )
    max_train_steps: int | None = option(
        None, "Number of optimizer steps to run; default: --num_train_epochs passes over the training data."
    )
    learning_rate: float = option(1e-4, "AdamW peak learning rate.")
    lr_scheduler: str = option(
        "constant", "Learning-rate schedule (diffusers' names).", choices=LR_SCHEDULERS
    )
    lr_warmup_steps: int = option(0, "Steps of linear learning-rate warm-up.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW decoupled weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (<= 0 disables).")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = option(
        None, "Training target: epsilon (the noise), v_prediction (the velocity) or sample (the clean latents x0); "
        "default: the scheduler's own prediction_type. The exported scheduler is set to it.", choices=PREDICTION_TYPES
    )
    proportion_empty_prompts: float = option(
        0.0, "Fraction of captions replaced by the empty prompt, to train the unconditional prediction that "
        "classifier-free guidance uses."
    )
    snr_gamma: float | None = option(
        None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the recommended value. Off if unset."
    )
    mixed_precision: Literal["no", "bf16"] = option(
        "no", "bf16: frozen VAE/text encoder in bf16 and UNet forward/backward under bf16 autocast, with fp32 "
        "master weights and fp32 AdamW state (fp16 is refused: TPUs compute in bf16).", choices=MIXED_PRECISION_FLAGS
    )
    use_ema: bool = option(
        False, "Keep an exponential moving average of the UNet weights (updated in the step's graph); "
        "validation, evaluation and the exported pipeline use it."
    )
    ema_decay: float = option(0.9999, "Largest EMA decay; the decay warms up as update/(update+9) (diffusers').")
    seed: int = option(0, "Seed for data order, noise, timesteps and augmentation.")
    # parallelism and kernels
    fsdp_size: int = option(
        1, "Size of the mesh's 'fsdp' axis (must divide the device count); the 'data' axis takes the remaining "
        "devices. Above 1 the UNet's weights, gradients, AdamW moments and EMA shadows are sharded over it "
        "(FSDP); the batch is split over both axes."
    )
    enable_flash_attention: bool = option(
        False, "On TPU, attention through torch_xla's Pallas flash-attention kernel (diffusers' XLA processor, "
        "with the batch split over the mesh); elsewhere a warning and the standard attention."
    )
    enable_xformers_memory_efficient_attention: bool = option(
        False, "diffusers' flag name, accepted for users' commands: the same as --enable_flash_attention."
    )
    step_graph: str = option(
        "replay_flat", "replay_flat: trace the training step at steps 1 and 2, then run its compiled graph on each "
        "new batch without tracing it again, with the replicated weights, AdamW moments and EMA shadows held in a "
        "few flat buffers that AdamW and the EMA update whole (the same math as tracing, rounded apart in the "
        "last bits; ~2 ms of host CPU per step; it falls back to tracing, with a warning, if the two recordings "
        "differ). replay: the same with every state tensor an input and output of its own (~20-90 ms of host CPU "
        "per step here, no concatenation of the gradients in the step; see the README). trace: torch_xla's lazy "
        "tracing every step.",
        choices=STEP_GRAPHS,
    )
    peak_tflops: float | None = option(
        None, "Peak bf16 TFLOP/s of one chip, against which MFU (model FLOPs utilisation) is logged; default: "
        "the published peak of the TPU generation the runtime reports (v4, v5e, v5p, v6e). Without either (e.g. "
        "on CPU) MFU is not reported."
    )
    # logging and output
    output_dir: str = option("sd-model-finetuned-xla", "Where the trained pipeline (and logs) are written.")
    logging_steps: int = option(10, "Log loss, grad norm, step time and images/s every N steps.")
    print_loss: bool = option(False, "Print the loss at every step (same as --logging_steps 1).")
    max_compilations: int = option(
        4, "Stop with an error when the training loop has compiled more than this many XLA graphs "
        "(a clean run compiles 1: the optimizer state exists before the first step, which then already runs "
        "the steady graph)."
    )
    timing_warmup_steps: int = option(3, "Steps excluded from the reported mean step time.")
    profile_duration: int = option(10000, "Profile capture length in ms when PROFILE_DIR is set.")
    profile_start_step: int = option(5, "Step at which the profile capture starts when PROFILE_DIR is set.")
    # checkpoints
    checkpointing_steps: int = option(
        500, "Save a resumable checkpoint of the whole training state every N steps under "
        "OUTPUT_DIR/checkpoints/step_XXXXXXXX (0: only when preempted by SIGTERM)."
    )
    checkpoints_total_limit: int | None = option(None, "Keep at most this many complete checkpoints (default: all).")
    resume_from_checkpoint: str | None = option(
        None, "'latest' (the newest complete checkpoint under OUTPUT_DIR/checkpoints; a fresh start when there is "
        "none) or a checkpoint directory (or its step_XXXXXXXX name) to resume from, exactly."
    )
    # evaluation during training (each in its own XLA graphs, compiled once; never touches the step graph)
    validation_prompts: str | list[str] | None = option(
        None, "Prompts sampled every --validation_steps (or --validation_epochs): several arguments (diffusers' "
        "form), one ';'-separated argument, or a file (one per line, or JSON lines with \"text\").", nargs="+"
    )
    validation_steps: int = option(
        0, "Every N steps sample --validation_prompts into OUTPUT_DIR/validation/step_XXXXXX/ and log them to the "
        "trackers (0: use --validation_epochs)."
    )
    validation_epochs: int | None = option(
        None, "Sample --validation_prompts every N passes over the training data (diffusers'; 5 when "
        "--validation_prompts is given without --validation_steps)."
    )
    num_validation_images: int = option(1, "Images per validation prompt.")
    validation_guidance_scale: float = option(7.5, "Classifier-free guidance scale of the validation samples.")
    validation_num_inference_steps: int = option(25, "Denoising steps of the validation samples.")
    validation_scheduler: str = option("ddim", "Sampler of the validation samples.", choices=SAMPLERS)
    eval_steps: int = option(
        0, "Every N steps compute the validation loss at --eval_timesteps fixed timesteps on the held-out set, "
        "logged as eval_loss (0: never)."
    )
    eval_data_dir: str | None = option(
        None, "Held-out data for --eval_steps (an image folder with metadata.jsonl, or a latent dataset); "
        "default: --eval_fraction of the training data, held out of training."
    )
    eval_fraction: float = option(0.05, "Fraction of the training data held out for --eval_steps without "
                                "--eval_data_dir.")
    eval_timesteps: int = option(8, "Number of evenly spaced timesteps the validation loss averages over.")
    max_eval_samples: int | None = option(None, "Use at most this many held-out samples (per host).")
    # optimisation (the objective options; a table section merges with its namesake)
    noise_offset: float = option(
        0.0, "Offset noise: add this times a per-sample, per-channel N(0, 1) constant to the noise, so the model "
        "can change an image's mean brightness (diffusers'; 0.05-0.1 is usual). 0: off."
    )
    input_perturbation: float = option(
        0.0, "Input perturbation (Ning et al. 2023): the noisy input is built from noise + this times fresh N(0, I) "
        "noise while the target keeps the plain noise (diffusers'; 0.1 is recommended). 0: off."
    )
    p2_gamma: float | None = option(
        None, "P2 loss weighting 1 / (p2_k + SNR)^p2_gamma of the epsilon loss (Choi et al. 2022; 0.5 or 1), carried "
        "over to the v_prediction and sample targets. Off if unset; one of --snr_gamma and --p2_gamma."
    )
    p2_k: float = option(1.0, "The k of --p2_gamma weighting (> 0; the paper's 1).")
    dream_training: bool = option(
        False, "DREAM (Zhou et al. 2023), diffusers' formula: one more UNet forward per step, without gradients, "
        "estimates the noise of x_t, and the input and the epsilon target both move by what it missed "
        "(epsilon prediction only, as in diffusers). About a third more UNet work per step, in the same graph."
    )
    dream_detail_preservation: float = option(
        1.0, "DREAM's detail preservation p: the correction is scaled by sqrt(1 - alphas_cumprod[t]) ** p "
        "(only with --dream_training)."
    )
    # trackers (process 0 writes them)
    report_to: str = option(
        "tensorboard", "Where the metrics, validation images and the config go, besides LOGGING_DIR/metrics.jsonl: "
        "tensorboard, wandb, all (every installed one) or none (diffusers' default: tensorboard). Process 0 only."
    )
    tracker_project_name: str = option(
        "text2image-fine-tune", "The wandb project, and the TensorBoard run folder under LOGGING_DIR."
    )
    logging_dir: str = option("logs", "Where the logs go: relative to --output_dir unless absolute or gs://.")
    # hub (process 0 pushes)
    push_to_hub: bool = option(
        False, "After the export, upload OUTPUT_DIR (with its model card README.md) to the hub repo --hub_model_id "
        "(process 0 only; validation/ and wandb's run files stay local)."
    )
    hub_model_id: str | None = option(
        None, "Model repo to push to, 'namespace/name' or 'name' (default: the --output_dir folder's name)."
    )
    hub_token: str | None = option(
        None, "Hub token with write access (default: HF_TOKEN or the saved login). Never logged, tracked or "
        "written to the model card."
    )
    hub_private_repo: bool = option(False, "Create the repo private (when it does not exist yet).")
    hub_revision: str | None = option(None, "Branch to push to, created from main when missing (default: main).")
    # optimisation (diffusers' epochs and learning-rate scaling)
    num_train_epochs: int = option(
        100, "Passes over the training data when --max_train_steps is not given: steps = epochs x (training "
        "samples // global batch), from the dataset's size (latent shards: their manifest's sample count)."
    )
    scale_lr: bool = option(
        False, "Multiply --learning_rate by the global batch size of an update (per-host batch x hosts x "
        "--gradient_accumulation_steps), as diffusers does."
    )
    # data (diffusers' and the XLA example's)
    image_interpolation_mode: str = option(
        "bilinear", "Interpolation of the resize of raw images (diffusers' default is lanczos; bilinear here is "
        "what data_prep/encode.py uses, so latent shards and raw images give the same pixels).",
        choices=INTERPOLATION_MODES,
    )
    loader_prefetch_factor: int = option(
        2, "Batches each host loader worker prefetches (DataLoader prefetch_factor, with --dataloader_num_workers)."
    )
    # model (diffusers')
    non_ema_revision: str | None = option(
        None, "Revision of the UNet to train (diffusers': its non-EMA weights); default: --revision."
    )
    # logging and output (the XLA example's)
    measure_start_step: int | None = option(
        None, "The XLA example's name for the warm-up: steps before it are left out of the mean step time, and "
        "the profile starts there (sets --timing_warmup_steps and --profile_start_step)."
    )
    # accepted from diffusers' GPU script (each gives one warning or error line)
    local_rank: int = option(-1, "Ignored (warning): one process per host drives all its chips, no torchrun.")
    allow_tf32: bool = option(False, "Ignored (warning): TF32 is an Nvidia GPU format; TPUs compute in bf16/fp32.")
    use_8bit_adam: bool = option(
        False, "Ignored (warning): bitsandbytes is CUDA-only; AdamW keeps fp32 state (the same update, more memory)."
    )
    foreach_ema: bool = option(False, "Ignored (warning): the EMA update is already fused into the step's graph.")
    offload_ema: bool = option(
        False, "Ignored (warning): the moving average stays on the devices, beside the weights it averages."
    )
    # memory (diffusers' flags)
    gradient_accumulation_steps: int = option(
        1, "Micro-batches of --train_batch_size per optimizer update, accumulated inside the one step graph (an "
        "unrolled loop): each host reads this times --train_batch_size samples per update. The lr schedule, "
        "EMA and --max_train_steps count optimizer updates (diffusers')."
    )
    gradient_checkpointing: bool = option(
        False, "Recompute the UNet blocks' activations in the backward pass instead of keeping them (torch_xla's "
        "checkpoint, which keeps XLA from merging the recomputation away): less memory, more compute."
    )

    def __post_init__(self) -> None:
        if self.print_loss:
            self.logging_steps = 1
        if self.measure_start_step is not None:
            # The XLA example's step m (0-based) is our step m + 1: m steps are warm-up, the profile starts after.
            self.timing_warmup_steps, self.profile_start_step = self.measure_start_step, self.measure_start_step + 1
        if isinstance(self.validation_prompts, (list, tuple)):
            # diffusers' nargs="+": one argument is ours (';'-separated or a file), several are one prompt each.
            prompts = [p.strip() for p in self.validation_prompts if p.strip()]
            self.validation_prompts = prompts[0] if len(prompts) == 1 else (prompts or None)
        if self.enable_xformers_memory_efficient_attention:
            self.enable_flash_attention = True
        validate(self)

    def compatibility_warnings(self) -> list[str]:
        """One line per given diffusers flag that means nothing here but is harmless to ignore."""
        return compatibility_warnings(self)

    @property
    def eval_heldout_fraction(self) -> float:
        """Fraction of the training data held out of training: --eval_fraction when the validation loss is on
        and has no --eval_data_dir, else 0."""
        return self.eval_fraction if self.eval_steps > 0 and self.eval_data_dir is None else 0.0

    @property
    def profile_dir(self) -> str | None:
        """PROFILE_DIR, as in diffusers' XLA example: capture a device profile there."""
        return os.environ.get("PROFILE_DIR") or None

    @property
    def compile_cache_dir(self) -> str | None:
        """CACHE_DIR, as in diffusers' XLA example: persistent XLA compilation cache."""
        return os.environ.get("CACHE_DIR") or None


def _flag_type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def build_parser(cls: type = TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--name` flag per dataclass field (booleans are store_true)."""
    parser = OneLineParser(description=description or cls.__doc__)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
            continue
        default_note = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(
            f"--{f.name}", type=_flag_type(f), default=f.default, help=help_text + default_note, **meta
        )
    return parser


def parse_args(argv: list[str] | None = None, cls: type = TrainConfig) -> Any:
    """Parse the command line into `cls`; a bad value exits with one `error:` line (exit code 2), and each
    harmless flag without a meaning here gives one `warning:` line."""
    args = build_parser(cls).parse_args(argv)
    try:
        cfg = cls(**vars(args))
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None
    for message in getattr(cfg, "compatibility_warnings", list)():
        sys.stderr.write(f"warning: {message}\n")
    return cfg
