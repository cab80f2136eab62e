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
@pytest.mark.parametrize("counted", [False, True], ids=["decay_sent", "decay_from_step_count"])
def test_average_in_the_xla_step_matches_diffusers_and_compiles_once(counted):
    """A small model trained on the mesh with the production optimizer and the EMA update traced into the
    step: after every step the device average equals diffusers' EMAModel fed the same weights, and steps
    3..6 (six different decays) reuse the step-2 graph. `counted`: the graph computes the decay from AdamW's
    step count (the trainer's EMA), instead of reading the decay the host sends."""
    from xla_diffusion import runtime
    from xla_diffusion.optim import make_optimizer, prime_optimizer
    from xla_diffusion.state import update_count

    rt = runtime.init_runtime()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    ref = _reference(list(model.parameters()), 0.99)
    model = model.to(rt.device)
    opt = make_optimizer(model, 1e-2, (0.9, 0.999), 1e-2, 1e-8)
    if counted:
        prime_optimizer(opt)
    ema = EmaWeights(list(model.parameters()), 0.99, update_count=update_count(opt) if counted else None)
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


def test_a_decay_the_device_holds_is_not_sent_again():
    """The decay tensor gets a new value only when the decay changes: not at update 1 (0, as it starts), every
    update while it warms up, no more once it reaches the cap."""
    ema = EmaWeights([torch.nn.Parameter(torch.zeros(2))], 0.5)  # 9 / (9 + 9) = 0.5: capped from update 9 on
    sent = {n: ema.device_values(n) for n in range(1, 12)}
    assert [n for n, (targets, _) in sent.items() if targets] == list(range(2, 10))
    assert all(targets == [] or targets[0] is ema.decay_tensor for targets, _ in sent.values())
    assert sent[5][1] == [5 / 14] and ema.decay == 0.5


def test_decay_from_the_update_count_is_the_hosts():
    """The decay the step computes from the device update count (fp32) equals the host's `ema_decay` rounded to
    fp32, at every update up to 100,000, for the caps users set; an EMA with a count sends no decay."""
    n = torch.arange(1, 100_001)
    for cap in (0.99, 0.999, 0.9999):
        ema = EmaWeights([torch.nn.Parameter(torch.zeros(1))], cap, update_count=n)
        host = torch.tensor([ema_decay(k, cap) for k in range(1, 100_001)], dtype=torch.float32)
        assert torch.equal(ema._traced_decay(), host)
        assert ema.device_values(5) == ([], []) and ema.decay == 5 / 14 and ema.decay_tensor is None
