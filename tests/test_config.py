"""Flags: diffusers' names, per-host batch in --help, validation before any device work."""

import pytest

from xla_diffusion.config import build_parser, parse_args

BASE = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]


def test_help_says_batch_is_per_host():
    text = " ".join(build_parser().format_help().split())
    assert "PER HOST" in text
    flags = ["--snr_gamma", "--prediction_type", "--loader_prefetch_size", "--device_prefetch_size", "--print_loss"]
    for flag in flags:
        assert flag in text


def test_defaults_and_print_loss():
    cfg = parse_args(BASE + ["--print_loss", "--train_batch_size", "4"])
    assert cfg.logging_steps == 1 and cfg.train_batch_size == 4 and cfg.mixed_precision == "no"


def test_flash_attention_flags():
    """diffusers' xformers flag maps onto ours; MFU's peak is unset unless given."""
    assert not parse_args(BASE).enable_flash_attention and parse_args(BASE).peak_tflops is None
    assert parse_args(BASE + ["--enable_flash_attention"]).enable_flash_attention
    cfg = parse_args(BASE + ["--enable_xformers_memory_efficient_attention", "--peak_tflops", "459"])
    assert cfg.enable_flash_attention and cfg.peak_tflops == 459.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prediction_type", "x0"], "invalid choice"),
        (["--mixed_precision", "fp16"], "--mixed_precision fp16: TPUs compute in bf16, pass --mixed_precision bf16"),
        (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
        (["--resolution", "60"], "multiple of 8"),
        (["--snr_gamma", "-1"], "--snr_gamma must be > 0"),
        (["--use_ema", "--ema_decay", "1.0"], "--ema_decay must be in [0, 1)"),
        (["--snr_gamma", "5", "--p2_gamma", "1"], "--snr_gamma and --p2_gamma are two loss weightings: pass one"),
        (["--p2_gamma", "1", "--p2_k", "0"], "--p2_k must be > 0"),
        (["--noise_offset", "-0.1"], "--noise_offset and --input_perturbation must be >= 0"),
        (["--hub_model_id", "me/model"], "--hub_model_id, --hub_private_repo and --hub_revision need --push_to_hub"),
        (["--push_to_hub", "--output_dir", "gs://bucket/out"], "--push_to_hub uploads a local --output_dir"),
        (["--report_to", "comet_ml"], "--report_to 'comet_ml': expected one of tensorboard, wandb, all, none"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be >= 1"),
        (["--validation_epochs", "2"], "--validation_epochs needs --validation_prompts"),
        (["--validation_prompts", "a", "--validation_epochs", "2", "--validation_steps", "3"],
         "pass one of --validation_steps and --validation_epochs"),
        (["--image_interpolation_mode", "sinc"], "invalid choice"),
        (["--loader_prefetch_factor", "0"], "--loader_prefetch_factor must be >= 1"),
        (["--peak_tflops", "0"], "--peak_tflops must be > 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        (["--fsdp_size", "0"], "--fsdp_size must be >= 1"),
        (["--dream_training", "--prediction_type", "v_prediction"],
         "--dream_training is defined for epsilon prediction, not --prediction_type v_prediction"),
        (["--dream_training", "--dream_detail_preservation", "-1"], "--dream_detail_preservation must be >= 0"),
    ],
)
def test_bad_values_exit_with_one_line(capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_needs_a_dataset(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "m"])
    assert "--dataset_name or --train_data_dir" in capsys.readouterr().err


def test_missing_tracker_package_is_one_line_before_device_work(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + ["--report_to", "wandb"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["error: --report_to wandb needs the wandb package: pip install wandb"]


def test_validation_prompts_take_diffusers_form_and_ours():
    several = parse_args(BASE + ["--validation_prompts", "a red circle", "a blue square", "--validation_steps", "5"])
    assert several.validation_prompts == ["a red circle", "a blue square"]
    ours = parse_args(BASE + ["--validation_prompts", "a red circle; a blue square", "--validation_steps", "5"])
    assert ours.validation_prompts == "a red circle; a blue square"  # split by the evaluator, or a file path


def test_measure_start_step_is_the_warm_up_and_the_profile_start():
    cfg = parse_args(BASE + ["--measure_start_step", "10"])
    # the XLA example times from its (0-based) step 10 on: 10 steps of warm-up; its profile starts there
    assert (cfg.timing_warmup_steps, cfg.profile_start_step) == (10, 11)


def test_defaults_follow_diffusers():
    cfg = parse_args(BASE)
    assert cfg.max_train_steps is None and cfg.num_train_epochs == 100  # steps come from the epochs
    assert cfg.report_to == "tensorboard" and cfg.logging_dir == "logs"
    assert cfg.tracker_project_name == "text2image-fine-tune"
