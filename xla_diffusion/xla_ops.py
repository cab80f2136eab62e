"""Work-arounds for ops torch_xla lowers badly, applied while a model's forward is traced (`xla_friendly_ops`).

- torch_xla lowers `upsample_nearest2d_backward` only on TPU (and Neuron); elsewhere (CPU, GPU) it falls
  back to the host, which cuts the step graph in two, syncs mid-step and adds compilations. A nearest
  upsample by an integer factor is exactly a broadcast + reshape, whose backward (a sum) lowers
  everywhere: the same numbers, one graph.
- torch_xla lowers `group_norm` as a batch norm over a (1, B × groups, rest) view, i.e. with the batch
  merged into the feature dimension of XLA's BatchNormTraining (and `layer_norm` likewise, over
  (1, B × tokens, C)). GSPMD's partitioner does not split that op
  along its features, so on a batch-sharded mesh every device all-gathers the whole batch's activations at
  every GroupNorm (measured by bench/mesh.py: 66 all-gathers, 24 MB per device per step of the tiny UNet
  at batch 16, growing with the batch) and normalises all of them. `group_norm` and `layer_norm` below
  compute the same statistics with plain reductions over the normalised dimensions, which keep the batch
  dimension split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_original_interpolate = F.interpolate


def nearest_upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H*factor, W*factor), each pixel repeated factor × factor times."""
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, factor, w, factor).reshape(b, c, h * factor, w * factor)


def _interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,  # noqa: ANN001
                 recompute_scale_factor=None, antialias=False):
    if mode == "nearest" and size is None and input.dim() == 4 and scale_factor is not None:
        factors = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        if factors[0] == factors[1] and float(factors[0]).is_integer() and factors[0] >= 1:
            return nearest_upsample(input, int(factors[0]))
    return _original_interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)


_original_group_norm = F.group_norm


def group_norm(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm on (B, C, *) XLA tensors by per-sample reductions over a (B, groups, C / groups × rest)
    view; tensors of other devices go to F.group_norm.

    Computed in fp32; the result has the dtype torch_xla's F.group_norm gives, the promotion of the input's,
    the weight's and the bias's (autocast leaves group_norm alone on XLA: a bf16 input with the fp32 weights
    of a GroupNorm module gives fp32)."""
    if input.device.type != "xla":
        return _original_group_norm(input, num_groups, weight, bias, eps)
    out_dtype = _promoted(input, weight, bias)
    with torch.autocast("xla", enabled=False):
        shape = input.shape
        x = input.float().reshape(shape[0], num_groups, -1)
        mean = x.mean(dim=-1, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=-1, keepdim=True)
        y = (centred * torch.rsqrt(var + eps)).reshape(shape)
        per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
        # reshaped copies, not views: a view makes torch_xla track the parameter as a view base, which a
        # replayed step (replay.py) cannot update in place
        if weight is not None:
            y = y * weight.to(torch.float32, copy=True).reshape(per_channel)
        if bias is not None:
            y = y + bias.to(torch.float32, copy=True).reshape(per_channel)
    return y.to(out_dtype)


_original_layer_norm = F.layer_norm


def layer_norm(input: torch.Tensor, normalized_shape: list[int] | tuple[int, ...],
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm on XLA tensors by reductions over the last len(normalized_shape) dimensions (the
    leading ones, batch and tokens, stay as they are); tensors of other devices go to F.layer_norm.
    Computed in fp32, with torch_xla's result dtype (see `group_norm`)."""
    if input.device.type != "xla":
        return _original_layer_norm(input, normalized_shape, weight, bias, eps)
    out_dtype = _promoted(input, weight, bias)
    dims = tuple(range(-len(normalized_shape), 0))
    with torch.autocast("xla", enabled=False):
        x = input.float()
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
        y = centred * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
    return y.to(out_dtype)


def _promoted(input: torch.Tensor, *others: torch.Tensor | None) -> torch.dtype:
    dtype = input.dtype
    for t in others:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@contextlib.contextmanager
def xla_friendly_ops() -> Iterator[None]:
    """Within the block, nearest upsampling by an integer factor is `nearest_upsample`, F.group_norm is
    `group_norm` and F.layer_norm is `layer_norm` (see the module docstring); every other call goes to the
    original functions."""
    # restores what was there before, not the originals: it is entered again inside a forward already under
    # it (gradient checkpointing's recomputation, sharding.gradient_checkpointing_function)
    before = F.group_norm, F.layer_norm
    F.group_norm, F.layer_norm = group_norm, layer_norm
    try:
        with nearest_upsample_as_broadcast():
            yield
    finally:
        F.group_norm, F.layer_norm = before


@contextlib.contextmanager
def nearest_upsample_as_broadcast() -> Iterator[None]:
    """Within the block, F.interpolate(mode="nearest", integer scale_factor) on 4-d inputs is computed
    by `nearest_upsample`; every other call goes to the original function."""
    before = F.interpolate
    F.interpolate = _interpolate
    try:
        yield
    finally:
        F.interpolate = before
