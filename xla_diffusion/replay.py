"""Run the training step's compiled graph again without tracing it again (`--step_graph replay`, the default).

torch_xla's lazy tensors record every op of a step in Python each step, then hash the recorded graph to find
its compiled executable. For the tiny UNet's step that recording costs ~0.1-0.3 s of host CPU per step on
this machine, most of it in the per-tensor AdamW and EMA updates, and it is the same every step.
`StepReplay` records the step, compiles it once, and from then on hands the executable the step's new inputs
directly (`torch_xla._XLAC._run_cached_graph`, the entry point torch_xla's dynamo bridge uses for the same
purpose), then points the state tensors at the outputs. It runs the graph the lazy path compiles: the same
ops and shardings, with the updated state's input buffers donated to the outputs, as the lazy path's graph
cut donates them.

What may change between steps is exactly what the caller declares: the `state` tensors the step updates in
place (parameters, optimizer moments and step counts, EMA shadows) and the read-only `inputs` (the batch and
the device lr / EMA-decay scalars). Everything else the graph reads (frozen weights, constants, scalars torch_xla
turned into device data) is fixed at the first recording. To check that nothing else varies, the step is
recorded twice; replay starts only when both recordings give the same graph reading the same fixed buffers.
Otherwise, or when the graph draws device random numbers, the step stays lazily traced for the rest of the
run, with one warning line saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import runtime

log = logging.getLogger(__name__)

RECORDINGS = 2  # steps recorded, and compared, before replay starts
HELD_STEPS = 2  # replayed steps whose outputs stay referenced (see _replay): how far the host may run ahead


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
    (`runtime.sync`): that runs its step closures, and launches the traced step while not replaying.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
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

    def cut_needed(self, closures: bool) -> bool:
        """Whether the caller must cut the graph after the step just called: always after a traced or recorded
        step (the cut launches it), and after a replayed one only when step closures wait for a cut.

        A replayed step launched its compiled graph itself and leaves nothing pending, so a cut would only walk
        every live device tensor: with the state and the held outputs that is ~10k tensors for SD2-base's UNet,
        29-37 ms of host CPU per step in two runs of bench/host_overhead.py. The caller still cuts after work
        of its own outside the step (evaluation, checkpoints)."""
        return closures or not self.replayed_last

    def __call__(self, fn: Callable[[], Sequence[torch.Tensor]], state: Sequence[torch.Tensor],
                 inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.replayed_last = False
        if not self.enabled or self.refused is not None:
            return list(fn())
        if self.replaying:
            state, inputs = list(state), list(inputs)
            if len(state) == len(self._is_param) and self._signature(inputs) == self.recording.signature:
                return self._replay(state, inputs)
            self._refuse("the step's state or inputs changed number, shape, dtype or sharding")
            return list(fn())
        return self._record(fn, list(state), list(inputs))

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self._held.clear()  # traced steps from here on: older outputs would only pin memory
        log.warning("--step_graph replay: the step is traced every step instead: %s", reason)

    @staticmethod
    def _signature(inputs: list[torch.Tensor]) -> list[tuple]:
        return [(tuple(t.shape), t.dtype, runtime.sharding_spec_string(t)) for t in inputs]

    def _record(self, fn: Callable[[], Sequence[torch.Tensor]], state: list[torch.Tensor],
                inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Trace `fn()`; compile its graph, rooted at `state` + outputs with the state's buffers donated, and run
        it through the cache. Whatever makes replay unsafe leaves the traced step to the caller's graph cut."""
        outputs: list[torch.Tensor] | None = None
        try:
            runtime.materialise(state + inputs)
            runtime.wait_device_ops()  # no buffer is in flight: their handles are read below
            keys: dict[int, tuple[str, int]] = {}
            for i, t in enumerate(state + inputs):
                source = ("state", i) if i < len(state) else ("input", i - len(state))
                handle = _buffer_handle(t)
                if handle in keys and source[0] == "state":
                    raise NotReplayable("two tensors the step updates share one device buffer")
                keys.setdefault(handle, source)
            outputs = list(fn())
            roots = state + outputs
            # the compiled graph returns only the roots it computes: a state tensor the step leaves as it was (a
            # parameter without a gradient, say) has no output to be pointed at, and the results would pair up
            # with the wrong tensors
            if runtime.pending_count(state) < len(state):
                raise NotReplayable("the step leaves some of the tensors it was given as its state unchanged")
            # a result the step leaves outside `state` + outputs (AdamW creating its state inside an unprimed
            # first step, say) would never be updated by a replay (and `_clear_pending_irs` below would drop it)
            if runtime.pending_count(device=state[0].device) > runtime.pending_count(roots):
                raise NotReplayable("the step leaves results outside the tensors it was given as its state")
            ids, values = runtime.graph_inputs(roots)
            if runtime.device_seed_id() in ids:
                raise NotReplayable("the step draws random numbers on the device")
            handles = runtime.buffer_handles(values)
            sources = [keys.get(h, ("const", v)) for h, v in zip(handles, values)]
            const_handles = [h for h, (kind, _) in zip(handles, sources) if kind == "const"]
            rec = _Recording(b"", sources, const_handles, self._signature(inputs), len(state), len(inputs))
            first = self.recording
            if first is not None and ([k for k, _ in first.sources] != [k for k, _ in sources]
                                      or first.const_handles != const_handles):
                raise NotReplayable("a value the step reads changed between steps without being a declared input")
        except NotReplayable as e:
            self._refuse(str(e))
            return outputs if outputs is not None else list(fn())
        for (kind, _), value in zip(sources, values):
            if kind == "state":
                runtime.donate(value)
        rec.graph_hash = runtime.compile_graph(roots)
        if first is not None and rec.graph_hash != first.graph_hash:
            self._refuse("two recordings of the step gave different graphs")
        if first is None:
            self.recording = rec
            self._is_param = [isinstance(t, torch.nn.Parameter) for t in state]
        self.recordings += 1
        results = runtime.run_compiled(rec.graph_hash, values)
        self._adopt(roots, results)
        # Turn tensors that reference a buffer through a pending device-data node into plain buffer handles
        # (nothing else is pending: checked above).
        runtime.drop_pending(state[0].device)
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
        # a tensor changed outside the step (a checkpoint restored in place, say) holds pending work
        runtime.materialise(state + inputs)
        # No donation flags here: they only shape the compiled graph (its input/output aliasing, set when it was
        # recorded); PJRT donates the aliased state buffers on every run of that executable, flagged or not.
        results = runtime.run_compiled(rec.graph_hash, rec.arguments(state, inputs))
        n = len(state)
        self._adopt(state, results[:n])
        # Hold the outputs of the last steps: releasing the last reference to a buffer that was donated to a
        # graph still running waits for that graph, so re-pointing the state at step n's outputs would drop
        # step n-1's (the running step's inputs) and block the host until the devices were done, every step.
        self._held.append(results)
        del self._held[: len(self._held) - HELD_STEPS]  # (not [:-HELD_STEPS]: with 0 that would keep them all)
        self.replayed_steps += 1
        self.replayed_last = True
        return list(results[n:])
