"""--step_graph replay and replay_flat (replay.StepReplay) on the 4-device mesh: a replayed step is the traced
step (same losses, weights, AdamW state and EMA, bit for bit, with the lr and EMA decay changing every step), it
compiles nothing more, and a step that reads a changing value it was not given falls back to tracing instead
of replaying a stale one. With flat state the packed tensors hold no memory between replayed steps and get
their values back from `unpack`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import with_xla_flags
from xla_diffusion.hlo import hlo_dump_flags
from xla_diffusion.replay import HELD_STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _state(rt, shard_weights: bool = False):  # noqa: ANN001, ANN202
    """`shard_weights`: the two Linear weights (128 and 256 elements) are sharded over the fsdp axis, the biases
    and the norm's (at most 32) are not; by default all are too small to be, and all of the state is
    replicated."""
    from xla_diffusion import sharding
    from xla_diffusion.config import TrainConfig
    from xla_diffusion.state import TrainState

    torch.manual_seed(0)
    net = Net()
    sharding.fsdp_shard(net, rt.mesh, min_shard_numel=100 if shard_weights else sharding.DEFAULT_MIN_SHARD_NUMEL)
    cfg = TrainConfig(pretrained_model_name_or_path="-", train_data_dir="-", max_train_steps=STEPS, use_ema=True,
                      learning_rate=1e-2, lr_scheduler="cosine", lr_warmup_steps=2, ema_decay=0.99)
    return TrainState.create(net, cfg)


def _run(rt, enabled: bool, undeclared: bool = False, primed: bool = True, frozen_bias: bool = False,  # noqa: ANN001, ANN202
         cut_when_needed: bool = False, flat: bool = False, shard_weights: bool = False, check_packed: bool = False,
         gathered: bool = False):
    """STEPS optimizer steps through StepReplay; returns (losses, final state on the host, replay, compilations).
    `primed=False` leaves AdamW's state to be created inside the first step; `frozen_bias` gives the output
    layer's bias no gradient, so the step leaves it (and its AdamW moments) unchanged. The graph is cut after
    every step, or with `cut_when_needed` only when `replay.cut_needed` says so, checking that nothing is left
    pending when it does not; a step closure reads each loss (after a replayed step without a cut).
    `flat`: StepReplay's flat state (--step_graph replay_flat), in TrainState's layout (AdamW and the EMA
    update whole buffers) or with `gathered` in the generic one (each buffer gathered from its updated
    tensors); `check_packed`: after each replayed step, check that the packed state tensors hold no device
    memory and the loose ones do."""
    from xla_diffusion import runtime
    from xla_diffusion.replay import StepReplay

    st = _state(rt, shard_weights)
    if not primed:
        st.optimizer.state.clear()
    if frozen_bias:
        st.unet.out.bias.requires_grad_(False)
    replay = StepReplay(enabled, flat=flat, layout=None if gathered else st.flat_layout)
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
        if check_packed and replay.replaying:
            tensors = st.step_tensors()
            members = {i for m in replay.layout.members for i in m}
            assert [runtime.is_placeholder(t) for t in tensors] == [i in members for i in range(len(tensors))]
        runtime.add_step_closure(lambda v: losses.append(float(v)), (loss,))
        if not cut_when_needed or replay.cut_needed():
            runtime.sync()  # launches a traced step, then runs the closure
        else:
            assert runtime.pending_count(device=rt.device) == 0  # what the skipped cut would have launched
            runtime.run_step_closures()
    # what the last replayed steps hold (unpack releases it: the held outputs reference the flat buffers)
    replay.held_lengths = [len(r) for r in replay._held]
    replay.unpack()  # the state tensors get their values back from the flat buffers
    runtime.wait_device_ops()
    losses = [float(v) for v in losses]
    host = [t.detach().cpu().clone() for t in st.step_tensors()]
    return losses, host, replay, runtime.compile_count() - n0 - replay.layout_compilations


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
    assert replay.layout is None and replay.layout_compilations == 0
    # the outputs of the last HELD_STEPS replayed steps stay referenced (the running step's donated inputs)
    assert replay.held_lengths == [len(state) + 1] * HELD_STEPS


def test_flat_state_replay_equals_traced_steps_bit_for_bit(rt):
    """--step_graph replay_flat: AdamW and the EMA update four flat buffers whole instead of 24 tensors, and
    the replayed graph takes and returns those and the step count; losses and state are still the traced
    run's, bit for bit."""
    traced_losses, traced, _, _ = _run(rt, enabled=False)
    losses, state, replay, compiles = _run(rt, enabled=True, flat=True)
    assert replay.refused is None and replay.replayed_steps == STEPS - 2
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)
    assert compiles <= 1
    # the state is replicated: four flat buffers (weights, exp_avg, exp_avg_sq, EMA shadows, each the 6 tensors
    # in parameter order) and the step count are the graph's state inputs and outputs (step_tensors' order:
    # the parameters, then each one's exp_avg and exp_avg_sq, the shared step count after the first's, then
    # the EMA shadows); the packing and unpacking graphs compiled once each
    exp_avg = [6] + list(range(9, 19, 2))
    assert replay.layout.members == [list(range(6)), exp_avg, [i + 1 for i in exp_avg], list(range(19, 25))]
    assert replay.layout.loose == [8]
    assert replay.layout_compilations == 2
    assert replay.held_lengths == [4 + 1 + 1] * HELD_STEPS and replay._held == []  # released by unpack


def test_generic_flat_layout_gathers_the_updated_tensors(rt):
    """Without the optimizer's and EMA's flat update (StateLayout.of: the layout for any caller), the step
    updates the tensors, sliced from the buffers, and their concatenation is the buffer's new value: all of the
    replicated fp32 state in one buffer."""
    traced_losses, traced, _, _ = _run(rt, enabled=False)
    losses, state, replay, compiles = _run(rt, enabled=True, flat=True, gathered=True, check_packed=True)
    assert replay.replayed_steps == STEPS - 2 and compiles <= 1
    assert replay.layout.members == [list(range(len(state)))] and replay.layout.loose == []
    assert replay.held_lengths == [1 + 1] * HELD_STEPS
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


def test_packed_state_tensors_hold_no_memory_while_replaying(rt):
    """Between replayed steps the flat buffer holds the state: the tensors it packs are placeholders without
    device memory (checked after every replayed step) until `unpack` gives them their values back."""
    traced_losses, traced, _, _ = _run(rt, enabled=False)
    losses, state, replay, _ = _run(rt, enabled=True, cut_when_needed=True, flat=True, check_packed=True)
    assert replay.replayed_steps == STEPS - 2 and not replay.layout.packed
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


def test_sharded_state_stays_per_tensor_beside_the_flat_buffer(rt):
    """With the weights sharded over fsdp, those tensors (and their moments and EMA shadows) stay graph inputs of
    their own; the replicated rest (biases, norms, the step count) share the flat buffer. Still the traced step."""
    traced_losses, traced, _, _ = _run(rt, enabled=False, shard_weights=True)
    losses, state, replay, compiles = _run(rt, enabled=True, flat=True, shard_weights=True, check_packed=True)
    assert replay.replayed_steps == STEPS - 2 and compiles <= 1
    loose, members = replay.layout.loose, [i for m in replay.layout.members for i in m]
    assert len(loose) > 0 and len(members) > 1 and sorted(loose + members) == list(range(len(state)))
    assert replay.held_lengths == [len(replay.layout.members) + len(loose) + 1] * HELD_STEPS
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


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


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_an_undeclared_changing_value_falls_back_to_tracing(rt, caplog, flat):
    traced_losses, traced, _, _ = _run(rt, enabled=False, undeclared=True)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.replay"):
        losses, state, replay, _ = _run(rt, enabled=True, undeclared=True, flat=flat)
    assert replay.replayed_steps == 0
    assert replay.refused == "a value the step reads changed between steps without being a declared input"
    assert [r.getMessage() for r in caplog.records] == [
        f"--step_graph replay: the step is traced every step instead: {replay.refused}"]
    # the steps still ran, each with its own value
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_state_made_inside_the_step_falls_back_to_tracing(rt, caplog, flat):
    """Unprimed AdamW creates its moments inside step 1, outside the state the step was given: replaying that
    graph would never update them, so the step is traced instead (and the results are the traced run's)."""
    traced_losses, traced, _, _ = _run(rt, enabled=False, primed=False)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.replay"):
        losses, state, replay, _ = _run(rt, enabled=True, primed=False, flat=flat)
    assert replay.replayed_steps == 0 and replay.recordings == 0
    assert replay.refused == "the step leaves results outside the tensors it was given as its state"
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_state_the_step_leaves_unchanged_falls_back_to_tracing(rt, caplog, flat):
    """A parameter without a gradient stays as it was: the compiled graph has no output for it (nor for its
    AdamW moments), so replay, which points each state tensor at an output, is refused and the step is traced
    (an unchanged state tensor once crashed the next graph cut: "Execution supplied 968 buffers but compiled
    program expected 542")."""
    traced_losses, traced, _, _ = _run(rt, enabled=False, frozen_bias=True)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.replay"):
        losses, state, replay, _ = _run(rt, enabled=True, frozen_bias=True, flat=flat)
    assert replay.replayed_steps == 0
    assert replay.refused == "the step leaves some of the tensors it was given as its state unchanged"
    assert losses == traced_losses
    for a, b in zip(state, traced):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["per_tensor", "flat"])
def test_each_state_buffer_goes_to_its_own_new_value(layout, tmp_path):
    """In the compiled step graph, the memory of each state input (weights, AdamW moments, EMA shadows, step
    count; or their flat buffers) is reused by that input's own new value. XLA pairs donated inputs with outputs
    of equal size in order, not by data flow; the recording orders its outputs so the pairs are right
    (`donation.donation_order`). Paired wrongly, as when exp_avg's buffer went to exp_avg_sq's new value, XLA
    copies both every step."""
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": with_xla_flags(hlo_dump_flags(str(tmp_path)))}
    proc = subprocess.run([sys.executable, "-m", "tests.replay_alias_worker", layout, str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    own = {int(k): v for k, v in result["own"].items()}
    aliases = {int(k): v for k, v in result["aliases"].items()}
    assert len(own) == result["n_state"] == (5 if layout == "flat" else 25)
    assert aliases == own, result
