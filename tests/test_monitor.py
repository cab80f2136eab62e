"""MFU in the step metrics, the progress bar and the run summary: the arithmetic of StepMonitor with a fake
clock, and which encoders the trainer's FLOP count includes on each data path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from xla_diffusion import monitor as monitor_module
from xla_diffusion import runtime
from xla_diffusion.data.latents import LatentManifest
from xla_diffusion.flops import StepFlops, Utilisation
from xla_diffusion.models import Models
from xla_diffusion.monitor import StepMonitor
from xla_diffusion.tiny import (
    TEXT_HIDDEN_SIZE,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from xla_diffusion.trainer import training_utilisation

RT = SimpleNamespace(num_devices=4, is_main_process=True)  # the runtime fields training_utilisation reads


class ListTracker:
    def __init__(self):
        self.lines = []

    def log(self, metrics):
        self.lines.append(metrics)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """The monitor's clock under the test's control, and no device to wait for or compile on."""
    fake = FakeClock()
    monkeypatch.setattr(monitor_module.time, "perf_counter", fake)
    monkeypatch.setattr(runtime, "wait_device_ops", lambda: None)
    monkeypatch.setattr(runtime, "compile_count", lambda: 7)
    return fake


def _run(clock, utilisation, step_times, warmup=1):
    tracker = ListTracker()
    mon = StepMonitor(8, len(step_times), tracker, max_compilations=4, timing_warmup_steps=warmup,
                      show_progress=False, utilisation=utilisation)
    for step, dt in enumerate(step_times, start=1):
        clock.now += dt
        mon.on_step_done(step, torch.tensor(0.5), torch.tensor(1.0), 1e-4)
        mon.after_step(step)
    return tracker.lines, mon.timing(len(step_times))


def test_mfu_per_logged_step_and_over_the_timed_window(clock):
    # 8 images per step, 3e12 FLOPs per step, 4 chips of 2 TFLOP/s: a 0.5 s step is 3e12 / 0.5 / 8e12 = 75%
    flops = StepFlops(batch=8, unet_fwd=1_000_000_000_000, unet_bwd=1_500_000_000_000, vae_enc=400_000_000_000,
                      text_enc=100_000_000_000)
    lines, summary = _run(clock, Utilisation(flops, num_chips=4, peak_tflops=2.0), [2.0, 0.5, 1.0])
    assert [round(m["mfu"], 12) for m in lines] == [0.1875, 0.75, 0.375]
    assert all(m["images_per_s"] == 8 / m["step_time_s"] for m in lines)
    # the summary's MFU is the mean step time's (steps 2-3 after one warm-up step: 0.75 s)
    assert summary["mean_step_time_s"] == pytest.approx(0.75)
    assert summary["mfu"] == pytest.approx(0.5)
    assert summary["flops_per_step"] == 3_000_000_000_000 and summary["flops_per_image"] == 375_000_000_000
    assert summary["peak_tflops"] == 2.0


def test_without_a_peak_mfu_is_omitted(clock):
    flops = StepFlops(batch=8, unet_fwd=10, unet_bwd=20)
    lines, summary = _run(clock, Utilisation(flops, num_chips=4, peak_tflops=None), [1.0, 1.0])
    assert all("mfu" not in m for m in lines)
    assert summary["mfu"] is None and summary["peak_tflops"] is None and summary["flops_per_step"] == 30


def test_progress_bar_shows_mfu(clock, monkeypatch):
    shown = {}
    mon = StepMonitor(8, 2, ListTracker(), 4, 1, show_progress=False,
                      utilisation=Utilisation(StepFlops(batch=8, unet_fwd=10**12, unet_bwd=10**12), 1, 4.0))
    mon.progress = SimpleNamespace(set_postfix=lambda **kw: shown.update(kw), update=lambda n: None,
                                   close=lambda: None)
    clock.now += 1.0
    mon.on_step_done(1, torch.tensor(0.25), torch.tensor(1.0), 1e-4)
    assert shown == {"loss": "0.2500", "img_s": "8.0", "mfu": "50.0%"}


@pytest.fixture(scope="module")
def tiny_models():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    vae = build_vae()
    return Models(tokenizer, build_text_encoder(tokenizer), vae, build_unet("tiny"), build_scheduler(), "tiny",
                  vae.config)


def _manifest(text_states: bool) -> LatentManifest:
    return LatentManifest(root="x", resolution=64, latent_shape=(4, 16, 16), text_shape=(16, TEXT_HIDDEN_SIZE),
                          has_text_states=text_states, scaling_factor=0.18, shift_factor=None, raw={})


@pytest.mark.parametrize(
    ("keys", "text_states", "vae", "text"),
    [({"pixel_values": 4, "input_ids": 2}, None, True, True),  # raw images: both encoders run in the step
     ({"latent_mean": 4, "latent_std": 4, "encoder_hidden_states": 3}, True, False, False),
     ({"latent_mean": 4, "latent_std": 4, "input_ids": 2}, False, False, True)],  # latents, ids: text encoder
)  # fmt: skip
def test_the_count_includes_the_encoders_the_step_runs(tiny_models, keys, text_states, vae, text):
    cfg = SimpleNamespace(resolution=64, peak_tflops=None, dream_training=False)
    latents = None if text_states is None else _manifest(text_states)
    u = training_utilisation(cfg, tiny_models, {**keys, "noise": 4, "timesteps": 1}, latents, 8, RT)
    assert (u.flops.vae_enc > 0) == vae and (u.flops.text_enc > 0) == text
    assert u.flops.batch == 8 and u.flops.unet_fwd > 0 and u.flops.unet_bwd > u.flops.unet_fwd
    assert u.num_chips == 4 and u.peak_tflops is None  # CPU: no table entry, no flag


def test_peak_flag_wins(tiny_models):
    cfg = SimpleNamespace(resolution=64, peak_tflops=123.0, dream_training=False)
    u = training_utilisation(cfg, tiny_models, {"pixel_values": 4, "input_ids": 2}, None, 8, RT)
    assert u.peak_tflops == 123.0


def test_the_count_includes_dreams_forward(tiny_models):
    keys = {"latent_mean": 4, "latent_std": 4, "encoder_hidden_states": 3}
    plain, dream = (training_utilisation(SimpleNamespace(resolution=64, peak_tflops=None, dream_training=on),
                                         tiny_models, keys, _manifest(True), 8, RT).flops for on in (False, True))
    assert plain.unet_dream == 0 and dream.unet_dream == dream.unet_fwd == plain.unet_fwd > 0
    assert dream.total == plain.total + plain.unet_fwd


def test_device_kind_is_none_on_cpu():
    assert runtime.device_kind() is None and runtime.on_tpu() is False
