"""FSDP over the named mesh: sharding rules as data, applied to a plain model and its training state, and
the per-device bytes read from the device buffers that check it (what the compiled graph gathers and
allocates is read from XLA's dumps by `hlo.py`).

The rule table is an ordered list of `(pattern, spec)`: `pattern` is an fnmatch pattern over parameter
names (`"*.attn1.to_q.weight"`), `spec` a partition spec with one entry per tensor dimension (a mesh axis
name, a tuple of axis names, or None for "not split"), or `REPLICATED`. The first rule whose pattern
matches a parameter decides its spec; parameters no rule matches get the default: the largest dimension
divisible by the `fsdp` axis size is split over `fsdp`, and tensors under `min_shard_numel` elements
(biases, norms) or with no divisible dimension are replicated. Parameters are replicated over the `data`
axis, so a `(data, fsdp)` mesh is data parallel across `data` and fully sharded within `fsdp`.

With torch_xla this module and `runtime.py` are the only ones that import it (inside functions, so the
pure parts, rule resolution, work without a device).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

FSDP_AXIS = "fsdp"
# Below this many elements a tensor stays replicated: sharding it saves a few KiB per chip but costs one
# more collective per step. 4096 fp32 elements is 16 KiB. The largest biases of SD's UNets (the GEGLU
# projection's, 10240 elements) are sharded under it; add a rule such as ("*.bias", REPLICATED) to keep them whole.
DEFAULT_MIN_SHARD_NUMEL = 4096
REPLICATED = "replicated"

AxisEntry = str | tuple[str, ...] | None
PartitionSpec = tuple[AxisEntry, ...]
Rule = tuple[str, PartitionSpec | str]


class ShardingRuleError(ValueError):
    """A sharding rule that matches nothing or does not fit a tensor; the message is one line."""


# ---------------------------------------------------------------------------------------------------------
# Rules → specs (pure: no device, works on meta-device models)
# ---------------------------------------------------------------------------------------------------------


def mesh_axis_sizes(mesh: Any) -> dict[str, int]:
    """{axis name: size} of a torch_xla `Mesh` (e.g. {"data": 2, "fsdp": 2})."""
    return {str(name): int(size) for name, size in zip(mesh.axis_names, mesh.mesh_shape)}


def replicated_spec(ndim: int) -> PartitionSpec:
    return (None,) * ndim


def default_spec(
    shape: Sequence[int], axis_sizes: Mapping[str, int], min_shard_numel: int = DEFAULT_MIN_SHARD_NUMEL
) -> PartitionSpec:
    """The default rule for one tensor of `shape`: split its largest dimension divisible by the fsdp axis
    size over `fsdp` (the first such dimension on a tie), or replicate it when it is smaller than
    `min_shard_numel` elements, has no divisible dimension, or the fsdp axis has size 1."""
    size = axis_sizes.get(FSDP_AXIS, 1)
    if size <= 1 or math.prod(shape) < min_shard_numel:
        return replicated_spec(len(shape))
    candidates = [d for d, n in enumerate(shape) if n % size == 0]
    if not candidates:
        return replicated_spec(len(shape))
    best = max(candidates, key=lambda d: (shape[d], -d))
    return tuple(FSDP_AXIS if d == best else None for d in range(len(shape)))


def _entry_axes(entry: AxisEntry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_spec(name: str, shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int],
               rule: str = "") -> None:
    """Raise ShardingRuleError unless `spec` fits a tensor `name` of `shape` on a mesh of `axis_sizes`:
    one entry per dimension, known axes, each axis used once, and every split dimension divisible."""
    where = f"sharding rule {rule!r} " if rule else "spec "
    if len(spec) != len(shape):
        raise ShardingRuleError(
            f"{where}gives {len(spec)}-d spec {spec} for {name} of shape {tuple(shape)} ({len(shape)}-d)")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        axes = _entry_axes(entry)
        for axis in axes:
            if axis not in axis_sizes:
                raise ShardingRuleError(
                    f"{where}names mesh axis {axis!r} (for {name}); the mesh has {tuple(axis_sizes)}")
            if axis in used:
                raise ShardingRuleError(f"{where}uses mesh axis {axis!r} twice in {spec} (for {name})")
            used.append(axis)
        ways = math.prod(axis_sizes[a] for a in axes)
        if shape[dim] % ways:
            raise ShardingRuleError(
                f"{where}splits dim {dim} of {name} {tuple(shape)} over {axes} ({ways} ways): "
                f"{shape[dim]} is not divisible by {ways}")


def resolve_specs(
    named_shapes: torch.nn.Module | Mapping[str, Sequence[int]],
    axis_sizes: Mapping[str, int],
    rules: Sequence[Rule] = (),
    min_shard_numel: int = DEFAULT_MIN_SHARD_NUMEL,
) -> dict[str, PartitionSpec]:
    """A partition spec for every parameter of a module (or every entry of {name: shape}), in order.

    `rules` are tried in order and the first whose pattern matches the name wins; names that no rule
    matches get `default_spec`. Raises ShardingRuleError when a rule's pattern matches no parameter, when
    every parameter it matches was taken by an earlier rule, or when its spec does not fit a tensor.
    """
    if isinstance(named_shapes, torch.nn.Module):
        shapes = {n: tuple(p.shape) for n, p in named_shapes.named_parameters()}
    else:
        shapes = {n: tuple(s) for n, s in named_shapes.items()}
    used = [False] * len(rules)
    specs: dict[str, PartitionSpec] = {}
    for name, shape in shapes.items():
        for i, (pattern, spec) in enumerate(rules):
            if fnmatch.fnmatchcase(name, pattern):
                resolved = replicated_spec(len(shape)) if spec == REPLICATED else tuple(spec)
                check_spec(name, shape, resolved, axis_sizes, rule=pattern)
                specs[name] = resolved
                used[i] = True
                break
        else:
            specs[name] = default_spec(shape, axis_sizes, min_shard_numel)
    for (pattern, _), was_used in zip(rules, used):
        if was_used:
            continue
        if any(fnmatch.fnmatchcase(n, pattern) for n in shapes):
            raise ShardingRuleError(
                f"sharding rule {pattern!r} is shadowed: earlier rules take every parameter it matches")
        raise ShardingRuleError(f"sharding rule {pattern!r} matches no parameter")
    return specs


def local_numel(shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> int:
    """Elements of one device's shard of a tensor of `shape` under a spec that fits it (check_spec)."""
    return math.prod(n // math.prod(axis_sizes[a] for a in _entry_axes(e)) for n, e in zip(shape, spec))


# ---------------------------------------------------------------------------------------------------------
# Applying specs on the device
# ---------------------------------------------------------------------------------------------------------


def shard_tensor(tensor: torch.Tensor, mesh: Any, spec: PartitionSpec) -> None:
    """Annotate a device tensor with `spec` in place. Device data is resharded right away (no graph); a
    replicated spec is annotated explicitly too, so every state tensor carries a sharding and its local
    shards can be read back (`per_device_bytes`)."""
    import torch_xla.distributed.spmd as xs

    if tensor.device.type != "xla":
        raise ValueError(f"cannot shard a tensor on {tensor.device}: move it to the XLA device first")
    xs.mark_sharding(tensor, mesh, tuple(spec))


def fsdp_shard(module: torch.nn.Module, mesh: Any, rules: Sequence[Rule] = (),
               min_shard_numel: int = DEFAULT_MIN_SHARD_NUMEL) -> dict[str, PartitionSpec]:
    """FSDP as a function applied to a plain module (loaded on the CPU, knowing nothing of meshes): resolve
    every parameter's spec from the rule table for `mesh` (a bad rule is one ShardingRuleError line, before
    anything reaches a device), move the module to the mesh's device and annotate its parameters. Returns
    the specs.

    With an fsdp axis of size 1 every spec is replicated. Gradients follow the parameters through GSPMD's
    propagation; state made afterwards from the parameters inherits their sharding (AdamW's moments from
    `optim.prime_optimizer`, EMA shadows from `runtime.device_copy`).
    """
    import torch_xla

    specs = resolve_specs(module, mesh_axis_sizes(mesh), rules, min_shard_numel)
    module.to(torch_xla.device())
    shard_module(module, mesh, specs)
    if mesh_axis_sizes(mesh).get("fsdp", 1) > 1:
        pin_activations_to_batch(module, mesh)
    return specs


def _pinned_types() -> tuple[type, ...]:
    """The modules whose outputs are activations (B, ...) pinned to the batch split at fsdp > 1: diffusers'
    UNet blocks (resnets, transformer blocks, down- and up-samplers) and every GroupNorm and LayerNorm."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D, torch.nn.GroupNorm, torch.nn.LayerNorm


def pin_activations_to_batch(module: torch.nn.Module, mesh: Any) -> int:
    """Constrain the output of every UNet block, every GroupNorm and LayerNorm (and `conv_in`) to the batch
    sharding over all mesh axes, while gradients are on (training; sampling and evaluation are left alone).
    Returns how many modules were hooked, `conv_in` aside.

    With weights split over `fsdp` and the batch split over (data, fsdp), GSPMD may compute a layer with its
    activations re-split along the weights' dimension instead of gathering the weights, which moves
    activations (all-gathers, all-to-alls and permutes whose bytes grow with the batch). Pinning outputs to
    the batch split leaves it the weights to gather, as torch_xla's FSDPv2 does with layer outputs. The
    blocks alone were not enough: inside them GSPMD still re-split the normalised activations that feed the
    convolutions and projections whose weights are split. Measured on the tiny UNet's step at fsdp 4,
    batch 16 (bench/mesh.py): with no pins 26,562 KiB all-gathered per device; blocks pinned 14,162 KiB plus
    9,216 KiB of all-to-alls and 5,120 of permutes; blocks and norms pinned 6,896 KiB of all-gathers (each
    sharded weight about twice, forward and backward, in f32 on CPU) and nothing else; 6,942 KiB at batch 32.
    """
    import torch_xla.distributed.spmd as xs

    from .runtime import BATCH_AXES

    axes = tuple(a for a in BATCH_AXES if a in mesh_axis_sizes(mesh))

    def pin(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.device.type == "xla":
            xs.mark_sharding(t, mesh, (axes,) + (None,) * (t.dim() - 1))

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if torch.is_grad_enabled():
            for t in output if isinstance(output, tuple) else (output,):
                pin(t)
        return output

    pinned = [m for m in module.modules() if isinstance(m, _pinned_types())]
    conv_in = getattr(module, "conv_in", None)
    for m in pinned + ([conv_in] if isinstance(conv_in, torch.nn.Module) else []):
        m.register_forward_hook(hook)
    return len(pinned)


def shard_module(module: torch.nn.Module, mesh: Any, specs: Mapping[str, PartitionSpec]) -> None:
    """Annotate every parameter of `module` (already on the XLA device) with its spec from `specs`
    (resolve_specs on the same module). Gradients follow through GSPMD's propagation."""
    for name, param in module.named_parameters():
        shard_tensor(param, mesh, specs[name])


def shard_optimizer_state(optimizer: torch.optim.Optimizer, module: torch.nn.Module, mesh: Any,
                          specs: Mapping[str, PartitionSpec]) -> None:
    """Annotate the optimizer state of `module`'s parameters: tensors shaped like their parameter (AdamW's
    exp_avg, exp_avg_sq) take the parameter's spec; 0-d tensors (`step`) are replicated.

    The state is primed first when it does not exist (`optim.prime_optimizer`, whose tensors already carry
    these shardings when the parameters are sharded before it runs: then this only states them). State
    without an annotation goes into step 1's graph unannotated but comes out of it annotated (replicated),
    which makes step 2 a different graph.
    """
    from .optim import prime_optimizer

    prime_optimizer(optimizer)
    names = {id(p): n for n, p in module.named_parameters()}
    done: set[int] = set()  # a tensor several parameters share (SharedStepAdamW's `step`) is annotated once
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            spec = specs[names[id(p)]]
            for value in state.values():
                if not isinstance(value, torch.Tensor) or value.device.type != "xla" or id(value) in done:
                    continue
                done.add(id(value))
                shard_tensor(value, mesh, spec if value.shape == p.shape else replicated_spec(value.ndim))


def sharding_string(tensor: torch.Tensor) -> str:
    """XLA's sharding annotation of a device tensor ('' when it has none)."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------


def per_device_bytes(tensors: Iterable[torch.Tensor], chunk: int = 64) -> dict[str, int]:
    """Bytes each addressable device holds for `tensors`, summed from their local shards as read back
    from the device buffers (padding included), {device: bytes}, e.g. {"CPU:0": 1234, ...}.

    Every tensor must be materialised device data with a sharding annotation (replicated ones too:
    `shard_tensor(t, mesh, replicated_spec(t.ndim))`); a tensor without one raises, since it has no local
    shards to read. Shards are copied to the host `chunk` tensors at a time, to bound host memory.
    """
    import torch_xla

    seen: set[int] = set()
    unique = [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]
    for t in unique:
        if not torch_xla._XLAC._get_xla_sharding_spec(t):
            raise ValueError(f"a {tuple(t.shape)} {t.dtype} tensor has no sharding annotation to measure")
    totals: dict[str, int] = {}
    for start in range(0, len(unique), chunk):
        for shards in torch_xla._XLAC._get_local_shards(unique[start:start + chunk]):
            for data, device in shards:
                totals[device] = totals.get(device, 0) + data.numel() * data.element_size()
    return dict(sorted(totals.items(), key=lambda kv: (len(kv[0]), kv[0])))


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------


def gradient_checkpointing_function() -> Callable[..., Any]:
    """The function to pass to diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func=...)`.

    diffusers calls it as `func(block, *args)`. torch.utils.checkpoint does not save memory on XLA: the
    recomputed forward is the same expression as the original one and XLA's common-subexpression pass
    merges them back. torch_xla's checkpoint puts an optimization barrier on the recomputation's inputs.
    It is given the block's bound `__call__` because it adds the block's weights to that barrier only
    when the function is a method of a module. It supports only the re-entrant variant.
    """
    from torch_xla.utils.checkpoint import checkpoint

    from .xla_ops import xla_friendly_ops

    def checkpoint_block(block: Callable[..., Any], *args: Any) -> Any:
        fn = block.__call__ if isinstance(block, torch.nn.Module) else block

        def with_xla_ops(*inputs: Any) -> Any:
            # the recomputation runs in the backward pass, outside the forward's `xla_friendly_ops`: without
            # it the recomputed norms were torch_xla's batch-merging ones, which all-gathered the batch's
            # activations at every GroupNorm (52 all-gathers, 19,968 KiB per step data-parallel)
            with xla_friendly_ops():
                return fn(*inputs)

        return checkpoint(with_xla_ops, *args, use_reentrant=True)

    return checkpoint_block


def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
    """--gradient_checkpointing on a plain diffusers model: its blocks recompute their activations in the
    backward pass, through `gradient_checkpointing_function` (diffusers' own default, torch's checkpoint, is
    merged away by XLA). Only while gradients are enabled: evaluation and sampling run as before."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_function())
