"""Run the training step's compiled graph again without tracing it again (`--step_graph replay_flat`, the default, and
`replay`).

torch_xla's lazy tensors record every op of a step in Python each step, then hash the recorded graph to find
its compiled executable. For the tiny UNet's step that recording costs ~0.1-0.3 s of host CPU per step on
this machine, most of it in the per-tensor AdamW and EMA updates, and it is the same every step.
`StepReplay` records the step, compiles it once, and from then on hands the executable the step's new inputs
directly (`torch_xla._XLAC._run_cached_graph`, as torch_xla's dynamo bridge does), then points the state
tensors at the outputs. It runs the graph the lazy path compiles (same ops, shardings and buffer donation).

What may change between steps is exactly what the caller declares: the `state` tensors the step updates in place
(parameters, AdamW state, EMA shadows) and the read-only `inputs` (batch, device scalars such as the lr). Everything
else the graph reads (frozen weights, constants, scalars torch_xla turned into device data) is fixed at the
first recording. To check that nothing else varies, the step is recorded twice; replay starts only when both
recordings give the same graph reading the same fixed buffers. Otherwise, or when the graph draws device random
numbers, the step stays lazily traced for the rest of the run, with one warning line saying why.

Flat state (`--step_graph replay_flat`): `flat_state.StateLayout`, which `StepReplay` packs and unpacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import runtime
from .donation import donation_order
from .flat_state import StateLayout

log = logging.getLogger(__name__)

RECORDINGS = 2  # steps recorded, and compared, before replay starts
HELD_STEPS = 2  # replayed steps whose outputs stay referenced (see _replay): how far the host may run ahead
# whether the recorded graph returns the state in `donation_order` (False: as the state list has it, as until
# stop 28; bench/donation.py compares the two)
ORDER_FOR_DONATION = True


class NotReplayable(Exception):
    """The step cannot be replayed safely; the message says why."""


def _buffer_handle(t: torch.Tensor) -> int:
    """Handle of the device buffer a graph reading `t` takes as its input (for a tensor whose value is a
    pending reference to another buffer, that buffer)."""
    _, values = runtime.graph_inputs([t])
    if len(values) != 1:
        raise NotReplayable("an input of the step holds a pending computation")
    return runtime.buffer_handles(values)[0]


@dataclass
class _Recording:
    graph_hash: bytes
    # per graph parameter, in the graph's order: ("state", i), ("input", j) or ("const", tensor)
    sources: list[tuple[str, object]]
    const_handles: list[int]
    signature: list[tuple]  # shape, dtype and sharding of each input, checked before every replay
    n_state: int
    n_inputs: int
    order: list[int]  # the state's positions in the graph's outputs (`donation_order`)
    # where each graph parameter comes from in `state + inputs + consts`, worked out once (this is per-tensor host
    # work on every replayed step)
    index: list[int] = field(default_factory=list)
    consts: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        offset = {"state": 0, "input": self.n_state}
        for kind, ref in self.sources:
            if kind == "const":
                self.index.append(self.n_state + self.n_inputs + len(self.consts))
                self.consts.append(ref)
            else:
                self.index.append(offset[kind] + ref)

    def arguments(self, state: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The graph's parameters, in order, for this step's `state` and `inputs`."""
        pool = state + inputs + self.consts
        return [pool[i] for i in self.index]


class StepReplay:
    """`replay(fn, state, inputs)` returns what `fn()` returns (a list of tensors), computed through the
    recorded graph once the step has been recorded.

    - `fn()` traces one step: it updates `state` in place and reads the step's changing values only through
      `state` and `inputs`.
    - `state`: the tensors the step updates in place, the same tensors in the same order on every call.
    - `inputs`: the tensors holding this step's read-only values (batch, device scalars), with the same shapes,
      dtypes and shardings on every call.

    With `enabled=False` it only calls `fn()`. The caller cuts the graph after a step when `cut_needed` says so
    (`runtime.sync`): that launches the traced step while not replaying, and runs its step closures (after a
    replayed step, `runtime.run_step_closures` runs them). With `flat`
    the replicated state is packed into flat buffers from the first recording on (`StateLayout`; `layout(state)`
    makes it, by default `StateLayout.of`); the caller then calls `unpack()` before anything else reads or
    changes the state tensors.
    """

    def __init__(self, enabled: bool = True, flat: bool = False,
                 layout: Callable[[list[torch.Tensor]], StateLayout | None] | None = None) -> None:
        self.enabled = enabled
        self.flat = flat
        self.make_layout = layout or StateLayout.of  # the state's flat layout, made at the first recording
        self.layout: StateLayout | None = None
        self._state: list[torch.Tensor] = []  # the state list of the last call (what `unpack` fills)
        self._n_state = 0
        self.recording: _Recording | None = None
        self.recordings = 0
        self.replayed_steps = 0
        self.refused: str | None = None
        # True when the last call ran the recorded graph: nothing of the step is pending, so the caller's graph
        # cut has nothing to launch (see `cut_needed`)
        self.replayed_last = False
        self._is_param: list[bool] = []
        self._held: list[list[torch.Tensor]] = []

    @property
    def replaying(self) -> bool:
        return self.enabled and self.refused is None and self.recordings >= RECORDINGS

    @property
    def layout_compilations(self) -> int:
        """Graphs compiled to pack and unpack the flat state (not the step's)."""
        return self.layout.compilations if self.layout is not None else 0

    def unpack(self) -> None:
        """Give every state tensor its value again (their flat buffers are dropped): call before anything outside
        the step reads or changes the state. A no-op when nothing is packed; the next replayed step packs again."""
        if self.layout is not None and self.layout.packed:
            self._held.clear()  # they reference the buffers: no step runs before the next pack anyway
            self.layout.unpack(self._state)

    def cut_needed(self) -> bool:
        """Whether the caller must cut the graph after the step just called: after a traced or recorded step (the
        cut launches it), not after a replayed one.

        A replayed step launched its compiled graph itself and leaves nothing pending, so a cut would only walk
        every live device tensor: with the state and the held outputs that is ~10k tensors for SD2-base's UNet,
        29-37 ms of host CPU per step in two runs of bench/host_overhead.py. Its step closures (metrics) run
        without a cut (`runtime.run_step_closures`). The caller still cuts after work of its own outside the step
        (evaluation, checkpoints)."""
        return not self.replayed_last

    def __call__(self, fn: Callable[[], Sequence[torch.Tensor]], state: Sequence[torch.Tensor],
                 inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.replayed_last = False
        if not self.enabled or self.refused is not None:
            return list(fn())
        if self.replaying:
            state, inputs = list(state), list(inputs)
            if len(state) == self._n_state and self._signature(inputs) == self.recording.signature:
                self._state = state
                return self._replay(state, inputs)
            self._refuse("the step's state or inputs changed number, shape, dtype or sharding")
            return list(fn())
        self._state = list(state)
        return self._record(fn, self._state, list(inputs))

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self.unpack()  # traced steps from here on read the state tensors themselves
        self._held.clear()  # older outputs would only pin memory
        log.warning("--step_graph replay: the step is traced every step instead: %s", reason)

    @staticmethod
    def _signature(inputs: list[torch.Tensor]) -> list[tuple]:
        return [(tuple(t.shape), t.dtype, runtime.sharding_spec_string(t)) for t in inputs]

    def _record(self, fn: Callable[[], Sequence[torch.Tensor]], state: list[torch.Tensor],
                inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Trace `fn()`; compile its graph, rooted at `state` + outputs with the state's buffers donated, and run
        it through the cache. Whatever makes replay unsafe leaves the traced step to the caller's graph cut."""
        outputs: list[torch.Tensor] | None = None
        if self.flat and self.recordings == 0:
            self.layout = self.make_layout(state)
        layout = self.layout
        members: list[torch.Tensor] = []  # the state tensors in flat buffers
        new: list[torch.Tensor] = []  # the buffers' new values
        try:
            if layout is not None:
                layout.pack(state)
                members = [state[i] for m in layout.members for i in m]
            # the graph's state: the flat buffers and the loose tensors, or every state tensor
            graph_state = layout.graph_state(state) if layout is not None else state
            runtime.materialise(graph_state + inputs)
            runtime.wait_device_ops()  # no buffer is in flight: their handles are read below
            keys: dict[int, tuple[str, int]] = {}
            state_handles: list[int] = []
            for i, t in enumerate(graph_state + inputs):
                source = ("state", i) if i < len(graph_state) else ("input", i - len(graph_state))
                handle = _buffer_handle(t)
                if handle in keys and source[0] == "state":
                    raise NotReplayable("two tensors the step updates share one device buffer")
                keys.setdefault(handle, source)
                if source[0] == "state":
                    state_handles.append(handle)
            unchanged = False
            if layout is not None:
                buffers = layout.open(state)  # the members read their slices of the buffers from here on
                before = runtime.value_ids(members)
                with layout.bound(buffers):
                    outputs = list(fn())
                new, unchanged = layout.results(state, buffers, before)
            else:
                outputs = list(fn())
            # the compiled graph returns only the roots it computes: a state tensor the step leaves as it was (a
            # parameter without a gradient, say) has no output to be pointed at, and the results would pair up
            # with the wrong tensors (a member left as it was would be written back as a stale slice)
            loose = [state[i] for i in layout.loose] if layout is not None else state
            if runtime.pending_count(loose) < len(loose) or unchanged:
                raise NotReplayable("the step leaves some of the tensors it was given as its state unchanged")
            state_results = new + loose  # the new values of graph_state, in its order
            order = (donation_order(state_results, outputs, state_handles) if ORDER_FOR_DONATION
                     else list(range(len(state_results))))
            roots = [state_results[k] for k in order] + outputs
            # a result the step leaves outside `state` + outputs (AdamW creating its state inside an unprimed
            # first step, say) would never be updated by a replay (and `_clear_pending_irs` below would drop it);
            # the members are pending too, their new values gathered into the roots
            if runtime.pending_count(device=state[0].device) > runtime.pending_count(roots) + len(members):
                raise NotReplayable("the step leaves results outside the tensors it was given as its state")
            ids, values = runtime.graph_inputs(roots)
            if runtime.device_seed_id() in ids:
                raise NotReplayable("the step draws random numbers on the device")
            handles = runtime.buffer_handles(values)
            sources = [keys.get(h, ("const", v)) for h, v in zip(handles, values)]
            const_handles = [h for h, (kind, _) in zip(handles, sources) if kind == "const"]
            rec = _Recording(b"", sources, const_handles, self._signature(inputs), len(graph_state), len(inputs),
                             order)
            first = self.recording
            if first is not None and ([k for k, _ in first.sources] != [k for k, _ in sources]
                                      or first.const_handles != const_handles):
                raise NotReplayable("a value the step reads changed between steps without being a declared input")
        except NotReplayable as e:
            if layout is not None and new:
                # the traced step's results are the buffers' new values (pending): `_refuse` unpacks them
                layout.buffers = new
            self._refuse(str(e))
            return outputs if outputs is not None else list(fn())
        for (kind, _), value in zip(sources, values):
            if kind == "state":
                runtime.donate(value)
        rec.graph_hash = runtime.compile_graph(roots)
        if first is not None and rec.graph_hash != first.graph_hash:
            self._refuse("two recordings of the step gave different graphs")
        targets = (buffers if layout is not None else []) + loose  # what the graph's state outputs update
        targets = [targets[k] for k in order]  # in the order of the graph's outputs
        self._is_param = [isinstance(t, torch.nn.Parameter) for t in targets]
        if first is None:
            self.recording = rec
            self._n_state = len(state)
        self.recordings += 1
        results = runtime.run_compiled(rec.graph_hash, values)
        self._adopt(targets + outputs, results)
        if layout is not None:
            layout.buffers = buffers  # packed again: the buffers hold the step's results
        # Turn tensors that reference a buffer through a pending device-data node into plain buffer handles, and
        # the members' pending values into placeholders without memory (nothing else is pending: checked above).
        runtime.drop_pending(state[0].device)
        if self.refused is not None:
            self.unpack()  # the two recordings differed: the traced steps from here on read the tensors
        return outputs

    def _adopt(self, roots: list[torch.Tensor], results: list[torch.Tensor]) -> None:
        """Point each root at its result. A Parameter by `.data =`: torch_xla's `_replace_xla_tensor` (set_,
        several times cheaper, used for the rest) leaves what a Parameter's `detach()` reads at the old value."""
        is_param = self._is_param
        others: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for i, (t, r) in enumerate(zip(roots, results)):
            if is_param[i] if i < len(is_param) else isinstance(t, torch.nn.Parameter):
                t.data = r
            else:
                others.append(t)
                values.append(r)
        runtime.repoint_all(others, values)

    def _replay(self, state: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        rec = self.recording
        layout = self.layout
        if layout is not None:
            layout.pack(state)  # after `unpack` (a checkpoint, an evaluation); nothing to do otherwise
            state = layout.graph_state(state)
        # a tensor changed outside the step (a checkpoint restored in place, say) holds pending work
        runtime.materialise(state + inputs)
        # No donation flags here: they only shape the compiled graph (its input/output aliasing, set when it was
        # recorded); PJRT donates the aliased state buffers on every run of that executable, flagged or not.
        results = runtime.run_compiled(rec.graph_hash, rec.arguments(state, inputs))
        n = len(state)
        self._adopt([state[k] for k in rec.order], results[:n])
        # Hold the outputs of the last steps: releasing the last reference to a buffer that was donated to a
        # graph still running waits for that graph, so re-pointing the state at step n's outputs would drop
        # step n-1's (the running step's inputs) and block the host until the devices were done, every step.
        self._held.append(results)
        del self._held[: len(self._held) - HELD_STEPS]  # (not [:-HELD_STEPS]: with 0 that would keep them all)
        self.replayed_steps += 1
        self.replayed_last = True
        return list(results[n:])
