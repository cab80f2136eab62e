"""The ops of xla_ops equal torch's: the broadcast nearest-upsample equals F.interpolate and the batch-local
group and layer norms equal F.group_norm and F.layer_norm, forward and backward, and keep a split batch
split."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import with_xla_flags
from xla_diffusion import runtime
from xla_diffusion.hlo import hlo_dump_flags
from xla_diffusion.xla_ops import (
    group_norm,
    layer_norm,
    nearest_upsample,
    nearest_upsample_as_broadcast,
    xla_friendly_ops,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _xla_runtime_first():
    """The XLA runtime starts before this module's first backward: autograd sizes its per-device queues at a
    process's first backward, and XLA reports its devices only once its runtime has started."""
    runtime.init_runtime()


def test_nearest_upsample_matches_interpolate_forward_and_backward():
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    ref = F.interpolate(x, scale_factor=2.0, mode="nearest")
    (g_ref,) = torch.autograd.grad((ref * torch.arange(ref.numel()).reshape(ref.shape)).sum(), x)
    ours = nearest_upsample(x, 2)
    (g_ours,) = torch.autograd.grad((ours * torch.arange(ours.numel()).reshape(ours.shape)).sum(), x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_ours, g_ref)


def test_patch_is_scoped_and_only_takes_integer_nearest():
    x = torch.randn(1, 2, 4, 4)
    original = F.interpolate
    with nearest_upsample_as_broadcast():
        assert F.interpolate is not original
        torch.testing.assert_close(F.interpolate(x, scale_factor=2.0, mode="nearest"), nearest_upsample(x, 2))
        # other modes and explicit sizes go to the original implementation
        torch.testing.assert_close(
            F.interpolate(x, size=(6, 6), mode="bilinear"), original(x, size=(6, 6), mode="bilinear")
        )
    assert F.interpolate is original


def _norm_and_grads(fn, dev, x, arg, weight, bias, upstream) -> list[torch.Tensor]:  # noqa: ANN001
    """On the CPU: y = fn(x, arg, weight, bias, 1e-5) computed on `dev`, then the gradients of (y * upstream).sum()
    with respect to x and, when given, weight and bias."""
    inputs = [t.to(dev).requires_grad_(True) for t in (x, weight, bias) if t is not None]
    w, b = (inputs[1], inputs[2]) if weight is not None else (None, None)
    y = fn(inputs[0], arg, w, b, 1e-5)
    grads = torch.autograd.grad((y * upstream.to(dev)).sum(), inputs)
    return [t.detach().cpu() for t in (y, *grads)]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (3, 6, 10)])
def test_group_norm_on_xla_matches_torch_forward_and_backward(affine, shape):
    device = runtime.init_runtime().device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3 + 1
    weight = torch.randn(shape[1], generator=g) if affine else None
    bias = torch.randn(shape[1], generator=g) if affine else None
    upstream = torch.randn(shape, generator=g)
    groups = 2 if shape[1] == 6 else 4

    ref = _norm_and_grads(F.group_norm, "cpu", x, groups, weight, bias, upstream)
    ours = _norm_and_grads(group_norm, device, x, groups, weight, bias, upstream)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ref[1:], ours[1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", [((2, 5, 8), (8,)), ((3, 4, 6), (4, 6))])
def test_layer_norm_on_xla_matches_torch_forward_and_backward(affine, shape, normalized):
    device = runtime.init_runtime().device
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 2 - 1
    weight = torch.randn(normalized, generator=g) if affine else None
    bias = torch.randn(normalized, generator=g) if affine else None
    upstream = torch.randn(shape, generator=g)

    ref = _norm_and_grads(F.layer_norm, "cpu", x, normalized, weight, bias, upstream)
    ours = _norm_and_grads(layer_norm, device, x, normalized, weight, bias, upstream)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ref[1:], ours[1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_group_norm_dtype_is_torch_xlas_and_patch_is_scoped():
    """Under XLA autocast, as without it, F.group_norm's result has the promoted dtype of input, weight and
    bias (a bf16 activation through a GroupNorm module's fp32 weights gives fp32): ours gives the same."""
    device = runtime.init_runtime().device
    x = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    xx, w = x.to(device), torch.randn(8).to(device)
    with torch.autocast("xla", dtype=torch.bfloat16):
        refs = [F.group_norm(xx, 4), F.group_norm(xx, 4, w, w), F.group_norm(xx.float(), 4)]
        with xla_friendly_ops():
            assert F.group_norm is group_norm
            ours = [F.group_norm(xx, 4), F.group_norm(xx, 4, w, w), F.group_norm(xx.float(), 4)]
            on_cpu = F.group_norm(x, 4)  # other devices: torch's own
            assert F.layer_norm is layer_norm
            ln = [F.layer_norm(xx, (4,)), F.layer_norm(xx, (4,), w[:4], w[:4])]
        ln_ref = [F.layer_norm(xx, (4,)), F.layer_norm(xx, (4,), w[:4], w[:4])]
    assert F.group_norm is not group_norm and F.layer_norm is not layer_norm
    assert [t.dtype for t in ln] == [t.dtype for t in ln_ref] == [torch.bfloat16, torch.float32]
    assert [r.dtype for r in refs] == [o.dtype for o in ours] == [torch.bfloat16, torch.float32, torch.float32]
    for r, o in zip(refs, ours):
        torch.testing.assert_close(o.float().cpu(), r.float().cpu(), rtol=2e-2, atol=2e-2)  # bf16 rounding
    torch.testing.assert_close(on_cpu, F.group_norm(x, 4), rtol=0, atol=0)


@pytest.mark.parametrize("which,gathers", [("original", "some"), ("ours", "none")])
def test_norms_keep_a_split_batch_split(which, gathers, tmp_path):
    """Compiled on the 4-device mesh with the batch split: torch_xla's lowerings of F.group_norm and
    F.layer_norm all-gather the activations (GSPMD cannot split their batch norm along features); ours move
    no activation."""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4", "PYTHONPATH": ROOT,
           "XLA_FLAGS": with_xla_flags(hlo_dump_flags(str(tmp_path)))}
    proc = subprocess.run([sys.executable, "-m", "tests.collectives_worker", which, str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] >= 1
    assert (result["all_gathers"] > 0) == (gathers == "some"), result
