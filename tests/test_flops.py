"""FLOP counts against hand counts, the MFU arithmetic and the TPU device-kind table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from xla_diffusion.flops import (
    PEAK_BF16_TFLOPS,
    StepFlops,
    count_flops,
    count_text_encoder_flops,
    count_train_flops,
    count_unet_flops,
    count_vae_encoder_flops,
    images_per_s_per_chip,
    mfu,
    peak_tflops,
    tpu_generation,
)
from xla_diffusion.tiny import TEXT_HIDDEN_SIZE, build_unet, build_vae


def _fwd_bwd(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    out = []
    fwd = count_flops(lambda: out.append(module(*inputs)))
    bwd = count_flops(lambda: out[0].backward(torch.ones_like(out[0])))
    return fwd, bwd


def _meta(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, device="meta", requires_grad=grad)


# --- hand counts: 2 FLOPs per multiply-accumulate; backward = grad-input + grad-weight, each one forward ---


def test_linear_matches_hand_count():
    b, n_in, n_out = 6, 16, 24
    with torch.device("meta"):
        layer = nn.Linear(n_in, n_out)
    fwd, bwd = _fwd_bwd(layer, _meta(b, n_in, grad=True))
    assert fwd == 2 * b * n_in * n_out
    assert bwd == 2 * fwd  # d(input) and d(weight), each a matmul of the forward's size
    # a frozen input (data, text states) needs no input gradient: the weight gradient alone
    _, bwd_data = _fwd_bwd(layer, _meta(b, n_in))
    assert bwd_data == fwd


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_matches_hand_count(stride):
    b, c_in, c_out, k, hw = 2, 8, 12, 3, 16
    with torch.device("meta"):
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=1)
    fwd, bwd = _fwd_bwd(conv, _meta(b, c_in, hw, hw, grad=True))
    out_hw = hw // stride
    assert fwd == 2 * b * c_out * c_in * k * k * out_hw * out_hw
    assert bwd == 2 * fwd


def test_diffusers_attention_block_matches_hand_count():
    """Self-attention with q/k/v/out projections: 4 projections + Q·Kᵀ and P·V."""
    b, s, dim, heads, head_dim = 2, 20, 32, 4, 8
    inner = heads * head_dim
    with torch.device("meta"):
        attn = Attention(query_dim=dim, heads=heads, dim_head=head_dim)
    fwd, bwd = _fwd_bwd(attn, _meta(b, s, dim, grad=True))
    projections = 4 * 2 * b * s * dim * inner
    scores_and_mix = 2 * (2 * b * heads * s * s * head_dim)
    assert fwd == projections + scores_and_mix
    assert bwd == 2 * fwd  # matmul backward: 2 of the forward's size per matmul (4 for the two attention bmms)


def test_cross_attention_matches_hand_count():
    b, s, n_text, dim, ctx, heads, head_dim = 2, 16, 7, 32, 24, 2, 16
    inner = heads * head_dim
    with torch.device("meta"):
        attn = Attention(query_dim=dim, cross_attention_dim=ctx, heads=heads, dim_head=head_dim)
    states = _meta(b, n_text, ctx)  # frozen text states: no gradient
    fwd, bwd = _fwd_bwd(lambda x: attn(x, encoder_hidden_states=states), _meta(b, s, dim, grad=True))
    q_out = 2 * (2 * b * s * dim * inner)
    k_v = 2 * (2 * b * n_text * ctx * inner)
    mix = 2 * (2 * b * heads * s * n_text * head_dim)
    assert fwd == q_out + k_v + mix
    assert bwd == 2 * q_out + k_v + 2 * mix  # k/v projections: weight gradients only


def test_resnet_block_matches_hand_count():
    b, c_in, c_out, hw, temb = 2, 16, 32, 8, 64
    with torch.device("meta"):
        block = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=temb, groups=8)
    fwd = count_flops(lambda: block(_meta(b, c_in, hw, hw), _meta(b, temb)))
    conv1 = 2 * b * c_out * c_in * 9 * hw * hw
    conv2 = 2 * b * c_out * c_out * 9 * hw * hw
    time_proj = 2 * b * temb * c_out
    shortcut = 2 * b * c_out * c_in * hw * hw  # 1x1 conv, since c_in != c_out
    assert fwd == conv1 + conv2 + time_proj + shortcut


def test_attention_is_counted_on_cpu_tensors_too():
    """The fused CPU attention kernel has no FLOP formula; count_flops must still see the two matmuls."""
    q = k = v = torch.randn(1, 2, 8, 4)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * 1 * 2 * 8 * 8 * 4)


# --- whole models ---


def test_text_encoder_matches_hand_count():
    d, inner, layers, heads, length, b, proj = 32, 64, 2, 2, 16, 3, 24
    config = {
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": d,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": length,
        "projection_dim": proj,
    }
    per_layer = 2 * b * length * (4 * d * d + 2 * d * inner) + 2 * (2 * b * length * length * d)
    assert count_text_encoder_flops(config, b, length) == layers * per_layer + 2 * b * d * proj
    plain = dict(config, architectures=["CLIPTextModel"])  # no projection head
    assert count_text_encoder_flops(plain, b, length) == layers * per_layer


@pytest.fixture(scope="module")
def tiny_unet():
    return build_unet("tiny")


def test_unet_count_is_positive_and_linear_in_batch(tiny_unet):
    latent, text = (4, 16, 16), (16, TEXT_HIDDEN_SIZE)
    fwd1, bwd1 = count_unet_flops(tiny_unet.config, 1, latent, text)
    fwd3, bwd3 = count_unet_flops(tiny_unet.config, 3, latent, text)
    assert fwd1 > 0 and bwd1 > 0
    assert (fwd3, bwd3) == (3 * fwd1, 3 * bwd1)
    # No input gradient for the noisy latents (conv_in) or the text states (to_k/to_v): under 2x forward.
    assert fwd1 < bwd1 < 2 * fwd1


def test_unet_count_grows_with_latent_area(tiny_unet):
    small, _ = count_unet_flops(tiny_unet.config, 1, (4, 16, 16), (16, TEXT_HIDDEN_SIZE))
    large, _ = count_unet_flops(tiny_unet.config, 1, (4, 32, 32), (16, TEXT_HIDDEN_SIZE))
    # Convolutions and projections scale with the area (4x); self-attention grows faster.
    assert large > 4 * small


def test_counting_leaves_the_trained_unet_untouched(tiny_unet):
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    count_train_flops(tiny_unet.config, batch=2, resolution=64, text_len=16, vae_scale_factor=4)
    assert all(p.device.type == "cpu" and p.grad is None for p in tiny_unet.parameters())
    after = tiny_unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sdxl_style_added_conditions_are_counted():
    config = dict(
        build_unet("tiny").config,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=20 + 6 * 8,  # pooled text 20 + six time ids
    )
    fwd, _ = count_unet_flops(config, 2, (4, 16, 16), (16, TEXT_HIDDEN_SIZE))
    plain, _ = count_unet_flops(build_unet("tiny").config, 2, (4, 16, 16), (16, TEXT_HIDDEN_SIZE))
    time_embed_dim = 4 * 32  # block_out_channels[0] * 4
    add_embedding = 2 * 2 * (20 + 6 * 8) * time_embed_dim + 2 * 2 * time_embed_dim * time_embed_dim
    assert fwd == plain + add_embedding


def test_train_flops_add_up_and_encoders_are_optional(tiny_unet):
    vae = build_vae()
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": 16}  # fmt: skip
    with_encoders = count_train_flops(
        tiny_unet.config, batch=4, resolution=64, text_len=16, vae_config=vae.config, text_configs=[text]
    )
    latents_only = count_train_flops(tiny_unet.config, batch=4, resolution=64, text_len=16, vae_scale_factor=4)
    assert latents_only.encoders == 0
    assert (with_encoders.unet_fwd, with_encoders.unet_bwd) == (latents_only.unet_fwd, latents_only.unet_bwd)
    assert with_encoders.vae_enc == count_vae_encoder_flops(vae.config, 4, (3, 64, 64)) > 0
    assert with_encoders.text_enc == count_text_encoder_flops(text, 4, 16) > 0
    assert with_encoders.total == latents_only.total + with_encoders.vae_enc + with_encoders.text_enc
    assert with_encoders.per_image == with_encoders.total / 4


def test_train_flops_needs_the_latent_scale():
    with pytest.raises(ValueError, match="vae_scale_factor"):
        count_train_flops(build_unet("tiny").config, batch=1, resolution=64)
    with pytest.raises(ValueError, match="contradicts"):
        count_train_flops(build_unet("tiny").config, batch=1, resolution=64, vae_config=build_vae().config,
                          vae_scale_factor=8)  # fmt: skip


def test_step_flops_arithmetic():
    s = StepFlops(batch=4, unet_fwd=100, unet_bwd=180, vae_enc=50, text_enc=10)
    assert (s.unet_train, s.encoders, s.total, s.per_image) == (280, 60, 340, 85.0)
    d = StepFlops(batch=4, unet_fwd=100, unet_bwd=180, vae_enc=50, text_enc=10, unet_dream=100)
    assert (d.unet_train, d.total) == (380, 440)


def test_dream_adds_one_unet_forward():
    """--dream_training's estimate is one more forward of the same UNet on the same shapes, without backward."""
    config = build_unet("tiny").config
    plain = count_train_flops(config, batch=2, resolution=64, text_len=16, vae_scale_factor=4)
    dream = count_train_flops(config, batch=2, resolution=64, text_len=16, vae_scale_factor=4, dream=True)
    assert plain.unet_dream == 0 and dream.unet_dream == plain.unet_fwd > 0
    assert dream.total == plain.total + plain.unet_fwd


# --- MFU and peaks ---


def test_mfu_arithmetic():
    # 1e15 FLOPs in 2 s on 4 chips of 250 TFLOP/s = 0.5e15 FLOP/s over 1e15 FLOP/s peak
    assert mfu(1e15, 2.0, 4, 250.0) == pytest.approx(0.5)
    assert mfu(3.0e14, 0.1, 8, 459.0) == pytest.approx(3.0e15 / (8 * 459e12))
    for bad in [(-1.0, 1.0, 1, 1.0), (1.0, 0.0, 1, 1.0), (1.0, 1.0, 0, 1.0), (1.0, 1.0, 1, 0.0)]:
        with pytest.raises(ValueError):
            mfu(*bad)


def test_images_per_s_inverts_mfu():
    per_image = 3.1e12
    rate = images_per_s_per_chip(per_image, 459.0, 0.4)
    assert rate == pytest.approx(0.4 * 459e12 / per_image)
    # 1 chip doing `rate` images/s, each per_image FLOPs, for one second: MFU 40% back
    assert mfu(per_image * rate, 1.0, 1, 459.0) == pytest.approx(0.4)


def test_peak_table_values_from_the_cloud_tpu_docs():
    assert PEAK_BF16_TFLOPS == {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5e", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v5p", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("TPU v6e", "v6e"),
        ("v5litepod-16", "v5e"),
        ("v5p-128", "v5p"),
        ("v6e-8", "v6e"),
        ("v4-8", "v4"),
        ("  tpu V5 LITE ", "v5e"),
        ("TPU v4 lite", None),
        ("TPU v3", None),
        ("TPU7x", None),
        ("CPU", None),
        ("cpu", None),
        ("NVIDIA H100 80GB HBM3", None),
        ("", None),
    ],
)
def test_device_kind_mapping(kind, key):
    assert tpu_generation(kind) == key
    assert peak_tflops(kind) == (None if key is None else PEAK_BF16_TFLOPS[key])
