"""Trackers read back with the tools' own readers: TensorBoard event files (tbparse and TensorBoard's
EventAccumulator) and the wandb offline run file (`wandb leet inspect --json`, wandb's reader of the
.wandb transaction log). What they hold must equal what went to logs/metrics.jsonl."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from xla_diffusion import tracking
from xla_diffusion.tracking import TrackerError, make_trackers

TOKEN = "hf_ThisIsNotARealTokenButMustNeverBeLogged42"

CONFIG = {
    "learning_rate": 1e-4,
    "train_batch_size": 16,
    "mixed_precision": "bf16",
    "use_ema": True,
    "snr_gamma": None,
    "validation_prompts": "a red circle; a blue square",
    "hub_token": TOKEN,
}

# What a run's step closures and evaluator produce: losses with full float64 digits, a string field.
RECORDS = [
    {"step": 5, "loss": 0.7312345678901234, "grad_norm": 1.25, "lr": 5e-5, "step_time_s": 0.61,
     "images_per_s": 26.2, "compilations": 2},
    {"step": 10, "loss": 0.41230000001, "grad_norm": 0.75, "lr": 1e-4, "step_time_s": 0.6, "images_per_s": 26.7,
     "compilations": 2},
    {"step": 10, "eval_loss": 0.5, "eval_loss_t0062": 0.9, "eval_compilations": 1},
    {"step": 10, "validation_dir": "/somewhere/validation/step_000010", "validation_compilations": 3},
    {"step": 15, "loss": 0.3, "grad_norm": 0.5, "lr": 1e-4, "step_time_s": 0.59, "images_per_s": 27.1,
     "compilations": 2},
]


def _images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]


def _grid(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 32, 3), dtype=np.uint8)


def _write_run(out: str, report_to: str) -> None:
    t = make_trackers(report_to, "proj", "logs", out, CONFIG, is_main_process=True)
    for r in RECORDS[:2]:
        t.log(dict(r))
    t.log(dict(RECORDS[2]))
    t.log(dict(RECORDS[3]))
    t.log_images(10, {"validation": _images(10), "validation_grid": [Image.fromarray(_grid(10))]},
                 captions={"validation": ["a red circle", "a blue square"]})
    t.log(dict(RECORDS[4]))
    t.close()


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    # The command line as a user may type it: wandb records sys.argv in the run's metadata.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["train_text_to_image_xla.py", "--hub_token", TOKEN, f"--hub_token={TOKEN}",
                                 "--push_to_hub"])
        _write_run(out, "all")
    return out


def _jsonl(out: str) -> list[dict]:
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_jsonl_holds_every_record(all_run):
    assert _jsonl(all_run) == RECORDS


def test_tensorboard_scalars_equal_jsonl(all_run):
    from tbparse import SummaryReader

    logdir = os.path.join(all_run, "logs", "proj")
    scalars = SummaryReader(logdir).scalars
    for r in _jsonl(all_run):
        for key, value in r.items():
            if key == "step" or isinstance(value, str):
                continue
            row = scalars[(scalars.tag == key) & (scalars.step == r["step"])]
            assert len(row) == 1, (key, r["step"])
            # TensorBoard stores scalars as float32: equal to the logged value rounded to float32.
            assert row.value.iloc[0] == np.float32(value), (key, r["step"])
    assert set(scalars.tag) == {k for r in RECORDS for k, v in r.items() if k != "step" and not isinstance(v, str)}


def test_tensorboard_hparams_are_the_config_without_the_token(all_run):
    from tbparse import SummaryReader

    hp = SummaryReader(os.path.join(all_run, "logs", "proj")).hparams
    got = dict(zip(hp.tag, hp.value))
    expected = {k: v for k, v in CONFIG.items() if k != "hub_token"}
    expected["snr_gamma"] = "null"  # the HParams plugin takes numbers, strings and booleans only
    assert got == expected


def test_tensorboard_images_arrive_pixel_exact(all_run):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    ea = EventAccumulator(os.path.join(all_run, "logs", "proj"), size_guidance={IMAGES: 0})
    ea.Reload()
    assert sorted(ea.Tags()["images"]) == ["validation/0", "validation/1", "validation_grid"]
    expected = {"validation/0": _images(10)[0], "validation/1": _images(10)[1], "validation_grid": _grid(10)}
    for tag, arr in expected.items():
        (event,) = ea.Images(tag)
        assert event.step == 10
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(decoded, arr)


def _wandb_records(out: str) -> tuple[str, list[dict]]:
    (run_file,) = glob.glob(os.path.join(out, "logs", "wandb", "offline-run-*", "run-*.wandb"))
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_file],
                          capture_output=True, text=True, timeout=120, check=True)
    return os.path.dirname(run_file), [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _wandb_config(records: list[dict]) -> dict:
    """The run's config as its run file holds it (wandb's own key `_wandb` left out)."""
    config: dict = {}
    for r in records:
        if r["type"] == "run":
            config.update(r["run"]["config"]["update"])
        elif r["type"] == "config":
            config.update(r["config"].get("update", {}))
    config.pop("_wandb", None)
    return config


def test_wandb_offline_run_read_back(all_run):
    run_dir, records = _wandb_records(all_run)
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == [5, 10, 15]
    # Every numeric value logged to the JSONL is in wandb's row for that step, exactly (no float32 rounding).
    for r in _jsonl(all_run):
        for key, value in r.items():
            if key != "step" and not isinstance(value, str):
                assert history[r["step"]][key] == value, (key, r["step"])
    assert "validation_dir" not in history[10]

    # The config is the run's config, without the token.
    config = _wandb_config(records)
    assert config == {k: v for k, v in CONFIG.items() if k != "hub_token"}

    # Images: the row points at media files that decode to the logged pixels, captions attached.
    row = history[10]
    assert row["validation.captions"] == ["a red circle", "a blue square"]
    files = row["validation.filenames"]
    assert len(files) == 2
    for name, arr in zip(files, _images(10)):
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(run_dir, "files", name)).convert("RGB")), arr)
    (grid_file,) = row["validation_grid.filenames"]
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(run_dir, "files", grid_file)).convert("RGB")),
                                  _grid(10))


def test_token_is_nowhere_in_the_run_files(all_run):
    for root, _, names in os.walk(all_run):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), os.path.join(root, name)


def test_report_to_none_keeps_only_the_jsonl(tmp_path):
    _write_run(str(tmp_path), "none")
    assert sorted(os.listdir(tmp_path / "logs")) == ["metrics.jsonl"]
    assert _jsonl(str(tmp_path)) == RECORDS


def test_tensorboard_only(tmp_path):
    _write_run(str(tmp_path), "tensorboard")
    assert sorted(os.listdir(tmp_path / "logs")) == ["metrics.jsonl", "proj"]


def test_other_processes_write_nothing(tmp_path):
    t = make_trackers("all", "proj", "logs", str(tmp_path), CONFIG, is_main_process=False)
    t.log(dict(RECORDS[0]))
    t.log_images(5, {"validation": _images(0)})
    t.close()
    assert os.listdir(tmp_path) == []


def test_absolute_logging_dir(tmp_path):
    logs = tmp_path / "elsewhere"
    t = make_trackers("none", "proj", str(logs), str(tmp_path / "out"), CONFIG, is_main_process=True)
    t.log(dict(RECORDS[0]))
    t.close()
    assert os.path.isfile(logs / "metrics.jsonl")


def test_missing_package_is_one_line_on_every_process(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    for main in (True, False):
        with pytest.raises(TrackerError) as e:
            make_trackers("wandb", "proj", "logs", str(tmp_path), CONFIG, is_main_process=main)
        assert str(e.value) == "--report_to wandb needs the wandb package: pip install wandb"
        assert isinstance(e.value, ValueError)
    assert not os.path.exists(tmp_path / "logs")


def test_missing_tensorboard_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(TrackerError, match=r"^--report_to tensorboard needs the tensorboard package: pip install "
                                           r"tensorboard$"):
        make_trackers("tensorboard", "proj", "logs", str(tmp_path), CONFIG, is_main_process=True)


def test_all_uses_what_is_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert tracking.resolve_report_to("all") == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(TrackerError, match="neither tensorboard nor wandb"):
        tracking.resolve_report_to("all")


def test_unknown_report_to(tmp_path):
    with pytest.raises(TrackerError, match=r"--report_to 'comet_ml': expected one of tensorboard, wandb, all, none"):
        make_trackers("comet_ml", "proj", "logs", str(tmp_path), CONFIG, is_main_process=True)


def test_bad_image_is_refused(tmp_path):
    t = make_trackers("none", "proj", "logs", str(tmp_path), CONFIG, is_main_process=True)
    with pytest.raises(TypeError, match="uint8"):
        tracking.as_uint8_hwc(np.zeros((4, 4, 3), np.float32))
    t.close()


def test_redact_argv():
    argv = ["x.py", "--hub_token", "abc", "--lr", "1", "--hub_token=def", "--tokenizer_name", "t", "--output_dir",
            "o", "--wandb-api-key", "k"]
    assert tracking.redact_argv(argv) == ["x.py", "--hub_token", "***", "--lr", "1", "--hub_token=***",
                                          "--tokenizer_name", "t", "--output_dir", "o", "--wandb-api-key", "***"]


def test_public_config_drops_secrets_only():
    cfg = {"hub_token": "x", "token": "y", "tokenizer_name": "t", "max_tokens": 3, "hub_model_id": "a/b"}
    assert tracking.public_config(cfg) == {"tokenizer_name": "t", "max_tokens": 3, "hub_model_id": "a/b"}


def test_tensorboard_on_gcs(gcs_emulator):
    """A gs:// output_dir: TensorBoard writes there through fsspec; the JSONL file (local only) is skipped."""
    from tests.gcs_emulator import make_bucket

    out = make_bucket("tb-runs") + "/run"
    t = make_trackers("tensorboard", "proj", "logs", out, CONFIG, is_main_process=True)
    for r in RECORDS:
        t.log(dict(r))
    t.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(f"{out}/logs/proj")  # tbparse reads local paths only
    ea.Reload()
    losses = ea.Scalars("loss")
    assert [e.step for e in losses] == [5, 10, 15]
    assert [e.value for e in losses] == [np.float32(r["loss"]) for r in RECORDS if "loss" in r]


def test_wandb_without_login_is_one_line(tmp_path):
    """Online mode with no API key anywhere: one TrackerError line (in a fresh process: wandb keeps its
    settings per process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    code = ("from xla_diffusion.tracking import make_trackers, TrackerError\n"
            "try:\n"
            f"    make_trackers('wandb', 'proj', 'logs', {str(tmp_path / 'out')!r}, {{'a': 1}}, True)\n"
            "except TrackerError as e:\n"
            "    print('error:', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root,
                       stdin=subprocess.DEVNULL)
    lines = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert lines == ["error: --report_to wandb: No API key configured. Use `wandb login` to log in. (or set "
                     "WANDB_API_KEY, or WANDB_MODE=offline to log locally)"], (r.stdout, r.stderr)
