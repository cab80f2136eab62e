"""The module that imports torch_xla (with sharding.py beside it): SPMD mode, devices,
processes, the mesh, putting host batches on the mesh and reading rows back, placing frozen parts, the device
loader, autocast, the persistent compile cache, the profiler, compilation counts, and the cached-graph entry
points that replay a compiled step.
The day the backend changes, this layer moves.

Nothing here runs at import time: `xr.use_spmd()` must happen inside `main`, after the environment
(e.g. `CPU_NUM_DEVICES`, `PJRT_DEVICE`) is final.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
# Batch dimension of every input is split over all mesh axes: with FSDP the fsdp axis is data-parallel
# too (it shards parameters, not the batch's work).
BATCH_AXES = ("data", "fsdp")


@dataclass(frozen=True)
class Runtime:
    """What the trainer needs to know about where it runs."""

    device: torch.device
    process_index: int
    process_count: int
    num_devices: int
    mesh: object  # torch_xla.distributed.spmd.Mesh

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0


def init_runtime(fsdp_size: int = 1, compile_cache_dir: str | None = None) -> Runtime:
    """Switch to SPMD and build the named `(data, fsdp)` mesh over every device of every host.

    Raises ConfigError (one line) when the device count does not split into `fsdp_size`; that check comes
    before any graph runs or any tensor reaches a device.
    """
    import torch_xla
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    keep_optimization_barriers_on_cpu()
    if compile_cache_dir:
        # Must precede any compilation; readonly=False on every host is what the XLA example does.
        xr.initialize_cache(compile_cache_dir, readonly=False)
    xr.use_spmd()
    num_devices = xr.global_runtime_device_count()
    if num_devices % fsdp_size:
        raise ConfigError(f"--fsdp_size {fsdp_size} does not divide the {num_devices} devices of the mesh")
    mesh = xs.Mesh(np.arange(num_devices), (num_devices // fsdp_size, fsdp_size), MESH_AXES)
    xs.set_global_mesh(mesh)  # kernels called without a mesh (diffusers' flash attention) shard over this one
    return Runtime(
        device=torch_xla.device(),
        process_index=xr.process_index(),
        process_count=xr.process_count(),
        num_devices=num_devices,
        mesh=mesh,
    )


# XLA's CPU compiler runs this pass early (before fusion, scheduling and buffer assignment); it deletes the
# optimization barriers that torch_xla's gradient checkpoint puts between a block's recomputation and its
# incoming gradient. Without them XLA:CPU may schedule the recomputation during the forward pass, so
# --gradient_checkpointing raised the step's temporaries on the CPU mesh (26,968 -> 37,168 KiB) instead of
# lowering them. TPU and GPU compilers keep the barriers until scheduling; disabling the pass makes the CPU
# mesh compile what they do (bench/mesh.py, tests/test_fsdp_sharding.py).
CPU_BARRIER_PASS = "cse_barrier_expander"


def keep_optimization_barriers_on_cpu() -> None:
    """On the CPU backend, add CPU_BARRIER_PASS to XLA_FLAGS' `--xla_disable_hlo_passes` (joining a list the
    user gave). XLA reads its flags when the runtime client starts, so this must run before any device work;
    called by `init_runtime`. No effect elsewhere."""
    if os.environ.get("PJRT_DEVICE", "").upper() != "CPU":  # torch_xla sets it on import when unset
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    key = "--xla_disable_hlo_passes="
    for i, flag in enumerate(flags):
        if flag.startswith(key):
            if CPU_BARRIER_PASS not in flag[len(key):].split(","):
                flags[i] = f"{flag},{CPU_BARRIER_PASS}"
            break
    else:
        flags.append(key + CPU_BARRIER_PASS)
    os.environ["XLA_FLAGS"] = " ".join(flags)


def on_tpu() -> bool:
    """Whether the XLA devices are TPUs (PJRT_DEVICE; nothing is started)."""
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def device_kind() -> str | None:
    """The accelerator's kind, for the peak-FLOPs table (`flops.peak_tflops` reads it): the PJRT device kind
    ('TPU v5 lite', 'TPU v4'), or under SPMD, where `xm.xla_device_kind()` cannot name the virtual device, the
    TPU type of the VM's accelerator type ('v5litepod', 'v6e', 'v5p'); 'TPU' when neither can be read. None
    off TPU."""
    import torch_xla.core.xla_model as xm

    if not on_tpu():
        return None
    try:
        return xm.xla_device_kind()
    except RuntimeError:  # "Unknown device SPMD:0"
        pass
    try:
        from torch_xla._internal import tpu

        return tpu.get_tpu_type()
    except (OSError, KeyError, TypeError, ValueError):  # no metadata server, no TPU_ACCELERATOR_TYPE
        return "TPU"


def batch_sharding_spec(mesh: object, ndim: int, host_local: bool = True) -> object:
    """ShardingSpec splitting dim 0 over all mesh axes and replicating the rest, for an `ndim` tensor.

    `host_local`: each host passes only its own part of the global batch (training and eval data, where
    hosts read different samples); on several hosts torch_xla then assembles the global batch from the
    parts (`minibatch`). False when every host passes the same global tensor (e.g. sampling prompts).
    """
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    return xs.ShardingSpec(mesh, (BATCH_AXES,) + (None,) * (ndim - 1), minibatch=host_local and xr.process_count() > 1)


def to_mesh(x: torch.Tensor | dict[str, torch.Tensor], mesh: object, host_local: bool = True) -> Any:
    """A host tensor (or a dict of them) on the mesh, each sharded on dim 0 over all mesh axes, the rest
    replicated. `host_local`: see `batch_sharding_spec` (False: every host passes the same global tensor)."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    if isinstance(x, dict):
        return {k: to_mesh(v, mesh, host_local) for k, v in x.items()}
    spec = batch_sharding_spec(mesh, x.ndim, host_local)
    return xm.send_cpu_data_to_device([x], torch_xla.device(), input_sharding=spec)[0]


def mark_batch_sharded(t: torch.Tensor, mesh: object) -> None:
    """Annotate a device tensor computed in the graph as sharded on dim 0 over all mesh axes (0-d: no-op)."""
    import torch_xla.distributed.spmd as xs

    if t.ndim:
        xs.mark_sharding(t, mesh, (BATCH_AXES,) + (None,) * (t.ndim - 1))


def local_rows(t: torch.Tensor, rt: Runtime, rows_per_process: int) -> torch.Tensor:
    """This process's rows of a device tensor sharded on dim 0 (its part of a global batch), on the CPU.
    On several hosts only a host's own shards are addressable, and they are its rows, in order."""
    from torch_xla.distributed.spmd.xla_sharding import wrap_as_sharded_tensor

    shards = wrap_as_sharded_tensor(t).local_shards
    if any(s.indices is Ellipsis for s in shards):  # replicated (a 1-device mesh): every row, everywhere
        start = rt.process_index * rows_per_process
        return shards[0].data[start : start + rows_per_process]
    by_start: dict[int, torch.Tensor] = {}
    for s in shards:
        by_start.setdefault(s.indices[0].start or 0, s.data)
    return torch.cat([by_start[k] for k in sorted(by_start)])


M = TypeVar("M", bound=torch.nn.Module)


def place_frozen(module: M | None, dtype: torch.dtype, device: torch.device) -> M | None:
    """A frozen part (VAE, text encoder) in `dtype` on `device`; None stays None. The cast happens on the host
    first: a dtype cast on the device would be one more compiled graph.

    On a mesh every weight is annotated replicated right away, as the optimizer state is (`to_device`): torch_xla
    gives unannotated device data a replicated annotation when it first dispatches it, so step 1 would lower
    ops reading the weights without a sharding and step 2 with one. Measured: the bf16 e2e command with the
    batch-local norms (`xla_ops`), whose `weight.float()` of the frozen bf16 norm weights became 34 converts
    annotated `sharding={replicated}` in step 2's HLO only, compiled a second step graph; with the weights
    annotated here it compiles one."""
    if module is None:
        return None
    module = module.to(dtype=dtype).to(device)
    if device.type == "xla":
        import torch_xla.distributed.spmd as xs

        mesh = xs.get_global_mesh()
        if mesh is not None:  # SPMD is on (init_runtime)
            annotate_replicated(module, mesh)
    return module


def annotate_replicated(module: torch.nn.Module, mesh: object) -> None:
    """Annotate every parameter of `module` (on the XLA device) as replicated over `mesh`."""
    import torch_xla.distributed.spmd as xs

    for p in module.parameters():
        xs.mark_sharding(p, mesh, (None,) * p.ndim)


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copies of host tensors on `device`, as device data from now on, replicated over the mesh.

    What the training step carries from one step to the next (optimizer state, lr, EMA shadows and decay) must
    enter step 1 exactly as it leaves every step, or step 1 traces a graph of its own: a graph output is device
    data with a sharding annotation, and `tensor.to(device)` gives neither a sharding nor, for a 0-d tensor
    holding 0 or 1 (an AdamW step count of 0, an lr warm-up or EMA decay starting at 0), device data: torch_xla
    turns such "special scalars" into constants of the graph. Off XLA (CPU unit tests) a plain copy.
    """
    if device.type != "xla":
        return [t.to(device, copy=True) for t in tensors]
    import torch_xla.core.xla_model as xm

    return xm.send_cpu_data_to_device([t.cpu() for t in tensors], device)


def fill_scalars(targets: list[torch.Tensor], values: list[float]) -> None:
    """Give each 0-d device tensor of `targets` its entry of `values`, as new device data (`to_device`; one
    transfer call for all of them). The new buffer itself, not a `copy_` into the old one: a copy into a
    replicated-annotated tensor is a (custom-sharding) op, graph work every step; this is plain device data."""
    if not targets:
        return
    host = [torch.tensor(v, dtype=t.dtype) for t, v in zip(targets, values)]
    for t, value in zip(targets, to_device(host, targets[0].device)):
        t.data = value


def place_trained(module: M, mesh: object) -> M:
    """The trained module on the mesh's device, its parameters annotated as replicated over the mesh, as the
    step's outputs will be: unannotated parameters make step 1's graph differ from every later one (see
    `to_device`)."""
    import torch_xla

    module = module.to(torch_xla.device())
    annotate_replicated(module, mesh)
    return module


def device_loader(source: Iterable[dict[str, torch.Tensor]], ndims: dict[str, int], mesh: object,
                  loader_prefetch_size: int = 1, device_prefetch_size: int = 1) -> Iterable[dict[str, torch.Tensor]]:
    """Host batches → device batches (torch_xla's MpDeviceLoader), every key sharded on dim 0 over the whole
    mesh, loaded and transferred ahead of the step in background threads.

    The caller cuts the graph after each step (`sync`), as the training loop does: the loader does not cut it
    again before handing out the next batch. MpDeviceLoader's own cut there (every `batches_per_execution`
    batches) found nothing pending and still walked every live device tensor: 0.5-2 ms of host time per step
    with the ~1,000-1,500 live tensors of a training run (measured on this machine)."""
    import torch_xla
    import torch_xla.distributed.parallel_loader as pl

    # One spec per key: a single spec for tensors of different rank would silently replicate them.
    sharding = {k: batch_sharding_spec(mesh, nd) for k, nd in ndims.items()}
    return pl.MpDeviceLoader(
        source, torch_xla.device(), input_sharding=sharding, batches_per_execution=sys.maxsize,
        loader_prefetch_size=loader_prefetch_size, device_prefetch_size=device_prefetch_size,
    )


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast for modules on `device` (an XLA device or the CPU), off when not `enabled`."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def sharding_spec_string(tensor: torch.Tensor) -> str:
    """The XLA HLO sharding annotation of a device tensor, e.g. '{devices=[4,1,1,1]0,1,2,3}'."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def compile_count() -> int:
    """Number of XLA graph compilations in this process so far (cache hits excluded)."""
    import torch_xla.debug.metrics as met

    return int(met.counter_value("UncachedCompile") or 0)


def metric_seconds(name: str) -> float:
    """Total of a torch_xla timing metric in this process so far, in seconds ('CompileTime',
    'ExecuteReplicatedTime', ...); 0 before its first sample."""
    import torch_xla.debug.metrics as met

    data = met.metric_data(name)
    return data[1] / 1e9 if data else 0.0


def sync() -> None:
    """Cut the lazy graph here and launch it (the torch_xla 2.x name for mark_step)."""
    import torch_xla

    torch_xla.sync()


def wait_device_ops() -> None:
    """Block until every launched graph has finished (for honest wall-clock timing)."""
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()


def add_step_closure(fn, args: tuple = ()) -> None:
    """Run `fn(*args)` on the host once the current step's graph has executed; tensors in `args` are
    materialised by then, so reading them costs no extra graph or mid-step sync."""
    import torch_xla.core.xla_model as xm

    xm.add_step_closure(fn, args=args)


def run_step_closures() -> None:
    """Run the step closures queued so far without cutting the graph: only when nothing is pending whose value
    they need (after a replayed step, whose graph already ran). A cut (`sync`) would also run them, but it walks
    every live device tensor first."""
    import torch_xla.core.xla_model as xm

    xm._run_step_closures()


class Profiler:
    """Device profile capture in a window of steps, when PROFILE_DIR is set (as in diffusers' example)."""

    def __init__(self, profile_dir: str | None, start_step: int, duration_ms: int, port: int = 9012):
        self.profile_dir, self.start_step, self.duration_ms = profile_dir, start_step, duration_ms
        if profile_dir:
            import torch_xla.debug.profiler as xp

            self._server = xp.start_server(port)
            self._port = port

    def maybe_start(self, step: int) -> None:
        if self.profile_dir and step == self.start_step:
            import torch_xla.debug.profiler as xp

            log.info("capturing a %d ms profile into %s", self.duration_ms, self.profile_dir)
            xp.trace_detached(f"localhost:{self._port}", self.profile_dir, duration_ms=self.duration_ms)


# ---------------------------------------------------------------------------------------------------------
# Distributed checkpointing (used by xla_diffusion/checkpoint.py; the torch_xla side of it lives here)
# ---------------------------------------------------------------------------------------------------------


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


def _op_sharding(spec: str) -> object | None:
    """The torch_xla OpSharding of an HLO sharding annotation as `sharding_spec_string` prints it:
    '' (none) → None, '{replicated}', '{devices=[4,1]0,1,2,3}' (tiled) and
    '{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}' (tiled over some mesh axes, replicated over the
    rest). ValueError for other forms (maximal, manual, iota device lists)."""
    import re

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


# --- Compiled graphs run without tracing (replay.StepReplay): torch_xla's cached-graph entry points, the ones
# its dynamo bridge uses. Tensors are XLA tensors; "handles" identify device buffers.


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
