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

Flat state (`StateLayout`, `--step_graph replay_flat`). Handing the graph its inputs and pointing the state at
its outputs costs the host per tensor, inside torch_xla, and the state is ~4 tensors per UNet parameter tensor
(weights, two AdamW moments, EMA shadow): ~2,700 for SD2-base, ~75 ms of host CPU per step on this machine.
With a layout, the replicated state tensors live in a few flat buffers while the step is replayed (at most
`FLAT_ELEMENTS` each), and the replayed graph takes and returns those instead. The recorded step reads each
tensor as a slice of its buffer; its optimizer and EMA may update whole buffers in place (the layout's `bind`,
`state.TrainState.flat_layout`), and any other buffer's new value is gathered from its updated tensors.
Between replayed steps the per-parameter tensors hold no device memory (torch_xla placeholders):
`StepReplay.unpack()` gives them their values back before anything outside the step reads or changes them
(the trainer calls it before checkpoints, evaluation and the export); the next replayed step packs them
again. Sharded (FSDP) state tensors stay tensors of their own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from . import runtime

log = logging.getLogger(__name__)

RECORDINGS = 2  # steps recorded, and compared, before replay starts
HELD_STEPS = 2  # replayed steps whose outputs stay referenced (see _replay): how far the host may run ahead
# the largest flat state buffer, in elements (1 GiB of fp32): packing and unpacking hold one buffer and its
# tensors at once, and it keeps every index far from int32's limit
FLAT_ELEMENTS = 1 << 28
REPLICATED = ("", "{replicated}")  # sharding annotations of state tensors a flat buffer may hold


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


class StateLayout:
    """Where the step's state tensors live while it is replayed: the replicated ones of each dtype concatenated
    into flat buffers (`buffers`; 1-d, at most FLAT_ELEMENTS each), the rest (`loose`) as themselves.

    Packed (`buffers` set), the buffers hold the values and the member tensors are placeholders without device
    memory; unpacked (`buffers` None), the tensors hold them. The state list is the same tensors, in the same
    order, at every call (StepReplay checks its length)."""

    def __init__(self, members: list[list[int]], loose: list[int],
                 bind: Callable[[list[torch.Tensor]], AbstractContextManager] | None = None) -> None:
        self.members = members  # per flat buffer: positions in the state list
        self.loose = loose
        # `bind(buffers)`: a context within which the step's own code updates whole buffers in place (the
        # optimizer and EMA on flat state); a buffer the step leaves alone is gathered from its member tensors
        self.bind = bind
        self.buffers: list[torch.Tensor] | None = None
        self.compilations = 0  # of the packing and unpacking graphs (one each per buffer, then cached)

    @classmethod
    def of(cls, state: list[torch.Tensor]) -> StateLayout | None:
        """The layout of `state`: None when no two tensors can share a buffer."""
        groups: dict[torch.dtype, list[list[int]]] = {}
        sizes: dict[torch.dtype, int] = {}
        loose: list[int] = []
        for i, t in enumerate(state):
            n = t.numel()
            if n > FLAT_ELEMENTS or runtime.sharding_spec_string(t) not in REPLICATED:
                loose.append(i)
                continue
            chunks = groups.setdefault(t.dtype, [[]])
            if sizes.get(t.dtype, 0) + n > FLAT_ELEMENTS:
                chunks.append([])
                sizes[t.dtype] = 0
            chunks[-1].append(i)
            sizes[t.dtype] = sizes.get(t.dtype, 0) + n
        members = [c for chunks in groups.values() for c in chunks if len(c) > 1]
        loose += [i for chunks in groups.values() for c in chunks if len(c) == 1 for i in c]
        return cls(members, sorted(loose)) if members else None

    @property
    def packed(self) -> bool:
        return self.buffers is not None

    def graph_state(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the recorded graph takes and returns as its state: the buffers, then the loose tensors."""
        assert self.buffers is not None
        return self.buffers + [state[i] for i in self.loose]

    def pack(self, state: list[torch.Tensor]) -> None:
        """Concatenate the member tensors into their buffers (on the devices, buffer by buffer), then free them."""
        if self.buffers is not None:
            return
        c0 = runtime.compile_count()
        buffers = []
        for members in self.members:
            buffer = torch.cat([state[i].detach().reshape(-1) for i in members])
            runtime.mark_replicated(buffer)
            runtime.materialise([buffer])
            for i in members:
                runtime.release_buffer(state[i])
            buffers.append(buffer)
        self.compilations += runtime.compile_count() - c0
        self.buffers = buffers

    def open(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """Before tracing the step: each member tensor becomes a (pending) slice of its buffer, so the traced graph
        reads the buffers. Returns the buffers; the layout counts as unpacked from here (the tensors hold the
        values, pending) until `close`."""
        buffers, self.buffers = self.buffers, None
        assert buffers is not None
        for members, buffer in zip(self.members, buffers):
            _assign([state[i] for i in members], buffer)
        return buffers

    def bound(self, buffers: list[torch.Tensor]) -> AbstractContextManager:
        return self.bind(buffers) if self.bind is not None else contextlib.nullcontext()

    def results(self, state: list[torch.Tensor], buffers: list[torch.Tensor], before: list[object]
                ) -> tuple[list[torch.Tensor], bool]:
        """After tracing the step: the new value of each buffer (the buffer itself when the step updated it in
        place, else the concatenation of its members), and whether a member so gathered was left as it was
        (`before`: the members' `runtime.value_ids` after `open`, in order)."""
        new: list[torch.Tensor] = []
        unchanged = False
        offset = 0
        for members, buffer in zip(self.members, buffers):
            tensors = [state[i] for i in members]
            if runtime.pending_count([buffer]) == 1:
                new.append(buffer)
            else:
                after = runtime.value_ids(tensors)
                unchanged |= any(a == b for a, b in zip(before[offset:offset + len(members)], after))
                with torch.no_grad():
                    new.append(torch.cat([t.reshape(-1) for t in tensors]))
            offset += len(members)
        for b in new:
            # as the packed buffers are: GSPMD would otherwise pick the output's sharding, from the members'
            # gradients say, and the next recording would read a differently sharded buffer
            runtime.mark_replicated(b)
        return new, unchanged

    def unpack(self, state: list[torch.Tensor]) -> None:
        """Give the member tensors their values from the buffers (launched, not waited for), then drop the buffers."""
        if self.buffers is None:
            return
        c0 = runtime.compile_count()
        buffers, self.buffers = self.buffers, None
        for members in self.members:
            buffer = buffers.pop(0)  # unreferenced here once its slices are taken (as `pack` frees the tensors)
            tensors = [state[i] for i in members]
            _assign(tensors, buffer)
            runtime.materialise(tensors)
        self.compilations += runtime.compile_count() - c0


def _assign(tensors: list[torch.Tensor], buffer: torch.Tensor) -> None:
    """Point each of `tensors` at its slice of the flat `buffer` (in order), as a pending value of its own: a
    clone, not a view, so an in-place update of the tensor leaves the buffer as it is."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            value = buffer[offset:offset + n].view(t.shape).clone()
            if isinstance(t, torch.nn.Parameter):
                t.data = value
            else:
                runtime.repoint_all([t], [value])
            offset += n


class StepReplay:
    """`replay(fn, state, inputs)` returns what `fn()` returns (a list of tensors), computed through the
    recorded graph once the step has been recorded.

    - `fn()` traces one step: it updates `state` in place and reads the step's changing values only through
      `state` and `inputs`.
    - `state`: the tensors the step updates in place, the same tensors in the same order on every call.
    - `inputs`: the tensors holding this step's read-only values (batch, device scalars), with the same shapes,
      dtypes and shardings on every call.

    With `enabled=False` it only calls `fn()`. The caller cuts the graph after a step when `cut_needed` says so
    (`runtime.sync`): that runs its step closures, and launches the traced step while not replaying. With `flat`
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
            for i, t in enumerate(graph_state + inputs):
                source = ("state", i) if i < len(graph_state) else ("input", i - len(graph_state))
                handle = _buffer_handle(t)
                if handle in keys and source[0] == "state":
                    raise NotReplayable("two tensors the step updates share one device buffer")
                keys.setdefault(handle, source)
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
            roots = new + loose + outputs
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
            rec = _Recording(b"", sources, const_handles, self._signature(inputs), len(graph_state), len(inputs))
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
        if first is None:
            self.recording = rec
            self._is_param = [isinstance(t, torch.nn.Parameter) for t in targets]
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
        self._adopt(state, results[:n])
        # Hold the outputs of the last steps: releasing the last reference to a buffer that was donated to a
        # graph still running waits for that graph, so re-pointing the state at step n's outputs would drop
        # step n-1's (the running step's inputs) and block the host until the devices were done, every step.
        self._held.append(results)
        del self._held[: len(self._held) - HELD_STEPS]  # (not [:-HELD_STEPS]: with 0 that would keep them all)
        self.replayed_steps += 1
        self.replayed_last = True
        return list(results[n:])
