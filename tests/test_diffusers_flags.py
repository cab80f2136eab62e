"""Every flag of diffusers' two text-to-image training scripts parses here, and users' commands carry over.

Source of the flag lists: the `parser.add_argument` calls of huggingface/diffusers at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951 (2026-08-23), files examples/text_to_image/train_text_to_image.py and
examples/research_projects/pytorch_xla/training/text_to_image/train_text_to_image_xla.py. The commands below are
written from the flags of the training commands in those two folders' README.md files, with the model and data
paths replaced by local ones.
"""

from __future__ import annotations

import shlex

import pytest

from xla_diffusion.config import build_parser, parse_args

TEXT_TO_IMAGE_FLAGS = [
    "input_perturbation", "pretrained_model_name_or_path", "revision", "variant", "dataset_name",
    "dataset_config_name", "train_data_dir", "image_column", "caption_column", "max_train_samples",
    "validation_prompts", "output_dir", "cache_dir", "seed", "resolution", "center_crop", "random_flip",
    "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps",
    "gradient_checkpointing", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "snr_gamma",
    "dream_training", "dream_detail_preservation", "use_8bit_adam", "allow_tf32", "use_ema", "offload_ema",
    "foreach_ema", "non_ema_revision", "dataloader_num_workers", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "push_to_hub", "hub_token", "prediction_type", "hub_model_id", "logging_dir",
    "mixed_precision", "report_to", "local_rank", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "enable_xformers_memory_efficient_attention", "noise_offset", "validation_epochs",
    "tracker_project_name", "image_interpolation_mode",
]
XLA_EXAMPLE_FLAGS = [
    "profile_duration", "pretrained_model_name_or_path", "revision", "variant", "dataset_name", "train_data_dir",
    "image_column", "caption_column", "output_dir", "cache_dir", "resolution", "center_crop", "random_flip",
    "train_batch_size", "max_train_steps", "learning_rate", "snr_gamma", "non_ema_revision",
    "dataloader_num_workers", "loader_prefetch_size", "loader_prefetch_factor", "device_prefetch_size",
    "measure_start_step", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "prediction_type",
    "mixed_precision", "push_to_hub", "hub_token", "hub_model_id", "print_loss",
]

BASE = ["--pretrained_model_name_or_path", "/models/sd", "--train_data_dir", "/data/train"]

# flag → (arguments that set it as a user would, outcome): "ok", "warning" (one line, the run goes on) or
# "error" (one line, exit code 2).
FLAG_CASES = {
    "input_perturbation": (["--input_perturbation=0.1"], "ok"),
    "pretrained_model_name_or_path": (["--pretrained_model_name_or_path=/models/other"], "ok"),
    "revision": (["--revision=main"], "ok"),
    "variant": (["--variant=fp16"], "ok"),
    "dataset_name": (["--dataset_name=lambdalabs/naruto-blip-captions"], "ok"),
    "dataset_config_name": (["--dataset_config_name=default"], "ok"),
    "train_data_dir": (["--train_data_dir=/data/other"], "ok"),
    "image_column": (["--image_column=img"], "ok"),
    "caption_column": (["--caption_column=caption"], "ok"),
    "max_train_samples": (["--max_train_samples=100"], "ok"),
    "validation_prompts": (["--validation_prompts", "a red circle", "a blue square"], "ok"),
    "output_dir": (["--output_dir=/tmp/out"], "ok"),
    "cache_dir": (["--cache_dir=/tmp/cache"], "ok"),
    "seed": (["--seed=42"], "ok"),
    "resolution": (["--resolution=256"], "ok"),
    "center_crop": (["--center_crop"], "ok"),
    "random_flip": (["--random_flip"], "ok"),
    "train_batch_size": (["--train_batch_size=4"], "ok"),
    "num_train_epochs": (["--num_train_epochs=3"], "ok"),
    "max_train_steps": (["--max_train_steps=15000"], "ok"),
    "gradient_accumulation_steps": (["--gradient_accumulation_steps=4"], "ok"),
    "gradient_checkpointing": (["--gradient_checkpointing"], "ok"),
    "learning_rate": (["--learning_rate=1e-05"], "ok"),
    "scale_lr": (["--scale_lr"], "ok"),
    "lr_scheduler": (["--lr_scheduler=cosine"], "ok"),
    "lr_warmup_steps": (["--lr_warmup_steps=500"], "ok"),
    "snr_gamma": (["--snr_gamma=5.0"], "ok"),
    "dream_training": (["--dream_training"], "ok"),
    "dream_detail_preservation": (["--dream_detail_preservation=0.5"], "warning"),
    "use_8bit_adam": (["--use_8bit_adam"], "warning"),
    "allow_tf32": (["--allow_tf32"], "warning"),
    "use_ema": (["--use_ema"], "ok"),
    "offload_ema": (["--offload_ema"], "warning"),
    "foreach_ema": (["--foreach_ema"], "warning"),
    "non_ema_revision": (["--non_ema_revision=main"], "ok"),
    "dataloader_num_workers": (["--dataloader_num_workers=8"], "ok"),
    "adam_beta1": (["--adam_beta1=0.9"], "ok"),
    "adam_beta2": (["--adam_beta2=0.99"], "ok"),
    "adam_weight_decay": (["--adam_weight_decay=0.0"], "ok"),
    "adam_epsilon": (["--adam_epsilon=1e-06"], "ok"),
    "max_grad_norm": (["--max_grad_norm=1"], "ok"),
    "push_to_hub": (["--push_to_hub"], "ok"),
    "hub_token": (["--push_to_hub", "--hub_token=hf_x"], "ok"),
    "prediction_type": (["--prediction_type=v_prediction"], "ok"),
    "hub_model_id": (["--push_to_hub", "--hub_model_id=me/sd-naruto"], "ok"),
    "logging_dir": (["--logging_dir=tb"], "ok"),
    "mixed_precision": (["--mixed_precision=bf16"], "ok"),
    "report_to": (["--report_to=wandb"], "ok"),
    "local_rank": (["--local_rank=0"], "warning"),
    "checkpointing_steps": (["--checkpointing_steps=500"], "ok"),
    "checkpoints_total_limit": (["--checkpoints_total_limit=2"], "ok"),
    "resume_from_checkpoint": (["--resume_from_checkpoint=latest"], "ok"),
    "enable_xformers_memory_efficient_attention": (["--enable_xformers_memory_efficient_attention"], "ok"),
    "noise_offset": (["--noise_offset=0.1"], "ok"),
    "validation_epochs": (["--validation_prompts", "a red circle", "--validation_epochs=2"], "ok"),
    "tracker_project_name": (["--tracker_project_name=my-project"], "ok"),
    "image_interpolation_mode": (["--image_interpolation_mode=lanczos"], "ok"),
    # the XLA example's own
    "profile_duration": (["--profile_duration=80000"], "ok"),
    "loader_prefetch_size": (["--loader_prefetch_size=4"], "ok"),
    "loader_prefetch_factor": (["--loader_prefetch_factor=4"], "ok"),
    "device_prefetch_size": (["--device_prefetch_size=4"], "ok"),
    "measure_start_step": (["--measure_start_step=10"], "ok"),
    "print_loss": (["--print_loss"], "ok"),
}


def _outcome(argv: list[str], capsys) -> tuple[str, list[str]]:
    try:
        parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return "error", capsys.readouterr().err.splitlines()
    lines = capsys.readouterr().err.splitlines()
    return ("warning" if lines else "ok"), lines


def test_every_flag_of_both_scripts_is_ours():
    ours = {opt.lstrip("-") for action in build_parser()._actions for opt in action.option_strings}
    assert set(TEXT_TO_IMAGE_FLAGS) | set(XLA_EXAMPLE_FLAGS) <= ours
    assert set(FLAG_CASES) == set(TEXT_TO_IMAGE_FLAGS) | set(XLA_EXAMPLE_FLAGS)


@pytest.mark.parametrize("flag", sorted(FLAG_CASES))
def test_each_flag_works_or_says_why_in_one_line(flag, capsys):
    args, expected = FLAG_CASES[flag]
    outcome, lines = _outcome(BASE + args, capsys)
    assert outcome == expected, lines
    if outcome == "ok":
        assert lines == []
        return
    assert len(lines) == 1 and lines[0].startswith(f"{expected}: "), lines
    assert f"--{flag}" in lines[0]


def test_flag_values_arrive():
    cfg = parse_args(BASE + ["--noise_offset=0.1", "--input_perturbation=0.1", "--image_interpolation_mode=lanczos",
                             "--loader_prefetch_factor=4", "--non_ema_revision=non-ema", "--num_train_epochs=3",
                             "--scale_lr", "--push_to_hub", "--hub_model_id=me/sd", "--hub_token=hf_x",
                             "--report_to=all", "--tracker_project_name=p", "--logging_dir=tb"])
    assert (cfg.noise_offset, cfg.input_perturbation, cfg.image_interpolation_mode) == (0.1, 0.1, "lanczos")
    assert (cfg.loader_prefetch_factor, cfg.non_ema_revision, cfg.num_train_epochs) == (4, "non-ema", 3)
    assert cfg.scale_lr and cfg.push_to_hub and (cfg.hub_model_id, cfg.hub_token) == ("me/sd", "hf_x")
    assert (cfg.report_to, cfg.tracker_project_name, cfg.logging_dir) == ("all", "p", "tb")


# The training command of diffusers' text_to_image README (accelerate launch ... train_text_to_image.py), its
# script arguments with the hub ids of model and data replaced by local paths; the same with --train_data_dir.
TEXT_TO_IMAGE_README = [
    """--pretrained_model_name_or_path=/models/stable-diffusion-v1-4 --dataset_name=/data/naruto-blip-captions
       --use_ema --resolution=512 --center_crop --random_flip --train_batch_size=1 --gradient_accumulation_steps=4
       --gradient_checkpointing --max_train_steps=15000 --learning_rate=1e-05 --max_grad_norm=1
       --lr_scheduler="constant" --lr_warmup_steps=0 --output_dir="sd-naruto-model" """,
    """--pretrained_model_name_or_path=/models/stable-diffusion-v1-4 --train_data_dir=/data/my_images --use_ema
       --resolution=512 --center_crop --random_flip --train_batch_size=1 --gradient_accumulation_steps=4
       --gradient_checkpointing --max_train_steps=15000 --learning_rate=1e-05 --max_grad_norm=1
       --lr_scheduler="constant" --lr_warmup_steps=0 --output_dir="sd-naruto-model" """,
]
# The XLA example README's command (python train_text_to_image_xla.py ...), with its shell variables filled in
# with local paths, and once more with --print_loss, which that README suggests adding.
XLA_README = [
    """--pretrained_model_name_or_path=/models/stable-diffusion-2-base --dataset_name=/data/naruto-blip-captions
       --resolution=512 --center_crop --random_flip --train_batch_size=32 --max_train_steps=50
       --learning_rate=1e-06 --mixed_precision=bf16 --profile_duration=80000 --output_dir=/tmp/trained-model/
       --dataloader_num_workers=8 --loader_prefetch_size=4 --device_prefetch_size=4""",
    """--pretrained_model_name_or_path=/models/stable-diffusion-2-base --dataset_name=/data/naruto-blip-captions
       --resolution=512 --center_crop --random_flip --train_batch_size=32 --max_train_steps=50
       --learning_rate=1e-06 --mixed_precision=bf16 --profile_duration=80000 --output_dir=/tmp/trained-model/
       --dataloader_num_workers=8 --loader_prefetch_size=4 --device_prefetch_size=4 --print_loss""",
]


@pytest.mark.parametrize("command", XLA_README)
def test_xla_readme_command_parses(command, capsys):
    cfg = parse_args(shlex.split(command))
    assert capsys.readouterr().err == ""
    assert (cfg.train_batch_size, cfg.max_train_steps, cfg.learning_rate) == (32, 50, 1e-06)
    assert (cfg.mixed_precision, cfg.profile_duration, cfg.dataloader_num_workers) == ("bf16", 80000, 8)
    assert (cfg.loader_prefetch_size, cfg.device_prefetch_size) == (4, 4)


@pytest.mark.parametrize("command", TEXT_TO_IMAGE_README)
def test_text_to_image_readme_command_parses(command, capsys):
    argv = shlex.split(command)
    # argparse takes every flag of the command
    build_parser().parse_args(argv)
    outcome, lines = _outcome(argv, capsys)
    assert outcome == "ok", lines
    cfg = parse_args(argv)
    assert cfg.use_ema and cfg.center_crop and cfg.random_flip and cfg.train_batch_size == 1
    assert cfg.gradient_accumulation_steps == 4 and cfg.gradient_checkpointing
    assert (cfg.max_train_steps, cfg.learning_rate, cfg.max_grad_norm) == (15000, 1e-05, 1.0)
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.output_dir) == ("constant", 0, "sd-naruto-model")
