"""--use_ema: the moving average equals diffusers' EMAModel (the reference our users know) step for step,
on the CPU and inside the traced XLA step on the mesh, where a changing decay compiles nothing new; the
swap used by validation and export is exact and undone."""

from __future__ import annotations

import pytest
import torch

from xla_diffusion.ema import EmaWeights, ema_decay


def _reference(params: list[torch.Tensor], decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel([p.detach().clone() for p in params], decay=decay)


def test_decay_schedule_is_diffusers_default():
    ref = _reference([torch.zeros(1)], 0.999)
    for n in (1, 2, 3, 10, 100, 10_000, 1_000_000):
        assert ema_decay(n, 0.999) == pytest.approx(ref.get_decay(n), abs=1e-12), n
    assert ema_decay(1, 0.9) == 0.0 and ema_decay(10_000, 0.9) == 0.9


def test_cpu_average_matches_diffusers_ema_model():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    ema, ref = EmaWeights(params, 0.95), _reference(params, 0.95)
    for n in range(1, 40):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.set_update(n)
        ema.update()
        ref.step(params)
        for s, r in zip(ema.shadow, ref.shadow_params):
            torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)
    assert ema.decay == pytest.approx(39 / 48)  # still warming up: below the 0.95 cap


def test_applied_swaps_the_average_in_and_the_weights_back():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(3))]
    ema = EmaWeights(params, 0.9)
    with torch.no_grad():
        ema.shadow[0].fill_(5.0)
        ema.shadow[1].fill_(7.0)
    first = params[0]
    with ema.applied():
        assert params[0] is first  # same Parameter objects: the optimizer's state still points at them
        assert torch.equal(params[0], torch.full((2,), 5.0)) and torch.equal(params[1], torch.full((3,), 7.0))
    assert torch.equal(params[0], torch.ones(2)) and torch.equal(params[1], torch.zeros(3))
    assert torch.equal(ema.shadow[0], torch.full((2,), 5.0))


@pytest.mark.slow
def test_average_in_the_xla_step_matches_diffusers_and_compiles_once():
    """A small model trained on the mesh with the production optimizer and the EMA update traced into the
    step: after every step the device average equals diffusers' EMAModel fed the same weights, and steps
    3..6 (six different decays) reuse the step-2 graph."""
    from xla_diffusion import runtime
    from xla_diffusion.optim import make_optimizer

    rt = runtime.init_runtime()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    ref = _reference(list(model.parameters()), 0.99)
    model = model.to(rt.device)
    opt = make_optimizer(model, 1e-2, (0.9, 0.999), 1e-2, 1e-8)
    ema = EmaWeights(list(model.parameters()), 0.99)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    compiles = []
    for n in range(1, 7):
        before = runtime.compile_count()
        ema.set_update(n)
        loss = torch.nn.functional.mse_loss(model(x.to(rt.device)), y.to(rt.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        runtime.sync()
        compiles.append(runtime.compile_count() - before)
        # requires_grad: EMAModel copies (does not average) parameters that do not require grad
        ref.step([p.detach().cpu().requires_grad_() for p in model.parameters()])
        for s, r in zip(ema.shadow, ref.shadow_params):
            torch.testing.assert_close(s.cpu(), r, rtol=1e-5, atol=1e-6)
    assert sum(compiles[2:]) == 0, compiles
