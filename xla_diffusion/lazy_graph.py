"""torch_xla's cached-graph entry points (the ones its dynamo bridge uses), for running a compiled graph
again without tracing it (`replay.StepReplay`): which device buffers a pending graph reads, compiling it
without running it, running it on new arguments, and pointing tensors at its results. Tensors are XLA
tensors; "handles" identify device buffers. With runtime.py and sharding.py, the layer that imports torch_xla.
"""

from __future__ import annotations

import torch


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
