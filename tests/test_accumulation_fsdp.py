"""The trainer's training state and step under --gradient_accumulation_steps and --fsdp_size, on the real
4-device CPU mesh, with a UNet-shaped toy denoiser that compiles in seconds (the tiny UNet's own sharded,
replicated and checkpointed steps are compared in test_fsdp_sharding.py).

fp32 throughout: 2 micro-batches of 8 give the update of one step on the batch of 16, sharded or not, and the
AdamW moments and EMA shadows of a sharded run carry their parameter's sharding.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from xla_diffusion import runtime, sharding
from xla_diffusion.config import ConfigError, parse_args
from xla_diffusion.data.config import DataConfig
from xla_diffusion.state import TrainState
from xla_diffusion.train_step import StepConfig, micro_batches, train_step
from xla_diffusion.trainer import check_batch_divisible

TEXT_DIM, BATCH = 32, 16  # BATCH: the double batch; 2 micro-batches of 8
# AdamW's early updates are about lr·g/(|g| + eps): with eps = 1e-8 a gradient entry near its rounding level
# (1e-7 of its tensor's largest) moves its weight by up to lr whatever the rounding, so two summation orders
# (measured: 5e-5 relative on a weight) differ there. With 1e-4 the update's sensitivity to a gradient's
# rounding is bounded (≤ lr/eps), and weights compare at 1e-5 like the gradients themselves.
ADAM_EPSILON = 1e-4


class ToyDenoiser(torch.nn.Module):
    """(noisy latents (B, 4, h, w), timesteps (B,), text states (B, L, TEXT_DIM)) → prediction (B, 4, h, w),
    called like diffusers' UNet. Under the default rule `mid.weight` (36864 elements) is split over fsdp and
    the rest (under 4096 elements each) is replicated."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 64, 3, padding=1)
        self.text = torch.nn.Linear(TEXT_DIM, 64)
        self.time = torch.nn.Linear(1, 64)
        self.mid = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(64, 4, 3, padding=1)

    def forward(self, x, t, hidden, return_dict=False):
        cond = self.text(hidden.mean(1)) + self.time(t.float()[:, None] / 1000)
        h = torch.nn.functional.silu(self.conv_in(x) + cond[:, :, None, None])
        return (self.conv_out(torch.nn.functional.silu(self.mid(h))),)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(BATCH, 4, 8, 8, generator=g), "noise": torch.randn(BATCH, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(BATCH, 8, TEXT_DIM, generator=g),
            "timesteps": torch.randint(0, 1000, (BATCH,), generator=g)}


def _run(fsdp: int, accumulation: int, steps: int = 2) -> dict:
    """`steps` updates of the toy model through the trainer's pieces (fsdp_shard → TrainState.create with EMA →
    train_step) on the mesh (4 // fsdp, fsdp), each on the same batch of 16 in `accumulation` micro-batches."""
    from diffusers import DDPMScheduler

    rt = runtime.init_runtime(fsdp_size=fsdp)
    torch.manual_seed(0)
    model = ToyDenoiser()
    specs = sharding.fsdp_shard(model, rt.mesh)
    cfg = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
                          adam_epsilon=ADAM_EPSILON, lr_scheduler="constant", lr_warmup_steps=0,
                          max_train_steps=steps, use_ema=True, ema_decay=0.999)
    state = TrainState.create(model, cfg)
    step_cfg = StepConfig(prediction_type="epsilon", snr_gamma=5.0, max_grad_norm=1.0, bf16=False,
                          scaling_factor=1.0, accumulation_steps=accumulation)
    ac = runtime.to_device([DDPMScheduler().alphas_cumprod.float()], rt.device)[0]
    out: dict = {"specs": specs, "compiles": [], "metrics": []}
    for _ in range(steps):
        before = runtime.compile_count()
        state.begin_step()
        loss, norm = train_step(state.unet, None, None, state.optimizer, runtime.to_mesh(_batch(), rt.mesh), ac,
                                step_cfg, state.ema)
        state.step += 1
        runtime.sync()
        out["compiles"].append(runtime.compile_count() - before)
        out["metrics"].append((loss.cpu(), norm.cpu()))
        if state.step == 1:
            params = dict(model.named_parameters())
            out["exp_avg"] = {n: state.optimizer.state[p]["exp_avg"].cpu() for n, p in params.items()}
    params = dict(model.named_parameters())
    out["params"] = {n: p.detach().cpu() for n, p in params.items()}
    out["ema"] = {n: s.cpu() for n, s in zip(params, state.ema.shadow)}
    spec_of = runtime.sharding_spec_string
    out["annotations"] = {n: (spec_of(p), spec_of(state.optimizer.state[p]["exp_avg"]),
                              spec_of(state.optimizer.state[p]["exp_avg_sq"]), spec_of(s))
                          for (n, p), s in zip(params.items(), state.ema.shadow)}
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    return {"double_batch": _run(fsdp=1, accumulation=1), "two_micro": _run(fsdp=1, accumulation=2),
            "two_micro_fsdp4": _run(fsdp=4, accumulation=2)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


@pytest.mark.parametrize("other", ["two_micro", "two_micro_fsdp4"])
def test_two_micro_batches_equal_one_step_on_the_double_batch(runs, other):
    """Loss, gradient norm (before clipping) and the first moment (0.1 x the gradient after step 1) within
    1e-5 relative; weights and EMA shadows after two updates as well (see ADAM_EPSILON)."""
    ref, run = runs["double_batch"], runs[other]
    for (loss, norm), (loss_ref, norm_ref) in zip(run["metrics"], ref["metrics"]):
        assert _rel(loss, loss_ref) <= 1e-5 and _rel(norm, norm_ref) <= 1e-5
    for key in ("exp_avg", "params", "ema"):
        for name, t in ref[key].items():
            assert _rel(run[key][name], t) <= 1e-5, f"{key} {name}: {_rel(run[key][name], t):.2e}"


def test_optimizer_moments_and_ema_shadows_are_sharded_like_their_parameter(runs):
    run = runs["two_micro_fsdp4"]
    assert run["specs"]["mid.weight"] == ("fsdp", None, None, None)  # 36864 elements, 64 rows over 4
    assert run["annotations"]["mid.weight"][0] == "{devices=[4,1,1,1]0,1,2,3}"
    assert run["specs"]["conv_out.weight"] == (None,) * 4  # 2304 elements: under the threshold
    for name, specs in run["annotations"].items():
        assert len(set(specs)) == 1, (name, specs)  # param, exp_avg, exp_avg_sq, EMA shadow alike
    for name, specs in runs["double_batch"]["annotations"].items():
        assert set(specs) == {"{replicated}"}, name


def test_accumulation_and_fsdp_compile_one_step_graph_per_run(runs):
    """Step 1 already runs the steady graph: the primed AdamW state (step counts included) and the EMA shadows
    enter it with the shardings the step gives them back."""
    for name, run in runs.items():
        assert run["compiles"] == [1, 0], (name, run["compiles"])


def test_micro_batches_take_every_nth_row():
    batch = {"x": torch.arange(12).view(6, 2), "t": torch.arange(6)}
    first, second = micro_batches(batch, 2)
    assert first["t"].tolist() == [0, 2, 4] and second["t"].tolist() == [1, 3, 5]
    assert first["x"].tolist() == [[0, 1], [4, 5], [8, 9]]
    assert micro_batches(batch, 1) == [batch]


def test_a_host_batch_holds_every_micro_batch_of_an_update():
    cfg = parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--train_batch_size", "4",
                      "--gradient_accumulation_steps", "3"])
    data = DataConfig.from_train_config(cfg, torch.float32)
    assert data.batch_size == 12 and data.for_evaluation(cfg.train_batch_size).batch_size == 4


def test_bad_fsdp_size_and_micro_batch_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^--fsdp_size 3 does not divide the 4 devices of the mesh$"):
        runtime.init_runtime(fsdp_size=3)
    rt = runtime.init_runtime(fsdp_size=2)
    assert check_batch_divisible(4, rt, accumulation_steps=2) == 8
    with pytest.raises(ConfigError, match="global micro-batch 6 .* not divisible by the 4 data-parallel devices"):
        check_batch_divisible(6, rt, accumulation_steps=2)
