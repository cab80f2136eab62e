"""The ecosystem wiring in the session's real CLI runs (tests/helpers.py TrainRuns): the `evalloop` run reports
to TensorBoard and wandb (offline), and what their own readers give back equals logs/metrics.jsonl, with the
validation images and the config; its export carries a model card built from the run. The `bf16` run pushes its
export to the session's loopback hub, and its token appears in none of the run's outputs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import HUB_REPO, HUB_TOKEN, VALIDATION_PROMPTS, read_metrics
from tests.test_tracking import _wandb_config, _wandb_records

pytestmark = pytest.mark.slow


def _numeric(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and not isinstance(v, str)}


def _tree(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")] = f.read()
    return out


def test_tensorboard_holds_the_jsonl_metrics_and_the_validation_images(train_runs):
    from tbparse import SummaryReader
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    out = train_runs.succeeded("evalloop")
    records = read_metrics(out)
    # the trackers changed nothing in the step: one step graph from step 1 on, evaluations included
    assert [r["compilations"] for r in records if "loss" in r] == [1, 1, 1, 1]
    logdir = os.path.join(out, "logs", "evalloop-project")
    scalars = SummaryReader(logdir).scalars
    for r in records:
        for key, value in _numeric(r).items():
            row = scalars[(scalars.tag == key) & (scalars.step == r["step"])]
            assert len(row) == 1 and row.value.iloc[0] == np.float32(value), (key, r["step"])
    assert set(scalars.tag) == {k for r in records for k in _numeric(r)}

    ea = EventAccumulator(logdir, size_guidance={IMAGES: 0})
    ea.Reload()
    assert sorted(ea.Tags()["images"]) == ["validation/0", "validation/1", "validation/2", "validation_grid"]
    last = os.path.join(out, "validation", "step_000004")
    samples = np.load(os.path.join(last, "samples.npz"))["images"]
    with open(os.path.join(last, "grid.png"), "rb") as f:
        grid = np.asarray(Image.open(f).convert("RGB"))
    for tag, expected in [*((f"validation/{i}", samples[i]) for i in range(3)), ("validation_grid", grid)]:
        events = ea.Images(tag)
        assert [e.step for e in events] == [2, 4]
        got = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(got, expected)

    hparams = SummaryReader(logdir).hparams
    config = dict(zip(hparams.tag, hparams.value))
    assert config["prediction_type"] == "v_prediction" and config["report_to"] == "all"
    assert config["max_train_steps"] == 4 and "hub_token" not in config


def test_wandb_offline_run_holds_the_jsonl_metrics_images_and_config(train_runs):
    out = train_runs.succeeded("evalloop")
    records = read_metrics(out)
    run_dir, wandb_records = _wandb_records(out)
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in wandb_records if r["type"] == "history"}
    assert sorted(history) == [1, 2, 3, 4]
    for r in records:
        for key, value in _numeric(r).items():
            assert history[r["step"]][key] == value, (key, r["step"])  # exact: wandb keeps float64
    assert history[4]["validation.captions"] == VALIDATION_PROMPTS
    samples = np.load(os.path.join(out, "validation", "step_000004", "samples.npz"))["images"]
    for name, expected in zip(history[4]["validation.filenames"], samples):
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(run_dir, "files", name)).convert("RGB")),
                                      expected)
    assert len(history[2]["validation_grid.filenames"]) == 1
    config = _wandb_config(wandb_records)
    assert config["prediction_type"] == "v_prediction" and config["max_train_steps"] == 4
    assert "hub_token" not in config


def test_model_card_from_the_run(train_runs):
    """README.md beside the export: the run's steps and mesh, the last validation grid and the last evaluation."""
    from huggingface_hub import ModelCard

    out = train_runs.succeeded("evalloop")
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert {"diffusers-training", "pytorch-xla", "text-to-image"} <= set(card.data.to_dict()["tags"])
    text = card.text
    with open(os.path.join(out, "validation", "step_000004", "grid.png"), "rb") as a, \
            open(os.path.join(out, "validation_grid.png"), "rb") as b:
        assert a.read() == b.read()
    last_eval = [r for r in read_metrics(out) if "eval_loss" in r][-1]
    with open(os.path.join(out, "train_summary.json")) as f:
        summary = json.load(f)
    for expected in ("![validation images](validation_grid.png)", "| steps | 4 |", "| device mesh | data 4 × fsdp 1 |",
                     f"| eval_loss | {last_eval['eval_loss']:.6g} |",
                     f"| mean step time (after warm-up) | {summary['mean_step_time_s']:.4g} s |",
                     "*" + VALIDATION_PROMPTS[0] + "*"):
        assert expected in text, expected


def test_export_is_pushed_to_the_hub(train_runs, session_hub):
    out = train_runs.succeeded("bf16")
    local = _tree(out)
    arrived = session_hub.files(HUB_REPO)
    assert arrived == {p: b for p, b in local.items() if not p.startswith("logs/wandb/")}
    assert {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors", "train_summary.json",
            "logs/metrics.jsonl"} <= set(arrived)
    assert any(p.startswith("logs/text2image-fine-tune/events.out.tfevents.") for p in arrived)
    # the repo was created before training (a bad token stops the run at its start), then one commit
    paths = [p for _, p, _ in session_hub.requests]
    assert paths[0] == "/api/repos/create" and len(session_hub.repos[HUB_REPO].commits) == 1
    assert "pushed" in train_runs.result("bf16").stderr


def test_the_token_is_nowhere(train_runs, session_hub):
    """stdout, stderr, the logs, the TensorBoard and wandb files, the card, what the hub received."""
    out = train_runs.succeeded("bf16")
    r = train_runs.result("bf16")
    token = HUB_TOKEN.encode()
    assert HUB_TOKEN not in r.stdout and HUB_TOKEN not in r.stderr
    files = _tree(out)
    assert any(p.startswith("logs/wandb/") for p in files)  # wandb's run files were written (and checked)
    for path, data in files.items():
        assert token not in data, path
    for path, data in session_hub.files(HUB_REPO).items():
        assert token not in data, path
    assert all(HUB_TOKEN not in p for _, p, _ in session_hub.requests)
