"""The broadcast nearest-upsample equals F.interpolate, forward and backward."""

import torch
import torch.nn.functional as F

from xla_diffusion.xla_ops import nearest_upsample, nearest_upsample_as_broadcast


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
