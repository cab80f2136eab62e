"""In-loop evaluation in a real CLI run on the 4-device mesh (the session's `evalloop` run): the validation loss
and validation samples every 2 steps add no compilation to the training step, their own graphs compile once,
and the sharded validation samples are what eager CPU sampling of the exported pipeline gives."""

import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import VALIDATION_PROMPTS, read_metrics
from xla_diffusion.config import ConfigError, parse_args
from xla_diffusion.ema import ema_decay


@pytest.mark.slow
def test_evaluation_adds_no_compilation_to_the_training_step(train_runs):
    out = train_runs.succeeded("evalloop")
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    vals = [r for r in records if "validation_dir" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # the step's own count: one graph (step 1 already runs the steady graph, with the EMA decay 0 as device
    # data), also after the evaluations at steps 2 and 4
    assert [r["compilations"] for r in train] == [1, 1, 1, 1]
    assert [r["step"] for r in evals] == [2, 4] and [r["step"] for r in vals] == [2, 4]
    # each evaluation graph compiled at the first evaluation only (the counts are cumulative)
    assert evals[0]["eval_compilations"] == evals[1]["eval_compilations"] >= 1
    assert vals[0]["validation_compilations"] == vals[1]["validation_compilations"] >= 3
    with open(os.path.join(out, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["compilations"] == 1  # with --use_ema: the average's update is inside the step graph
    assert summary["ema_decay"] == pytest.approx(ema_decay(4, 0.9))
    assert summary["eval_compilations"] == evals[0]["eval_compilations"]
    assert summary["validation_compilations"] == vals[0]["validation_compilations"]


@pytest.mark.slow
def test_eval_loss_is_per_timestep_and_moves_with_training(train_runs):
    out = train_runs.succeeded("evalloop")
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    per_t = sorted(k for k in evals[0] if k.startswith("eval_loss_t"))
    assert per_t == ["eval_loss_t0125", "eval_loss_t0375", "eval_loss_t0625", "eval_loss_t0875"]
    for r in evals:
        assert np.isfinite(r["eval_loss"])
        assert r["eval_loss"] == pytest.approx(np.mean([r[k] for k in per_t]), rel=1e-6)
    # same held-out samples and noise, weights trained two more steps
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]


@pytest.mark.slow
def test_validation_samples_equal_cpu_sampling_of_the_export(train_runs):
    """Step 4 is the last step: the exported UNet is the one that drew step_000004's samples on the mesh
    (3 prompts padded to 4, sharded over 4 devices); eager CPU sampling with the same options agrees."""
    from xla_diffusion.sampling import SampleOptions, generate, load_sampler_models

    out = train_runs.succeeded("evalloop")
    folder = os.path.join(out, "validation", "step_000004")
    for name in ("grid.png", "samples.npz", "prompts.jsonl", "images/00002.png"):
        assert os.path.exists(os.path.join(folder, name)), name
    data = np.load(os.path.join(folder, "samples.npz"))
    assert list(data["prompts"]) == VALIDATION_PROMPTS and data["images"].shape == (3, 64, 64, 3)
    models, _ = load_sampler_models(out, "cpu")
    opts = SampleOptions(guidance_scale=4.0, num_inference_steps=4, scheduler="dpm-solver++", seed=7, height=64,
                         width=64)
    ref = generate(models, VALIDATION_PROMPTS, opts)
    assert np.abs(ref.astype(int) - data["images"].astype(int)).max() <= 1
    earlier = np.load(os.path.join(out, "validation", "step_000002", "samples.npz"))["images"]
    assert not np.array_equal(earlier, data["images"])  # the weights changed in between


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--validation_steps", "5"], "--validation_steps needs --validation_prompts"),
        (["--validation_epochs", "2"], "--validation_epochs needs --validation_prompts"),
        (["--eval_steps", "2", "--eval_fraction", "1.5"], "--eval_fraction must be in (0, 1)"),
        (["--eval_steps", "-1"], "must be >= 0"),
        (["--validation_scheduler", "heun"], "invalid choice"),
    ],
)
def test_bad_evaluation_flags_are_one_error_line(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def _cfg(tiny_pipeline, shapes_dir, *extra):
    return parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir",
                       os.path.join(shapes_dir, "train"), "--resolution", "64", "--train_batch_size", "8", *extra])


def test_heldout_fraction_is_left_out_of_training(tiny_pipeline, shapes_dir):
    """--eval_steps without --eval_data_dir: a fixed quarter of the images is the held-out set, and the
    training dataset no longer has them; the held-out batches carry fixed noise per timestep."""
    import dataclasses

    import torch

    from xla_diffusion.data.config import DataConfig
    from xla_diffusion.data.images import load_image_caption_dataset
    from xla_diffusion.evaluation import heldout_batches
    from xla_diffusion.models import load_models
    from xla_diffusion.runtime import Runtime

    cfg = _cfg(tiny_pipeline, shapes_dir, "--eval_steps", "2", "--eval_fraction", "0.25", "--eval_timesteps", "3")
    assert cfg.eval_heldout_fraction == 0.25
    data = os.path.join(shapes_dir, "train")

    def fingerprints(ds):
        return {np.asarray(img).tobytes() for img in ds["image"]}

    folder = DataConfig(dataset_name=None, train_data_dir=data, batch_size=8, resolution=64)
    train = load_image_caption_dataset(dataclasses.replace(folder, heldout_fraction=cfg.eval_heldout_fraction))
    held = load_image_caption_dataset(dataclasses.replace(folder, heldout_fraction=0.25), part="heldout")
    everything = load_image_caption_dataset(folder)
    assert (len(train), len(held)) == (48, 16)
    assert fingerprints(train).isdisjoint(fingerprints(held))
    assert fingerprints(train) | fingerprints(held) == fingerprints(everything)
    # host-side only: process 0 of 1 (no device is touched building the held-out batches)
    host = Runtime(device=torch.device("cpu"), process_index=0, process_count=1, num_devices=4, mesh=None)
    models = load_models(tiny_pipeline)
    pairs = list(heldout_batches(cfg, models, host))
    assert [t for t, _ in pairs] == [166, 500, 833] * 2
    assert all(b["pixel_values"].shape == (8, 3, 64, 64) and (b["timesteps"] == t).all() for t, b in pairs)
    again = list(heldout_batches(cfg, models, host))
    assert all(torch.equal(a["noise"], b["noise"]) for (_, a), (_, b) in zip(pairs, again))
    # without eval the training data is whole
    assert _cfg(tiny_pipeline, shapes_dir).eval_heldout_fraction == 0.0
    small = _cfg(tiny_pipeline, shapes_dir, "--eval_steps", "2", "--eval_fraction", "0.05")
    with pytest.raises(ConfigError, match="fewer than one batch"):
        heldout_batches(small, models, host)


def test_heldout_latent_dataset_is_read_in_order_and_scored(tiny_pipeline, shapes_dir, tmp_path):
    """--eval_data_dir pointing at a latent dataset (manifest + tar shards, as data_prep/encode.py writes them):
    read once in shard order into fixed batches that compute_loss takes without the VAE."""
    import torch
    from safetensors.torch import save

    from xla_diffusion.data.latents import FORMAT, FORMAT_VERSION
    from xla_diffusion.data.tar_stream import tar_bytes
    from xla_diffusion.evaluation import heldout_batches
    from xla_diffusion.models import load_models
    from xla_diffusion.runtime import Runtime
    from xla_diffusion.train_step import StepConfig, compute_loss

    root = tmp_path / "latents"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    means = torch.randn(12, 4, 16, 16, generator=g)
    for shard in range(2):
        samples = []
        for i in range(6 * shard, 6 * shard + 6):
            tensors = {"latent_mean": means[i].bfloat16(), "latent_std": torch.full((4, 16, 16), 0.1).bfloat16(),
                       "input_ids": torch.arange(16, dtype=torch.int32),
                       "encoder_hidden_states": torch.randn(16, 32, generator=g).bfloat16()}
            samples.append({"__key__": f"{i:06d}", "safetensors": save(tensors), "txt": "a caption", "json": "{}"})
        (root / f"{shard:05d}.tar").write_bytes(tar_bytes(samples))
    (root / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "version": FORMAT_VERSION, "resolution": 64, "latent_shape": [4, 16, 16],
        "text_shape": [16, 32], "text_states": True, "vae": {"scaling_factor": 0.5, "shift_factor": None},
    }))
    cfg = _cfg(tiny_pipeline, shapes_dir, "--eval_steps", "1", "--eval_data_dir", str(root), "--eval_timesteps", "2")
    assert cfg.eval_heldout_fraction == 0.0  # an explicit held-out set: training keeps all its data
    host = Runtime(device=torch.device("cpu"), process_index=0, process_count=1, num_devices=4, mesh=None)
    models = load_models(tiny_pipeline, load_vae=False)
    pairs = list(heldout_batches(cfg, models, host))
    assert [t for t, _ in pairs] == [250, 750]  # 12 samples → one full batch of 8, the rest dropped
    batch = pairs[0][1]
    torch.testing.assert_close(batch["latent_mean"].float(), means[:8].bfloat16().float())
    assert batch["encoder_hidden_states"].shape == (8, 16, 32)
    step_cfg = StepConfig(prediction_type="epsilon", snr_gamma=None, max_grad_norm=0.0, bf16=False,
                          scaling_factor=0.5)
    with torch.no_grad():
        loss = compute_loss(models.unet.eval(), None, None, batch, models.noise_scheduler.alphas_cumprod.float(),
                            step_cfg)
    assert torch.isfinite(loss)


def assert_same_training(a_dir: str, b_dir: str) -> None:
    """Two runs' logged losses, evaluation losses and exported UNet weights are equal, exactly."""
    from safetensors.torch import load_file

    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["loss"] for r in b if "loss" in r] == [r["loss"] for r in a if "loss" in r]
    assert [r["eval_loss"] for r in b if "eval_loss" in r] == [r["eval_loss"] for r in a if "eval_loss" in r]
    wa, wb = (load_file(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")) for d in (a_dir, b_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def replayed_run_summary(out_dir: str) -> dict:
    """The run's train_summary.json, checked to say that steps 3 and 4 were replayed."""
    with open(os.path.join(out_dir, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["replayed_steps"] == 2 and summary["replay_refused"] is None
    return summary


@pytest.mark.slow
def test_replayed_step_graph_trains_and_evaluates_as_the_traced_one(train_runs):
    """--step_graph replay (per tensor): steps 3 and 4 run the graph recorded at steps 1-2 without tracing it,
    with the EMA swapped in and out for the evaluation at step 2 in between; losses, evaluations and exported
    weights equal those of the run traced every step exactly, with the same single step compilation."""
    traced, replayed = train_runs.succeeded("evalloop_traced"), train_runs.succeeded("evalloop")
    assert_same_training(traced, replayed)
    summary = replayed_run_summary(replayed)
    assert summary["compilations"] == 1
    assert "replaying it from step 3" in train_runs.result("evalloop").stderr
    with open(os.path.join(traced, "train_summary.json")) as f:
        assert json.load(f)["replayed_steps"] == 0


@pytest.mark.slow
def test_flat_state_replay_trains_evaluates_and_checkpoints_as_the_traced_one(train_runs):
    """--step_graph replay_flat (the default): the replicated state lives in flat buffers while steps 3-4 replay; it is
    unpacked for the evaluation at step 2, the checkpoint at step 3 and the export, and packed again before the
    next step. Losses, evaluations and exported weights equal the traced run's exactly, with one step
    compilation; the packing and unpacking graphs compile once each and are counted apart."""
    from xla_diffusion.checkpoint import latest_complete

    traced, flat = train_runs.succeeded("evalloop_traced"), train_runs.succeeded("evalloop_flat")
    assert_same_training(traced, flat)
    summary = replayed_run_summary(flat)
    assert summary["compilations"] == 1 and summary["state_layout_compilations"] == 2
    assert latest_complete(flat).step == 3


@pytest.mark.slow
@pytest.mark.parametrize("run", ["evalloop", "evalloop_flat"])
def test_replayed_step_graph_copies_none_of_the_state(train_runs, run):
    """The trainer's compiled step graph, replayed per tensor or with flat state, gives each donated state
    buffer to that buffer's own new value, so it copies none of the state. Until stop 28 XLA paired AdamW's
    moments crosswise and copied both every step (`donation.donation_order`), and with flat state it also copied
    the whole weights buffer because the loss read a bias from it (`train_step.FLAT_LOSS_BARRIER`)."""
    from xla_diffusion import hlo

    train_runs.succeeded(run)
    step = hlo.step_module(train_runs.hlo_dump(run))
    donated = hlo.donated_bytes(step.hlo_text)
    assert donated > 0
    assert hlo.entry_copy_bytes(step.hlo_text) < 0.01 * donated, (hlo.entry_copy_bytes(step.hlo_text), donated)
