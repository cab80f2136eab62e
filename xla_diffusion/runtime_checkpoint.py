"""The torch_xla side of distributed checkpointing (checkpointer.py) and of preemption (resume.py), with runtime.py
in the layer that imports torch_xla: the process group and the SPMD planners of torch.distributed.checkpoint,
host copies of sharded state, the mesh's identity, XLA's preemption sync manager.
"""

from __future__ import annotations

import numpy as np


def checkpoint_process_group() -> object:
    """A gloo process group over every process of the job, for torch.distributed.checkpoint's collectives.

    The default group is created if needed: with one process from an in-memory store (no TCP port, so
    concurrent single-host jobs on one machine cannot collide on xla://'s default port 12355), otherwise
    through torch_xla's `xla://` rendezvous (process index/count from the runtime; on TPU the master's
    address is discovered, elsewhere it comes from MASTER_ADDR/MASTER_PORT). A dedicated subgroup is
    returned so that a save running in a background thread never interleaves its collectives with other
    users of the default group.
    """
    import torch.distributed as dist
    import torch_xla.runtime as xr

    if not dist.is_initialized():
        if xr.process_count() == 1:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        else:
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// rendezvous)

            dist.init_process_group("gloo", init_method="xla://")
    return dist.new_group(backend="gloo")


def spmd_save_planner() -> object:
    """torch.distributed.checkpoint SavePlanner that writes each process's addressable shards of
    SPMD-sharded tensors (replicated tensors and shards held by several processes are written once)."""
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    return SPMDSavePlanner()


def spmd_load_planner() -> object:
    """LoadPlanner that reads into already-placed (possibly sharded) device tensors in place, whatever the
    sharding the checkpoint was written with (each process reads the chunks overlapping its shards)."""
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

    return SPMDLoadPlanner()


def host_copy_for_checkpoint(state: dict) -> dict:
    """Copy every device tensor of a nested state dict to host memory, shard by shard (nothing is gathered:
    a sharded tensor becomes the list of this process's shards). Blocks until the pending device work has
    finished, so this is the part of an asynchronous save that stalls the caller; afterwards the device
    tensors may change freely. Compiles nothing when the tensors are materialised (e.g. after a step)."""
    import torch_xla
    import torch_xla.core.xla_model as xm
    from torch.utils._pytree import tree_map
    from torch_xla.experimental.distributed_checkpoint._helpers import _CpuShards, _sharded_cpu_state_dict

    torch_xla.sync()
    xm.wait_device_ops()

    def one_copy_per_tile(x: object) -> object:
        # A tensor split over some mesh axes and replicated over the others (FSDP on a (data, fsdp) mesh:
        # '{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}') comes back with each tile once per replica.
        # Given two write items for one chunk, torch's checkpoint planner leaves the tensor out of the saved
        # metadata altogether (torch_xla 2.9): the save "succeeds" without it. Keep one copy of each tile.
        if not isinstance(x, _CpuShards):
            return x
        seen: set[tuple] = set()
        shards = []
        for shard in x.shards:
            key = tuple((i.start, i.stop) for i in shard.indices)
            if key not in seen:
                seen.add(key)
                shards.append(shard)
        return _CpuShards(shards=shards, global_shape=x.global_shape)

    return tree_map(one_copy_per_tile, _sharded_cpu_state_dict(state))


def global_device_count() -> int:
    """Number of devices of the whole job (all processes)."""
    import torch_xla.runtime as xr

    return xr.global_runtime_device_count()


def quiet_checkpoint_warnings() -> None:
    """Silence two warnings torch_xla 2.9's checkpoint planners raise on every save/load with torch 2.9,
    about their own code, not ours: the SavePlanner.set_up_planner signature, and XLAShard's list-of-slices
    indexing (its results were checked bitwise by tests/test_checkpoint.py)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"The function definition for SavePlanner\.set_up_planner")
    warnings.filterwarnings("ignore", message=r"Using a non-tuple sequence for multidimensional indexing")
    warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")


def describe_mesh(mesh: object | None) -> dict:
    """A JSON-able identity of a device mesh (device count, shape, axis names, device order): two runs
    with equal descriptions lay tensors out on the same devices in the same way. None: device count only."""
    desc: dict = {"num_devices": global_device_count()}
    if mesh is not None:
        desc.update(shape=[int(n) for n in mesh.mesh_shape], axes=[str(a) for a in mesh.axis_names],
                    device_ids=[int(i) for i in np.asarray(mesh.device_ids).ravel()])
    return desc


def activate_preemption_sync() -> None:
    """Start XLA's preemption sync manager (several processes, i.e. a TPU pod): a SIGTERM on any host becomes
    a preemption notice in the XLA coordination service, and every host's `preemption_sync_point` then turns
    True at the same step. XLA installs its own SIGTERM handler for this."""
    import torch_xla
    import torch_xla.runtime as xr

    torch_xla._XLAC._ensure_xla_coordinator_initialized(xr.process_index(), xr.process_count(), xr.get_master_ip())
    torch_xla._XLAC._activate_preemption_sync_manager()


def preemption_sync_point(step: int) -> bool:
    """True at the step all hosts agreed to stop at after a preemption notice (`activate_preemption_sync`).
    Host-local: a mutex and a comparison in XLA's manager; it blocks only while the hosts agree, once."""
    import torch_xla

    return bool(torch_xla._XLAC._sync_point_reached(step))
