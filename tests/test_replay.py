"""--step_graph replay (replay.StepReplay) on the 4-device mesh: a replayed step is the traced step (same
losses, weights, AdamW state and EMA, bit for bit, with the lr and EMA decay changing every step), it compiles
nothing more, and a step that reads a changing value it was not given falls back to tracing instead of
replaying a stale one."""

from __future__ import annotations

import logging

import pytest
import torch

from xla_diffusion.replay import HELD_STEPS

pytestmark = pytest.mark.slow

STEPS = 6


class Net(torch.nn.Module):
    """Linear layers (whose weights the step reads through a transposed view) and a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 32)
        self.norm = torch.nn.GroupNorm(4, 32)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(torch.nn.functional.silu(self.norm(h[:, :, None]).squeeze(-1)))


def _state(rt):  # noqa: ANN001, ANN202
    from xla_diffusion import sharding
    from xla_diffusion.config import TrainConfig
    from xla_diffusion.state import TrainState

    torch.manual_seed(0)
    net = Net()
    sharding.fsdp_shard(net, rt.mesh)
    cfg = TrainConfig(pretrained_model_name_or_path="-", train_data_dir="-", max_train_steps=STEPS, use_ema=True,
                      learning_rate=1e-2, lr_scheduler="cosine", lr_warmup_steps=2, ema_decay=0.99)
    return TrainState.create(net, cfg)


def _run(rt, enabled: bool, undeclared: bool = False, primed: bool = True, frozen_bias: bool = False,  # noqa: ANN001, ANN202
         cut_when_needed: bool = False):
    """STEPS optimizer steps through StepReplay; returns (losses, final state on the host, replay, compilations).
    `primed=False` leaves AdamW's state to be created inside the first step; `frozen_bias` gives the output
    layer's bias no gradient, so the step leaves it (and its AdamW moments) unchanged. The graph is cut after
    every step (a closure reads each loss), or with `cut_when_needed` only when `replay.cut_needed` says so
    (no closures: the losses are read at the end), checking that nothing is left pending when it does not."""
    from xla_diffusion import runtime
    from xla_diffusion.replay import StepReplay

    st = _state(rt)
    if not primed:
        st.optimizer.state.clear()
    if frozen_bias:
        st.unet.out.bias.requires_grad_(False)
    replay = StepReplay(enabled)
    g = torch.Generator().manual_seed(1)
    losses = []
    n0 = runtime.compile_count()
    for step in range(STEPS):
        batch = runtime.to_mesh({"x": torch.randn(16, 8, generator=g), "y": torch.randn(16, 4, generator=g)}, rt.mesh)
        st.begin_step()
        # a value made on the host every step that the step is not told about
        extra = runtime.to_device([torch.tensor(float(step))], rt.device)[0] if undeclared else None

        def step_fn(batch=batch, extra=extra):  # noqa: ANN001, ANN202
            loss = torch.nn.functional.mse_loss(st.unet(batch["x"]), batch["y"])
            if extra is not None:
                loss = loss + 0.1 * extra
            loss.backward()
            st.optimizer.step()
            st.optimizer.zero_grad(set_to_none=True)
            st.ema.update()
            return [loss.detach()]

        [loss] = replay(step_fn, st.step_tensors(), [batch["x"], batch["y"]] + st.step_scalars())
        st.step += 1
        if not cut_when_needed:
            runtime.add_step_closure(lambda v: losses.append(float(v)), (loss,))
            runtime.sync()
            continue
        losses.append(loss)
        if replay.cut_needed(closures=False):
            runtime.sync()
        else:
            assert runtime.pending_count(device=rt.device) == 0  # what the skipped cut would have launched
    runtime.wait_device_ops()
    losses = [float(v) for v in losses]
    host = [t.detach().cpu().clone() for t in st.step_tensors()]
    return losses, host, replay, runtime.compile_count() - n0


@pytest.fixture(scope="module")
def rt():
    from xla_diffusion import runtime

    return runtime.init_runtime(fsdp_size=2)


def test_replayed_steps_equal_traced_steps_bit_for_bit(rt):
    traced_losses, traced, _, traced_compiles = _run(rt, enabled=False)
    losses, state, replay, compiles = _run(rt, enabled=True)
    assert replay.refused is None and replay.replayed_steps == STEPS - 2  # steps 1-2 recorded, then replayed
    assert losses == traced_losses
    assert len(state) == len(traced) == 6 + 6 * 2 + 1 + 6  # 6 params, AdamW (moments; one step count), EMA
    for a, b in zip(state, traced):
        assert torch.equal(a, b)
    # one graph each: the replayed one is compiled once (or found in the cache), never per step
    assert traced_compiles == 1 and compiles <= 1
    # the outputs of the last HELD_STEPS replayed steps stay referenced (the running step's donated inputs)
    assert [len(r) for r in replay._held] == [len(state) + 1] * HELD_STEPS


def test_replayed_steps_need_no_graph_cut(rt):
    """After a replayed step nothing is pending, so the caller skips the graph cut (a walk over every live
    tensor); the steps still equal the traced ones, and the recorded graph is the only compilation."""
    traced_losses, traced, _, _ = _run(rt, enabled=False)
    losses, state, replay, compiles = _run(rt, enabled=True, cut_when_needed=True)
    assert replay.replayed_steps == STEPS - 2 and replay.replayed_last
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)
    assert compiles <= 1


def test_replay_without_held_outputs_is_the_same_step(rt, monkeypatch):
    """HELD_STEPS = 0 (what bench/replay_overlap.py compares against): nothing held, the same results."""
    from xla_diffusion import replay as replay_module

    traced_losses, traced, _, _ = _run(rt, enabled=False)
    monkeypatch.setattr(replay_module, "HELD_STEPS", 0)
    losses, state, replay, _ = _run(rt, enabled=True)
    assert replay.replayed_steps == STEPS - 2 and replay._held == []
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


def test_an_undeclared_changing_value_falls_back_to_tracing(rt, caplog):
    traced_losses, traced, _, _ = _run(rt, enabled=False, undeclared=True)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.replay"):
        losses, state, replay, _ = _run(rt, enabled=True, undeclared=True)
    assert replay.replayed_steps == 0
    assert replay.refused == "a value the step reads changed between steps without being a declared input"
    assert [r.getMessage() for r in caplog.records] == [
        f"--step_graph replay: the step is traced every step instead: {replay.refused}"]
    # the steps still ran, each with its own value
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


def test_state_made_inside_the_step_falls_back_to_tracing(rt, caplog):
    """Unprimed AdamW creates its moments inside step 1, outside the state the step was given: replaying that
    graph would never update them, so the step is traced instead (and the results are the traced run's)."""
    traced_losses, traced, _, _ = _run(rt, enabled=False, primed=False)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.replay"):
        losses, state, replay, _ = _run(rt, enabled=True, primed=False)
    assert replay.replayed_steps == 0 and replay.recordings == 0
    assert replay.refused == "the step leaves results outside the tensors it was given as its state"
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


def test_state_the_step_leaves_unchanged_falls_back_to_tracing(rt, caplog):
    """A parameter without a gradient stays as it was: the compiled graph has no output for it (nor for its
    AdamW moments), so replay, which points each state tensor at an output, is refused and the step is traced
    (an unchanged state tensor once crashed the next graph cut: "Execution supplied 968 buffers but compiled
    program expected 542")."""
    traced_losses, traced, _, _ = _run(rt, enabled=False, frozen_bias=True)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.replay"):
        losses, state, replay, _ = _run(rt, enabled=True, frozen_bias=True)
    assert replay.replayed_steps == 0
    assert replay.refused == "the step leaves some of the tensors it was given as its state unchanged"
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)
