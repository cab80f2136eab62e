"""Resume and output flags that cannot work stop with one `error:` line before any device work, and an empty
image dataset is one line (in-process: the trainer's own entry point through the CLI wrapper)."""

from __future__ import annotations

import os

import pytest

from train_text_to_image_xla import main
from xla_diffusion.cli import run_cli
from xla_diffusion.data.config import DataConfig
from xla_diffusion.data.images import load_image_caption_dataset
from xla_diffusion.errors import ConfigError


def _run(capsys, tiny_pipeline: str, shapes_dir: str, *extra: str) -> tuple[int, str]:
    code = run_cli(main, ["--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir",
                          os.path.join(shapes_dir, "train"), "--resolution", "64", "--train_batch_size", "8", *extra])
    return code, capsys.readouterr().err


def test_output_dir_that_cannot_be_created(capsys, tmp_path, tiny_pipeline, shapes_dir, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("xla_diffusion.runtime.init_runtime", lambda *a: pytest.fail("device work started"))
    code, err = _run(capsys, tiny_pipeline, shapes_dir, "--output_dir", str(tmp_path / "a_file" / "out"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --output_dir {tmp_path}/a_file/out cannot be written: NotADirectoryError: Not a directory"]


def test_resume_from_a_path_that_does_not_exist(capsys, tmp_path, tiny_pipeline, shapes_dir, monkeypatch):
    monkeypatch.setattr("xla_diffusion.runtime.init_runtime", lambda *a: pytest.fail("device work started"))
    code, err = _run(capsys, tiny_pipeline, shapes_dir, "--output_dir", str(tmp_path / "out"),
                     "--resume_from_checkpoint", str(tmp_path / "nothing"))
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: --resume_from_checkpoint {tmp_path}/nothing: no such checkpoint"
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--checkpointing_steps", "-1"], "error: --checkpointing_steps must be >= 0"),
    (["--checkpoints_total_limit", "0"], "error: --checkpoints_total_limit must be >= 1"),
])
def test_bad_checkpoint_flags(capsys, tmp_path, tiny_pipeline, shapes_dir, flags, message):
    with pytest.raises(SystemExit) as e:
        _run(capsys, tiny_pipeline, shapes_dir, "--output_dir", str(tmp_path / "out"), *flags)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == message


def test_empty_metadata_is_one_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("\n")
    data = DataConfig(dataset_name=None, train_data_dir=str(tmp_path), batch_size=8, resolution=64)
    with pytest.raises(ConfigError) as e:
        load_image_caption_dataset(data)
    assert str(e.value) == f"the dataset at '{tmp_path}' is empty: its metadata.jsonl has no records"


def test_dream_is_in_the_fingerprint_only_when_on():
    """A run with --dream_training must not resume a checkpoint trained without it, nor the reverse; checkpoints
    written before DREAM existed (fingerprints without its fields) still resume runs without it."""
    from xla_diffusion.checkpoint import CheckpointError, check_fingerprint
    from xla_diffusion.config import parse_args
    from xla_diffusion.resume import FINGERPRINT_FIELDS, run_fingerprint

    base = ["--pretrained_model_name_or_path", "/m", "--train_data_dir", "/d"]
    plain, dream = run_fingerprint(parse_args(base)), run_fingerprint(parse_args(base + ["--dream_training"]))
    assert set(plain) == set(FINGERPRINT_FIELDS)
    assert dream["dream_training"] is True and dream["dream_detail_preservation"] == 1.0
    check_fingerprint("ckpt", plain, plain)
    for saved, current in ((plain, dream), (dream, plain)):
        with pytest.raises(CheckpointError, match=r"; dream_detail_preservation must not change when resuming"):
            check_fingerprint("ckpt", saved, current)
