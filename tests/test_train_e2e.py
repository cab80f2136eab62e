"""End-to-end runs of the real CLI on CPU device meshes (slow: each compiles the step graph).

The runs are started once per session by the `train_runs` fixture and inspected here.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_metrics

pytestmark = pytest.mark.slow


def _summary(folder: str) -> dict:
    with open(os.path.join(folder, "train_summary.json")) as f:
        return json.load(f)


def _unet_weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_four_device_mesh_equals_one_device(train_runs):
    """Same seed, data, noise, timesteps, offset and perturbation draws: 3 fp32 steps on a 4-device and a
    1-device mesh agree."""
    four, one = train_runs.succeeded("fp32_4dev"), train_runs.succeeded("fp32_1dev")
    m4, m1 = read_metrics(four), read_metrics(one)
    assert [m["step"] for m in m4] == [m["step"] for m in m1] == [1, 2, 3]
    losses4, losses1 = np.array([m["loss"] for m in m4]), np.array([m["loss"] for m in m1])
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    w4, w1, w0 = _unet_weights(four), _unet_weights(one), _unet_weights(train_runs.pipeline)
    assert w4.keys() == w1.keys()
    diff = torch.sqrt(sum(((w4[k] - w1[k]) ** 2).sum() for k in w4))
    norm = torch.sqrt(sum((w1[k] ** 2).sum() for k in w1))
    assert diff / norm <= 1e-5, f"relative weight difference {diff / norm:.3e}"
    # and training did move the weights (the comparison above is not between two untouched copies)
    moved = torch.sqrt(sum(((w1[k] - w0[k]) ** 2).sum() for k in w1)) / norm
    assert moved > 100 * (diff / norm)
    summary = _summary(four)
    assert summary["mesh"] == {"data": 4, "fsdp": 1} and summary["prediction_type"] == "sample"
    # offset noise and input perturbation are in the one step graph, which step 1 already runs (primed AdamW)
    assert summary["compilations"] == 1
    # the exported scheduler samples with the trained objective (x0), not the checkpoint's original one
    with open(os.path.join(four, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "sample"
    assert _summary(one)["num_devices"] == 1


@pytest.mark.parametrize("name, mesh", [("fsdp_2x2", {"data": 2, "fsdp": 2}), ("fsdp_1x4", {"data": 1, "fsdp": 4})])
def test_fsdp_meshes_equal_data_parallel(train_runs, name, mesh):
    """The same 3 fp32 steps (EMA on) with the UNet, its gradients, AdamW moments and EMA sharded over the fsdp
    axis: the losses and the exported (EMA) weights of the data-parallel run, and the export loads."""
    from diffusers import StableDiffusionPipeline

    dp, sharded = train_runs.succeeded("fp32_4dev"), train_runs.succeeded(name)
    np.testing.assert_allclose([m["loss"] for m in read_metrics(sharded)], [m["loss"] for m in read_metrics(dp)],
                               rtol=1e-5)
    ws, wd = _unet_weights(sharded), _unet_weights(dp)
    assert ws.keys() == wd.keys()
    diff = torch.sqrt(sum(((ws[k] - wd[k]) ** 2).sum() for k in ws))
    assert diff / torch.sqrt(sum((wd[k] ** 2).sum() for k in wd)) <= 1e-5
    summary = _summary(sharded)
    assert summary["mesh"] == mesh and summary["compilations"] == 1
    # gathered from the shards: a pipeline diffusers loads, sized for the training resolution (64 px / VAE f=4)
    assert StableDiffusionPipeline.from_pretrained(sharded).unet.config.sample_size == 16


def test_bf16_run_compiles_one_graph(train_runs):
    out = train_runs.succeeded("bf16")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in metrics)
    # one graph from step 1 on: the optimizer state is primed before it, and the warm-up's lr of 0 is data
    assert [m["compilations"] for m in metrics] == [1] * 10
    # the learning rate changed every step (warm-up then cosine) without a recompilation
    lrs = [m["lr"] for m in metrics]
    assert lrs[0] == 0 and lrs[0] < lrs[2] and lrs[3] > lrs[-1] > 0 and len(set(lrs)) == len(lrs)
    summary = _summary(out)
    assert summary["compilations"] == 1 and summary["steps"] == 10 and summary["mixed_precision"] == "bf16"
    assert f"{summary['compilations']} XLA compilations" in train_runs.result("bf16").stderr


def test_bf16_run_reports_flops_and_mfu(train_runs):
    """--peak_tflops 1 on 4 CPU devices: MFU = FLOPs per step / step time / 4e12, in every metrics line and
    over the timed window in the summary; the FLOPs are the images path's (VAE and text encoder in the step)."""
    out = train_runs.succeeded("bf16")
    summary, metrics = _summary(out), read_metrics(out)
    flops = summary["flops_per_step"]
    assert summary["peak_tflops"] == 1.0 and flops > 0
    assert summary["flops_per_image"] == pytest.approx(flops / summary["global_batch_size"])
    assert summary["mfu"] == pytest.approx(flops / summary["mean_step_time_s"] / 4e12, rel=1e-9)
    for m in metrics:
        assert m["mfu"] == pytest.approx(flops / m["step_time_s"] / 4e12, rel=1e-9)
    # the count is the one the trainer logged at start-up, encoders included
    assert f"training FLOPs per step {flops:.4g}" in train_runs.result("bf16").stderr
    assert "MFU against 1 TFLOP/s per chip" in train_runs.result("bf16").stderr
    # --dream_training: the count holds DREAM's extra forward, the parts add up to the total per image
    parts = re.search(r"per image (\S+): UNet forward\+backward (\S+), DREAM forward (\S+), VAE encoder (\S+), "
                      r"text encoder ([^)]+)\)", train_runs.result("bf16").stderr)
    per_image, unet, dream, vae, text = (float(v) for v in parts.groups())
    assert 0 < dream < unet / 2  # a forward, beside forward + backward (the backward is about twice the forward)
    assert per_image == pytest.approx(unet + dream + vae + text, rel=1e-3)


def test_flash_attention_off_tpu_warns_once_and_trains(train_runs):
    train_runs.succeeded("bf16")
    stderr = train_runs.result("bf16").stderr
    assert stderr.count("flash attention needs a TPU; keeping the standard attention") == 1


def test_compilation_bound_stops_the_run(train_runs):
    r = train_runs.result("bound")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    # the unprimed trainer: step 1's graph creates the AdamW state, step 2 compiles the steady graph
    assert last.startswith("error: the training step compiled 2 XLA graphs by step 2")
    assert "--max_compilations 1" in last
    # a stopped run exports nothing that looks complete
    assert not os.path.exists(os.path.join(train_runs.out("bound"), "model_index.json"))


def test_export_loads_in_diffusers_and_generates(train_runs, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion

    # diffusers calls xm.mark_step() per denoising step when torch_xla is importable; this check samples
    # on the CPU, and must not start a non-SPMD XLA runtime inside the test process.
    monkeypatch.setattr(pipeline_stable_diffusion, "XLA_AVAILABLE", False)

    out = train_runs.succeeded("bf16")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe(
        "a red circle on a blue background", num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # trained UNet in fp32 safetensors; the frozen parts exactly as loaded
    trained, initial = _unet_weights(out), _unet_weights(train_runs.pipeline)
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    vae = load_file(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    vae0 = load_file(os.path.join(train_runs.pipeline, "vae", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae[k], vae0[k]) for k in vae0)


def test_logged_lr_is_diffusers_schedule(train_runs):
    """The bf16 run (cosine, 3 warm-up steps, 10 steps, lr 5e-5) logs at every step exactly the lr diffusers'
    get_scheduler gives each optimizer update."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=10)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    logged = [m["lr"] for m in read_metrics(train_runs.succeeded("bf16"))]
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-15) and logged[0] == 0.0
