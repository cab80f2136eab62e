"""SharedStepAdamW: torch's AdamW update with one step count per param group (optim.py says why). On the CPU,
eagerly; the bitwise comparison with torch's capturable AdamW on the mesh is in tests/test_state.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from xla_diffusion.checkpoint import flat_tensors, training_state
from xla_diffusion.optim import LrSchedule, SharedStepAdamW, make_optimizer, prime_optimizer
from xla_diffusion.state import TrainState


@pytest.fixture(scope="module", autouse=True)
def _xla_runtime_first():
    """The XLA runtime starts before this module's first (CPU) backward: autograd sizes its per-device queues at
    a process's first backward, and a later test's XLA backward would find no queue for its device."""
    from xla_diffusion import runtime

    runtime.init_runtime()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 6) -> list[torch.Tensor]:
    """`steps` updates under a warm-up then cosine lr (a 0-d tensor, as the trainer's); returns the weights."""
    schedule = LrSchedule(opt, "cosine", 2, steps)
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        schedule.set_step(k)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_shared_step_adamw_is_torch_adamw(weight_decay):
    """Weights and moments after 6 updates (lr warm-up from the floor, then cosine) equal torch's AdamW's; torch
    is run without `capturable` here (refused on the CPU), which computes its scalars in Python floats, so the
    comparison allows float32 rounding."""
    ours_model, torch_model = _model(), _model()
    ours = SharedStepAdamW(ours_model.parameters(), lr=torch.tensor(3e-2), betas=(0.9, 0.99),
                           weight_decay=weight_decay, eps=1e-8)
    ref = torch.optim.AdamW(torch_model.parameters(), lr=torch.tensor(3e-2), betas=(0.9, 0.99),
                            weight_decay=weight_decay, eps=1e-8, foreach=False)
    initial = [p.detach().clone() for p in ours_model.parameters()]
    a, b = _train(ours_model, ours), _train(torch_model, ref)
    for x, y, w0 in zip(a, b, initial):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
        assert not torch.equal(x, w0)  # it did train
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        assert ours.state[p].keys() == ref.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"]) == 6
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][k], ref.state[q][k], rtol=1e-5, atol=1e-9)


def test_one_step_count_per_group_created_lazily_or_primed():
    """Whether the first update creates the state or prime_optimizer does, every parameter of a group holds the
    same `step` tensor, which advances once per update; the two ways give the same weights."""
    lazy_model, primed_model = _model(), _model()
    lazy = make_optimizer(lazy_model, 1e-2, (0.9, 0.999), 1e-2, 1e-8)
    primed = make_optimizer(primed_model, 1e-2, (0.9, 0.999), 1e-2, 1e-8)
    assert isinstance(lazy, SharedStepAdamW)
    prime_optimizer(primed)
    steps = {id(primed.state[p]["step"]) for p in primed_model.parameters()}
    assert len(steps) == 1 and len(primed.state) == 4
    shared = primed.state[next(primed_model.parameters())]["step"]
    for w, v in zip(_train(lazy_model, lazy, steps=3), _train(primed_model, primed, steps=3)):
        assert torch.equal(w, v)
    assert len({id(lazy.state[p]["step"]) for p in lazy_model.parameters()}) == 1
    assert all(primed.state[p]["step"] is shared for p in primed_model.parameters()) and float(shared) == 3


def test_unsupported_options_are_refused():
    model = _model()
    opt = SharedStepAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    opt.param_groups[0]["amsgrad"] = True
    model(torch.randn(2, 5)).sum().backward()
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


def test_checkpoint_layout_and_step_tensors():
    """The checkpoint still names a `step` for every parameter (the layout torch's AdamW gave), all of them the
    group's one tensor; the replayed step's state lists that tensor once."""
    cfg = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
                          adam_epsilon=1e-8, lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=3,
                          use_ema=True, ema_decay=0.99)
    st = TrainState.create(copy.deepcopy(_model()), cfg)
    names = [n for n, _ in st.unet.named_parameters()]
    flat = flat_tensors(training_state(st.unet, st.optimizer, st.ema.shadow))
    assert {k for k in flat if k.endswith(".step")} == {f"optimizer.{n}.step" for n in names}
    assert len({id(flat[f"optimizer.{n}.step"]) for n in names}) == 1
    tensors = st.step_tensors()
    assert len(tensors) == len({id(t) for t in tensors}) == 4 + 4 * 2 + 1 + 4  # params, moments, step, EMA


def test_step_tensors_kept_while_they_stay_the_state():
    """step_tensors() lists the state once and hands out that list while it is still the state; after the EMA
    swaps its shadow tensors (evaluation on the averaged weights) or AdamW gains state, it lists again."""
    cfg = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
                          adam_epsilon=1e-8, lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=3,
                          use_ema=True, ema_decay=0.99)
    st = TrainState.create(copy.deepcopy(_model()), cfg)
    first = st.step_tensors()
    assert st.step_tensors() is first
    with st.averaged():
        pass
    again = st.step_tensors()
    assert again is not first
    assert [id(t) for t in again] == [id(t) for t in st._list_step_tensors() + st.ema.shadow]
    assert [id(t) for t in again[:-4]] == [id(t) for t in first[:-4]]  # the optimizer's part did not change
    st.optimizer.state[torch.nn.Parameter(torch.zeros(2))]["exp_avg"] = torch.zeros(2)  # state for one more
    assert st.step_tensors() is not again
