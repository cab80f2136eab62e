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

PREDICTION_TYPES = ("epsilon", "v_prediction")
MIXED_PRECISION = ("no", "bf16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is shown to the user as one line."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(kw_only=True)
class TrainConfig:
    """Fine-tune the UNet of a Stable Diffusion pipeline with PyTorch/XLA SPMD (run the same command on
    every host)."""

    # model
    pretrained_model_name_or_path: str = _opt(
        None, "Hub id, local folder or gs:// folder of a diffusers Stable Diffusion pipeline.", required=True
    )
    revision: str | None = _opt(None, "Revision (branch, tag or commit) of the pretrained model on the hub.")
    variant: str | None = _opt(None, "Variant of the model files to load, e.g. fp16.")
    cache_dir: str | None = _opt(None, "Where downloaded models and datasets are cached.")
    # data
    dataset_name: str | None = _opt(None, "A datasets hub id or local dataset folder/script to train on.")
    dataset_config_name: str | None = _opt(None, "Config name of the dataset, if it has several.")
    train_data_dir: str | None = _opt(
        None, "A local image folder with metadata.jsonl (datasets' imagefolder layout); used when "
        "--dataset_name is not given."
    )
    image_column: str = _opt("image", "Dataset column holding the images.")
    caption_column: str = _opt("text", "Dataset column holding the captions.")
    max_train_samples: int | None = _opt(None, "Truncate the training set to this many samples (debugging).")
    resolution: int = _opt(512, "Training resolution; images are resized then cropped to this square size.")
    center_crop: bool = _opt(False, "Center-crop instead of random-crop after resizing.")
    random_flip: bool = _opt(False, "Randomly flip images horizontally.")
    dataloader_num_workers: int = _opt(0, "Host data-loader worker processes (0 loads in the main process).")
    loader_prefetch_size: int = _opt(1, "Batches the host loader queues ahead (MpDeviceLoader).")
    device_prefetch_size: int = _opt(1, "Batches kept on the devices ahead of the step (MpDeviceLoader).")
    # optimisation
    train_batch_size: int = _opt(
        16, "Batch size PER HOST (process). The global batch is this times the number of hosts; it is "
        "sharded over all devices of the mesh, so it must divide evenly among them."
    )
    max_train_steps: int = _opt(100, "Number of optimizer steps to run.")
    learning_rate: float = _opt(1e-4, "AdamW learning rate (constant).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = _opt(1e-2, "AdamW decoupled weight decay.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this value (<= 0 disables).")
    prediction_type: Literal["epsilon", "v_prediction"] | None = _opt(
        None, "Training target; default: the scheduler's own prediction_type.", choices=PREDICTION_TYPES
    )
    snr_gamma: float | None = _opt(
        None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the recommended value. Off if unset."
    )
    mixed_precision: Literal["no", "bf16"] = _opt(
        "no", "bf16: frozen VAE/text encoder in bf16 and UNet forward/backward under bf16 autocast, with fp32 "
        "master weights and fp32 AdamW state.", choices=MIXED_PRECISION
    )
    seed: int = _opt(0, "Seed for data order, noise, timesteps and augmentation.")
    # parallelism
    fsdp_size: int = _opt(1, "Size of the mesh's 'fsdp' axis; the 'data' axis takes the remaining devices.")
    # logging and output
    output_dir: str = _opt("sd-model-finetuned-xla", "Where the trained pipeline (and logs) are written.")
    logging_steps: int = _opt(10, "Log loss, grad norm, step time and images/s every N steps.")
    print_loss: bool = _opt(False, "Print the loss at every step (same as --logging_steps 1).")
    max_compilations: int = _opt(
        4, "Stop with an error when the training loop has compiled more than this many XLA graphs "
        "(a clean run compiles 2: the first step and the steady state)."
    )
    timing_warmup_steps: int = _opt(3, "Steps excluded from the reported mean step time.")
    profile_duration: int = _opt(10000, "Profile capture length in ms when PROFILE_DIR is set.")
    profile_start_step: int = _opt(5, "Step at which the profile capture starts when PROFILE_DIR is set.")

    def __post_init__(self) -> None:
        if self.print_loss:
            self.logging_steps = 1
        checks = [
            (self.dataset_name is None and self.train_data_dir is None,
             "pass --dataset_name or --train_data_dir"),
            (self.train_batch_size < 1, "--train_batch_size must be >= 1"),
            (self.max_train_steps < 1, "--max_train_steps must be >= 1"),
            (self.resolution < 8 or self.resolution % 8, "--resolution must be a positive multiple of 8"),
            (self.learning_rate <= 0, "--learning_rate must be > 0"),
            (not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1, "Adam betas must be in [0, 1)"),
            (self.snr_gamma is not None and self.snr_gamma <= 0, "--snr_gamma must be > 0"),
            (self.fsdp_size < 1, "--fsdp_size must be >= 1"),
            (self.logging_steps < 1, "--logging_steps must be >= 1"),
            (self.max_compilations < 1, "--max_compilations must be >= 1"),
            (self.dataloader_num_workers < 0, "--dataloader_num_workers must be >= 0"),
        ]
        for bad, message in checks:
            if bad:
                raise ConfigError(message)
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"--prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}")

    @property
    def profile_dir(self) -> str | None:
        """PROFILE_DIR, as in diffusers' XLA example: capture a device profile there."""
        return os.environ.get("PROFILE_DIR") or None

    @property
    def compile_cache_dir(self) -> str | None:
        """CACHE_DIR, as in diffusers' XLA example: persistent XLA compilation cache."""
        return os.environ.get("CACHE_DIR") or None


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def _flag_type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def build_parser(cls: type = TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--name` flag per dataclass field (booleans are store_true)."""
    parser = _OneLineParser(description=description or cls.__doc__)
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
    """Parse the command line into `cls`; a bad value exits with one `error:` line."""
    args = build_parser(cls).parse_args(argv)
    try:
        return cls(**vars(args))
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None
