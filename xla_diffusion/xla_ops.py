"""Work-arounds for ops torch_xla does not lower on every backend.

torch_xla lowers `upsample_nearest2d_backward` only on TPU (and Neuron); elsewhere (CPU, GPU) it falls
back to the host, which cuts the step graph in two, syncs mid-step and adds compilations. A nearest
upsample by an integer factor is exactly a broadcast + reshape, whose backward (a sum) lowers
everywhere, so the UNet's forward runs under `nearest_upsample_as_broadcast()` on every backend: the
same numbers, one graph.
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


@contextlib.contextmanager
def nearest_upsample_as_broadcast() -> Iterator[None]:
    """Within the block, F.interpolate(mode="nearest", integer scale_factor) on 4-d inputs is computed
    by `nearest_upsample`; every other call goes to the original function."""
    F.interpolate = _interpolate
    try:
        yield
    finally:
        F.interpolate = _original_interpolate
