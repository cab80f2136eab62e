"""TrainState primes AdamW before the first step: step 1 runs the steady graph (one compilation for the run),
with the very losses and weights of the lazily initialised optimizer."""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT, cli_env
from xla_diffusion.optim import LrSchedule, make_optimizer, prime_optimizer
from xla_diffusion.state import TrainState


def _cfg(**kw):
    fields = dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8,
                  lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=3, use_ema=False, ema_decay=0.9999)
    return SimpleNamespace(**{**fields, **kw})


@pytest.mark.parametrize("amsgrad", [False, True])
def test_primed_state_is_what_the_first_step_would_create(amsgrad):
    """On the CPU (where `capturable` is refused, so the step count stays a CPU tensor): the primed state has
    the keys, shapes, dtypes and zeros of the lazy one, and two steps from it give the same weights and state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    models = [model, copy.deepcopy(model)]
    lazy, primed = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2, amsgrad=amsgrad, foreach=False)
                    for m in models)
    prime_optimizer(primed)
    assert not lazy.state
    for p in primed.param_groups[0]["params"]:
        s = primed.state[p]
        assert set(s) == ({"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set()))
        assert s["step"].shape == () and s["step"].dtype == torch.float32 and float(s["step"]) == 0
        assert all(s[k].shape == p.shape and s[k].dtype == p.dtype and not s[k].any() for k in s if k != "step")
    x = torch.randn(4, 3)
    for _ in range(2):
        for m, opt in zip(models, (lazy, primed)):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    for p, q in zip(lazy.param_groups[0]["params"], primed.param_groups[0]["params"]):
        assert lazy.state[p].keys() == primed.state[q].keys()
        assert all(torch.equal(lazy.state[p][k], primed.state[q][k]) for k in lazy.state[p])


def test_priming_keeps_existing_state_and_train_state_primes():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, 1e-3, (0.9, 0.999), 0.0, 1e-8)
    prime_optimizer(opt)
    marker = opt.state[model.weight]["exp_avg"]
    marker.fill_(1.0)
    prime_optimizer(opt)
    assert opt.state[model.weight]["exp_avg"] is marker and bool((marker == 1).all())
    state = TrainState.create(torch.nn.Linear(3, 2), _cfg())
    assert len(state.optimizer.state) == 2 and state.optimizer.param_groups[0]["capturable"]


def primed_and_lazy_runs(out_file: str) -> None:
    """3 fp32 steps of the real train_step with the tiny UNet on the 4-device mesh (lr warm-up from 0), primed,
    lazy, then primed with torch's AdamW (a step count per parameter) in place of SharedStepAdamW; saves each
    run's compilations per step, (loss, grad norm) per step and final weights."""
    from xla_diffusion import runtime
    from xla_diffusion.tiny import TEXT_HIDDEN_SIZE, build_scheduler, build_unet
    from xla_diffusion.train_step import StepConfig, train_step

    rt = runtime.init_runtime()
    torch.manual_seed(0)
    unet0 = build_unet("tiny").train()
    ac = build_scheduler().alphas_cumprod.float().to(rt.device)
    cfg = StepConfig(prediction_type="epsilon", snr_gamma=5.0, max_grad_norm=1.0, bf16=False, scaling_factor=0.18)
    g = torch.Generator().manual_seed(1)
    batches = [{"latents": torch.randn(8, 4, 16, 16, generator=g), "noise": torch.randn(8, 4, 16, 16, generator=g),
                "encoder_hidden_states": torch.randn(8, 16, TEXT_HIDDEN_SIZE, generator=g),
                "timesteps": torch.randint(0, 1000, (8,), generator=g)} for _ in range(3)]

    def run(prime: bool, shared_step: bool = True) -> dict:
        unet = runtime.place_trained(copy.deepcopy(unet0), rt.mesh)
        opt = make_optimizer(unet, 1e-3, (0.9, 0.999), 1e-2, 1e-8, shared_step=shared_step)
        schedule = LrSchedule(opt, "constant_with_warmup", 2, 3)  # lr 0 at step 1: data, not a constant
        if prime:
            prime_optimizer(opt)
        compiled, out = [], []
        for k, batch in enumerate(batches):
            before = runtime.compile_count()
            schedule.set_step(k)
            loss, norm = train_step(unet, None, None, opt, runtime.to_mesh(batch, rt.mesh), ac, cfg)
            runtime.sync()
            compiled.append(runtime.compile_count() - before)
            out.append((loss.cpu(), norm.cpu()))
        return {"compiled": compiled, "metrics": out, "weights": {k: v.cpu() for k, v in unet.state_dict().items()}}

    primed = run(prime=True)  # first: its graph is then in the in-memory cache when the lazy run reaches it
    torch.save({"primed": primed, "lazy": run(prime=False), "torch_adamw": run(prime=True, shared_step=False),
                "initial": unet0.state_dict()}, out_file)


@pytest.mark.slow
def test_primed_run_compiles_one_step_graph_and_equals_the_lazy_run(tmp_path):
    """The primed run compiles one graph, which is the lazy run's steady graph (the lazy run then compiles
    only its first-step graph), and losses, gradient norms and weights are bit-identical, also to torch's own
    capturable AdamW (its own graph, compiled once). In a subprocess: the
    autograd engine sizes its XLA queues at the process's first backward, and earlier tests run CPU ones."""
    out = str(tmp_path / "runs.pt")
    code = f"from tests.test_state import primed_and_lazy_runs; primed_and_lazy_runs({out!r})"
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(4), cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    runs = torch.load(out)
    primed, lazy = runs["primed"], runs["lazy"]
    assert primed["compiled"] == [1, 0, 0], primed["compiled"]
    assert lazy["compiled"] == [1, 0, 0], lazy["compiled"]  # its first-step graph; the steady one is cached
    assert runs["torch_adamw"]["compiled"] == [1, 0, 0], runs["torch_adamw"]["compiled"]
    for other in (lazy, runs["torch_adamw"]):
        for (pl, pn), (ll, ln) in zip(primed["metrics"], other["metrics"]):
            assert torch.equal(pl, ll) and torch.equal(pn, ln), (pl, ll, pn, ln)
        assert all(torch.equal(primed["weights"][k], other["weights"][k]) for k in other["weights"])
    assert any(not torch.equal(primed["weights"][k], v) for k, v in runs["initial"].items())
