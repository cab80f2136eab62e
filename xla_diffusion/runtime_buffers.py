"""Device buffers below the trainer's tensors, with runtime.py in the layer that imports torch_xla: placing a
host tensor with a given sharding annotation as plain device data (no graph traced or compiled for it), and the
cached-graph entry points that replay a compiled step (replay.StepReplay, flat_state.StateLayout): the buffers a
pending graph reads, compiling it without running it, launching it on new inputs, donating, releasing and
re-pointing buffers. Tensors are XLA tensors; "handles" identify device buffers. These are the entry points
torch_xla's dynamo bridge uses.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .runtime import sharding_spec_string


def _op_sharding(spec: str) -> object | None:
    """The torch_xla OpSharding of an HLO sharding annotation as `sharding_spec_string` prints it:
    '' (none) → None, '{replicated}', '{devices=[4,1]0,1,2,3}' (tiled) and
    '{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}' (tiled over some mesh axes, replicated over the
    rest). ValueError for other forms (maximal, manual, iota device lists)."""
    import torch_xla

    if not spec:
        return None
    if spec == "{replicated}":
        return torch_xla._XLAC.OpSharding([], [], [], 0)
    m = re.fullmatch(r"\{devices=\[([\d,]+)\]([\d,]+)( last_tile_dim_replicate)?\}", spec)
    if m is None:
        raise ValueError(f"unsupported sharding annotation {spec!r}")
    dims = [int(x) for x in m.group(1).split(",")]
    tiles = np.array([int(x) for x in m.group(2).split(",")]).reshape(dims)
    if m.group(3):
        # Partial replication: the last tile dimension lists the devices that hold the same tile.
        groups = tiles.reshape(-1, dims[-1]).tolist()
        group_of_tile = np.arange(len(groups)).reshape(dims[:-1]).tolist()
        return torch_xla._XLAC.OpSharding(tiles.tolist(), group_of_tile, groups, 5)
    return torch_xla._XLAC.OpSharding(tiles.tolist(), [], [], 3)


def is_tiled(spec: str) -> bool:
    """True for an annotation that splits the tensor over devices (not '' and not '{replicated}')."""
    return spec.startswith("{devices=")


def place(host: torch.Tensor, device: torch.device, spec: str = "") -> torch.Tensor:
    """Transfer a host tensor to the device with the sharding annotation `spec` ('' for none): plain device
    data, so nothing is traced or compiled for it. Raises ValueError when `spec` cannot be reproduced."""
    import torch_xla

    out = host.to(device)
    sharding = _op_sharding(spec)
    if sharding is not None:
        torch_xla._XLAC._xla_mark_sharding(out, sharding)
        if sharding_spec_string(out) != spec:
            raise ValueError(f"sharding {spec!r} came back as {sharding_spec_string(out)!r}")
    return out


def device_zeros_like(tensor: torch.Tensor) -> torch.Tensor:
    """Zeros with `tensor`'s shape, dtype, device and sharding, made by a host-to-device transfer: plain
    device data, so no graph is traced or compiled for it (a `torch.zeros_like` on the device would be a
    pending op that compiles a graph at the next cut). Off XLA (CPU unit tests) plain zeros."""
    if tensor.device.type != "xla":
        return torch.zeros_like(tensor)
    return place(torch.zeros(tensor.shape, dtype=tensor.dtype), tensor.device, sharding_spec_string(tensor))


def device_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a device tensor with its sharding, made by a round trip through the host: plain device data
    (a `clone()` would be a pending op that compiles a graph at the next cut). A sharded tensor is gathered to
    the host whole for the copy. Off XLA (CPU unit tests) a plain copy."""
    if tensor.device.type != "xla":
        return tensor.detach().clone()
    return place(tensor.detach().cpu(), tensor.device, sharding_spec_string(tensor))


def graph_inputs(roots: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """The device buffers the pending graph rooted at `roots` reads, in the graph's parameter order: (their
    tensor ids, one tensor per buffer). A materialised tensor reads itself."""
    import torch_xla

    ids, values = torch_xla._XLAC._get_tensors_xla_device_data_node(roots)
    return list(ids), list(values)


def buffer_handles(tensors: list[torch.Tensor]) -> list[int]:
    import torch_xla

    return list(torch_xla._XLAC._get_tensors_handle(tensors))


def device_seed_id() -> int:
    """The id `graph_inputs` reports for torch_xla's device RNG seed."""
    import torch_xla

    return torch_xla._XLAC._get_seed_info_id()


def pending_count(tensors: list[torch.Tensor] | None = None, device: torch.device | None = None) -> int:
    """How many of `tensors` (or of all live tensors on `device`) hold work not yet run."""
    import torch_xla

    if tensors is not None:
        return sum(torch_xla._XLAC._check_tensor_need_materialization(tensors))
    return sum(torch_xla._XLAC._check_device_tensor_need_materialization(str(device)))


def materialise(tensors: list[torch.Tensor]) -> None:
    """Launch the pending work of those of `tensors` that hold some (no wait)."""
    import torch_xla

    X = torch_xla._XLAC
    pending = [t for t, need in zip(tensors, X._check_tensor_need_materialization(tensors)) if need]
    if pending:
        X._xla_sync_multi(pending, devices=[], wait=False, sync_xla_data=True)


def optimization_barrier_(tensors: list[torch.Tensor]) -> None:
    """Make the graph compute all of `tensors` before anything that reads one of them (in place: each tensor
    becomes its output of the barrier)."""
    import torch_xla.core.xla_model as xm

    xm.optimization_barrier_(tensors)


def donate(tensor: torch.Tensor) -> None:
    """Let the next graph that reads `tensor`'s buffer reuse it for its outputs (the buffer is gone after)."""
    import torch_xla

    torch_xla._XLAC._set_buffer_donation(tensor, True)


def compile_graph(roots: list[torch.Tensor]) -> bytes:
    """Compile (or find cached) the pending graph rooted at `roots`, aliasing donated inputs to its outputs,
    without running it; returns its hash for `run_compiled`."""
    import torch_xla
    from torch_xla.utils.buffer_donor_context import alias_with_buffer_donor_config

    with alias_with_buffer_donor_config():
        graph_hash = torch_xla._XLAC._get_graph_hash(roots)
        torch_xla._XLAC._xla_warm_up_cache(roots, [])
    return graph_hash


def run_compiled(graph_hash: bytes, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Launch a graph compiled by `compile_graph` on `args` (its parameters, in order); its outputs, in the
    order of its roots."""
    import torch_xla

    return list(torch_xla._XLAC._run_cached_graph(graph_hash, args))


def repoint_all(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Make each of `tensors` hold the buffer of its `values` entry (torch_xla's set_; for a Parameter use
    `.data =`, see replay.py)."""
    import torch_xla

    replace = torch_xla._XLAC._replace_xla_tensor
    for t, v in zip(tensors, values):
        replace(t, v)


def drop_pending(device: torch.device) -> None:
    """Forget the pending work of every live tensor on `device`; a tensor that merely references a buffer
    becomes a plain handle to it."""
    import torch_xla

    torch_xla._XLAC._clear_pending_irs(str(device))


def value_ids(tensors: list[torch.Tensor]) -> list[object]:
    """An identity of each tensor's current value (its pending IR node, or its buffer): equal before and after
    some work exactly when the work left the tensor as it was."""
    import torch_xla

    ident = torch_xla._XLAC._unique_id_for_ir_and_data
    return [ident(t) for t in tensors]


def release_buffer(tensor: torch.Tensor) -> None:
    """Let `tensor` keep its shape and dtype but hold no device buffer (torch_xla's placeholder): its memory is
    freed, and reading its value is an error until it is given one again. A Parameter through `.data =`."""
    from torch_xla.core.xla_builder import create_placeholder_tensor

    empty = create_placeholder_tensor(tuple(tensor.shape), tensor.dtype)
    if isinstance(tensor, torch.nn.Parameter):
        tensor.data = empty
    else:
        import torch_xla

        torch_xla._XLAC._replace_xla_tensor(tensor, empty)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """True for a tensor left by `release_buffer`: no device buffer, no pending computation, no host data."""
    import torch_xla

    info = torch_xla._XLAC._get_xla_tensor_debug_info(tensor)
    return "IR: None" in info and "Data Handle: None" in info and "Tensor on host: None" in info


def mark_replicated(tensor: torch.Tensor) -> None:
    """Annotate a (pending) device tensor as replicated over the mesh, so GSPMD's propagation cannot give the
    graph output it becomes another sharding."""
    import torch_xla

    torch_xla._XLAC._xla_mark_sharding(tensor, _op_sharding("{replicated}"))
