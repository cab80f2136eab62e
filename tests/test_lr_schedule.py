"""Learning-rate schedules are diffusers' own: every --lr_scheduler name gives, at every optimizer step of a
whole run, the lr that `diffusers.optimization.get_scheduler` gives a plain optimizer stepped as diffusers'
scripts step it; and the value lands in the optimizer's device lr tensor."""

import pytest
import torch
from diffusers.optimization import get_scheduler

from xla_diffusion.optim import LR_FLOOR, LR_SCHEDULERS, LrSchedule


def _ours(name: str, warmup: int, total: int, lr: float = 1e-3) -> list[float]:
    # a tensor lr, as the trainer's AdamW has (the value is copied into it, never replaced)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(lr), capturable=False)
    lr_tensor = opt.param_groups[0]["lr"]
    sched = LrSchedule(opt, name, warmup, total)
    out = []
    for step in range(total):
        returned = sched.set_step(step)
        assert opt.param_groups[0]["lr"] is lr_tensor
        out.append(float(lr_tensor))
        assert returned == pytest.approx(out[-1], rel=1e-6)
    return out


def _diffusers(name: str, warmup: int, total: int, lr: float = 1e-3) -> list[float]:
    """The lr each optimizer update uses in diffusers' loop: optimizer.step(), then lr_scheduler.step()."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup, total", [(0, 50), (7, 50), (100, 1000)])
def test_every_schedule_equals_diffusers_over_a_whole_run(name, warmup, total):
    ours, theirs = _ours(name, warmup, total), _diffusers(name, warmup, total)
    # float32 storage of the device lr tensor is the only difference
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-12)


def test_warmup_starts_at_zero_as_in_diffusers():
    lrs = _ours("cosine", 4, 20)
    assert lrs[0] == pytest.approx(0.0, abs=1.01 * LR_FLOOR)  # the device's floor, not diffusers' exact 0
    assert lrs[1] == pytest.approx(0.25e-3) and lrs[4] == pytest.approx(1e-3)
    assert _ours("constant", 4, 10) == pytest.approx([1e-3] * 10)  # diffusers' "constant" ignores warm-up


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown lr_scheduler 'step'"):
        _ours("step", 0, 10)


def test_warmup_step_zero_leaves_parameters_without_gradient_finite():
    """Warm-up's first lr is 0; torch's capturable AdamW divides by it, so a parameter whose gradient is 0 (a
    bf16 gradient that underflowed, an unused weight) would become 0 / 0 = NaN. The device lr is floored."""
    from xla_diffusion import runtime
    from xla_diffusion.optim import make_optimizer, prime_optimizer

    rt = runtime.init_runtime()
    model = runtime.place_trained(torch.nn.Linear(4, 2), rt.mesh)
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.999), 1e-2, 1e-8)
    prime_optimizer(optimizer)
    schedule = LrSchedule(optimizer, "cosine", 3, 10)
    before = [p.detach().cpu().clone() for p in model.parameters()]
    assert schedule.set_step(0) == 0.0  # the schedule's value (logged) is diffusers' 0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    runtime.sync()
    after = [p.detach().cpu() for p in model.parameters()]
    assert all(torch.isfinite(a).all() for a in after)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_a_value_the_device_lr_holds_is_not_sent_again():
    """The host sends the lr only when it changes: once for a constant schedule, every step while it moves."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(1e-3), capturable=False)
    lr_tensor = opt.param_groups[0]["lr"]
    constant, linear = LrSchedule(opt, "constant", 0, 5), LrSchedule(opt, "linear", 0, 5)
    sent = [constant.device_values(k)[0] for k in range(5)]
    assert [len(t) for t in sent] == [1, 0, 0, 0, 0] and sent[0][0] is lr_tensor
    moving = [linear.device_values(k) for k in range(4)]
    assert [len(t) for t, _ in moving] == [1, 1, 1, 1]
    assert [v for _, [v] in moving] == pytest.approx([1e-3, 0.8e-3, 0.6e-3, 0.4e-3])
