"""Learning-rate schedules: warm-up never starts at exactly 0, decays end near 0; the value lands in the
optimizer's lr tensor."""

import math

import pytest
import torch

from xla_diffusion.train_step import LrSchedule


def _lrs(name: str, warmup: int, total: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(1e-3), capturable=False)
    sched = LrSchedule(opt, name, warmup, total)
    out = []
    for step in range(total):
        sched.set_step(step)
        out.append(float(opt.param_groups[0]["lr"]))
    return out


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_warmup_rises_linearly_from_above_zero(name):
    lrs = _lrs(name, 4, 20)
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[3] == pytest.approx(4e-3 / 5) and lrs[4] == pytest.approx(1e-3)
    assert all(lr > 0 for lr in lrs)


def test_decays():
    assert _lrs("constant", 4, 10) == pytest.approx([1e-3] * 10)
    lin, cos = _lrs("linear", 0, 10), _lrs("cosine", 0, 10)
    assert lin[5] == pytest.approx(0.5e-3) and lin[-1] == pytest.approx(0.1e-3)
    assert cos[5] == pytest.approx(0.5e-3) and cos[-1] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 0.9)))
