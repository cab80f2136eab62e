"""The demo driver end to end at CI size (`python demo.py`'s default preset: bf16 on the 4-device mesh, on
latent shards, with fewer images and steps and another held-out split), and the likelihood of the model it
trains: bits/dim of held-out latents under the trained pipeline is below that of the same pipeline before
training, measured with `eval.evaluate`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, finish, start_cli

DEMO_STEPS = 300
HELDOUT_SEED = 3  # not the documented split: the flag reaches the data and the scored prompts


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    proc = start_cli(
        ["--output_dir", out, "--num_images", "512", "--max_train_steps", str(DEMO_STEPS), "--validation_steps", "150",
         "--heldout_seed", str(HELDOUT_SEED)],
        os.path.join(out + "_logs", "demo"), num_devices=4, script=os.path.join(ROOT, "demo.py"),
    )
    return out, finish(proc, timeout=1200)


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_its_scores(demo_run):
    out, r = demo_run
    assert r.returncode == 0, r.stderr[-4000:]
    for what in ("colour", "background", "shape"):
        assert re.search(rf"^{what} accuracy: \d+%$", r.stdout, re.M), what
    # the curve from the in-loop samples at steps 150 and 300
    assert len(re.findall(r"^  step +\d+ \(~ *[\d.]+ training min\): colour \d+%", r.stdout, re.M)) == 2
    with open(os.path.join(out, "trained-pipeline", "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == DEMO_STEPS and summary["compilations"] == 1 and summary["encoders_loaded"] == []
    assert summary["mixed_precision"] == "bf16" and summary["num_devices"] == 4
    # the export's default size is the training resolution (32 px: 8x8 latents), and so are the samples
    with open(os.path.join(out, "trained-pipeline", "unet", "config.json")) as f:
        assert json.load(f)["sample_size"] == 8
    with np.load(os.path.join(out, "samples", "samples.npz")) as samples:
        assert samples["images"].shape == (144, 32, 32, 3)
    assert os.path.getsize(os.path.join(out, "samples", "grid.png")) > 0


@pytest.mark.slow
def test_the_demo_holds_out_the_split_of_its_seed(demo_run):
    """--heldout_seed picks the 9 unseen combinations: the sampled prompts are that split's, no training caption
    is one of them, and the split differs from the documented one (seed 0)."""
    from data_prep.synthetic import heldout_combinations

    out, r = demo_run
    assert r.returncode == 0, r.stderr[-4000:]
    with open(os.path.join(out, "data", "heldout_prompts.jsonl")) as f:
        held = {(p["fg"], p["shape"], p["bg"]) for p in map(json.loads, f)}
    assert held == set(heldout_combinations(HELDOUT_SEED)) and held != set(heldout_combinations(0))
    with open(os.path.join(out, "data", "train", "metadata.jsonl")) as f:
        captions = {json.loads(line)["text"] for line in f}
    held_captions = {f"a {fg} {shape} on a {bg} background" for fg, shape, bg in held}
    assert len(captions) > 9 and not captions & held_captions
    with np.load(os.path.join(out, "samples", "samples.npz"), allow_pickle=True) as samples:
        assert {str(t) for t in samples["prompts"]} == held_captions


def _evaluate(pipeline: str, heldout: str, output: str) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, "-m", "eval.evaluate", "--pipeline", pipeline, "--heldout", heldout, "--output", output,
         "--max_heldout_samples", "16", "--bpd_timesteps", "16", "--batch_size", "8", "--seed", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bits_per_dim" in r.stdout
    with open(output) as f:
        return json.load(f)["metrics"]["bits_per_dim"]


@pytest.mark.slow
def test_the_demo_model_has_fewer_bits_per_dim_than_before_training(demo_run, tmp_path):
    """Fresh images of the training distribution (another seed), the same noise draws for both pipelines
    (`--seed`): the trained UNet's variational bound is lower."""
    from data_prep.synthetic import write_shapes_dataset

    out, r = demo_run
    assert r.returncode == 0, r.stderr[-4000:]
    write_shapes_dataset(str(tmp_path), num_images=16, resolution=32, seed=12345)
    heldout = str(tmp_path / "train")
    before = _evaluate(os.path.join(out, "tiny-pipeline"), heldout, str(tmp_path / "before.json"))
    after = _evaluate(os.path.join(out, "trained-pipeline"), heldout, str(tmp_path / "after.json"))
    print(f"bits/dim of fresh shapes latents: before training {before:.3f}, after {DEMO_STEPS} steps {after:.3f}")
    assert 0 < after < before - 0.5
