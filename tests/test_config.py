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
        (["--prediction_type", "sample"], "invalid choice"),
        (["--mixed_precision", "fp16"], "invalid choice"),
        (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
        (["--resolution", "60"], "multiple of 8"),
        (["--snr_gamma", "-1"], "--snr_gamma must be > 0"),
        (["--use_ema", "--ema_decay", "1.0"], "--ema_decay must be in [0, 1)"),
        (["--peak_tflops", "0"], "--peak_tflops must be > 0"),
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
