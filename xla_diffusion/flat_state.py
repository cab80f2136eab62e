"""The training state in a few flat buffers while the step is replayed (`--step_graph replay_flat`).

Handing the replayed graph its inputs and pointing the state at its outputs costs the host per tensor, inside
torch_xla, and the state is ~4 tensors per UNet parameter tensor (weights, two AdamW moments, EMA shadow):
~2,700 for SD2-base, ~70 ms of host CPU per step on this machine. With a layout, the replicated state tensors
live in a few flat buffers while the step is replayed (at most `FLAT_ELEMENTS` each), and the replayed graph
takes and returns those instead. The recorded step reads each tensor as a slice of its buffer; its optimizer and
EMA may update whole buffers in place (the layout's `bind`, `state.TrainState.flat_layout`), and any other
buffer's new value is gathered from its updated tensors. Between replayed steps the per-parameter tensors hold
no device memory (torch_xla placeholders): `StepReplay.unpack()` gives them their values back before anything
outside the step reads or changes them (the trainer calls it before checkpoints, evaluation and the export); the
next replayed step packs them again. Sharded (FSDP) state tensors stay tensors of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from . import runtime

# the largest flat state buffer, in elements (1 GiB of fp32): packing and unpacking hold one buffer and its
# tensors at once, and it keeps every index far from int32's limit
FLAT_ELEMENTS = 1 << 28
REPLICATED = ("", "{replicated}")  # sharding annotations of state tensors a flat buffer may hold


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
