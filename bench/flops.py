"""Training FLOPs per image for SD1.5, SD2-base, SD2 and SDXL, and a projection of images/s per TPU chip.

Every UNet, VAE and text encoder is built from its published config (embedded below: the architecture
fields of each hub repo's ``*/config.json``) on the meta device, so nothing is downloaded, allocated or
computed; ``xla_diffusion.flops`` counts the matmul and convolution FLOPs of the real diffusers and
transformers forward and autograd backward at batch 1 (the count is linear in the batch). Prints two
markdown tables: the work per training image, then a projection of images/s per chip at assumed MFUs.

    .venv/bin/python bench/flops.py [--projection_model SD2-base]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CROSS_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_CROSS_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _CROSS_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _CROSS_UP,
}
# stabilityai/stable-diffusion-2-base unet/config.json: OpenCLIP-H states (1024), 64-dim heads, linear proj.
SD2_BASE_UNET: dict[str, Any] = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-2 unet/config.json: the 768 px v-prediction model.
SD2_UNET: dict[str, Any] = {**SD2_BASE_UNET, "sample_size": 96, "upcast_attention": True}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def _vae(sample_size: int, **extra: Any) -> dict[str, Any]:
    """The SD-family AutoencoderKL (vae/config.json); only sample_size and the scaling factor differ."""
    return {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        **extra,
    }


# text_encoder/config.json of SD1.5 and SDXL (OpenAI CLIP ViT-L/14 text tower)
CLIP_L: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# text_encoder/config.json of SD2 and SD2-base (OpenCLIP ViT-H/14 text tower, last of its 24 layers dropped)
OPENCLIP_H: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "vocab_size": 49408,
}
# SDXL text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower, with its projection for text_embeds)
OPENCLIP_BIGG: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}


@dataclass(frozen=True)
class Model:
    name: str
    repo: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]


MODELS: tuple[Model, ...] = (
    Model("SD1.5", "runwayml/stable-diffusion-v1-5", 512, SD15_UNET, _vae(512), (CLIP_L,)),
    Model("SD2-base", "stabilityai/stable-diffusion-2-base", 512, SD2_BASE_UNET, _vae(512), (OPENCLIP_H,)),
    Model("SD2", "stabilityai/stable-diffusion-2", 768, SD2_UNET, _vae(768), (OPENCLIP_H,)),
    Model(
        "SDXL",
        "stabilityai/stable-diffusion-xl-base-1.0",
        1024,
        SDXL_UNET,
        _vae(1024, force_upcast=True, scaling_factor=0.13025),
        (CLIP_L, OPENCLIP_BIGG),
    ),
)
TEXT_LEN = 77  # SD's CLIP tokenizers pad every caption to 77 tokens

# Throughput anchors, images/s per v5p chip on SD2-base at 512 px, as the project's issue states them.
ANCHORS: tuple[tuple[str, float], ...] = (
    ("MaxDiffusion (MLPerf Training v4.1)", 86.0),
    ("diffusers PyTorch/XLA example, encoders in the step", 63.0),
)
MFUS = (0.30, 0.40, 0.50)
PROJECTED_CHIPS = ("v5e", "v5p", "v6e")


def parameter_counts(model: Model) -> tuple[int, int, int]:
    """(UNet, VAE encoder incl. quant_conv, text encoders) parameters, from meta-device builds."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(model.unet)
        vae = AutoencoderKL.from_config(model.vae)
        texts = []
        for cfg in model.text_encoders:
            fields = {k: v for k, v in cfg.items() if k != "model_type"}
            config = AutoConfig.for_model(cfg["model_type"], **fields)
            texts.append(getattr(transformers, cfg["architectures"][0])(config))
    vae_encoder = count(vae.encoder) + (count(vae.quant_conv) if vae.quant_conv is not None else 0)
    return count(unet), vae_encoder, sum(count(t) for t in texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--projection_model", default="SD2-base", choices=[m.name for m in MODELS],
                   help="the model of the per-chip projection table (the anchors are SD2-base, 512 px)")  # fmt: skip
    args = p.parse_args()

    from xla_diffusion.flops import PEAK_BF16_TFLOPS, count_train_flops, images_per_s_per_chip

    counts = {}
    for m in MODELS:
        print(f"  counting {m.name} ...", file=sys.stderr, flush=True)
        step = count_train_flops(
            m.unet, batch=1, resolution=m.resolution, text_len=TEXT_LEN, vae_config=m.vae, text_configs=m.text_encoders
        )
        counts[m.name] = (step, parameter_counts(m))

    g = 1e9
    print(f"command: python bench/flops.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    print()
    print(f"Training FLOPs per image (GFLOP; matmuls + convolutions, 2 per MAC; text {TEXT_LEN} tokens; "
          "backward = UNet weight grads + the input grads autograd needs)")  # fmt: skip
    print()
    print("| model | image px | latent | UNet params | UNet fwd | UNet fwd+bwd | VAE enc (params) | "
          "text enc (params) | step, encoders in it | share pre-encoding removes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        step, (unet_params, vae_params, text_params) = counts[m.name]
        side = m.resolution // 8
        share = step.encoders / step.total
        print(
            f"| {m.name} | {m.resolution} | 4×{side}×{side} | {unet_params / 1e6:,.1f}M | {step.unet_fwd / g:,.1f} | "
            f"{step.unet_train / g:,.1f} | {step.vae_enc / g:,.1f} ({vae_params / 1e6:,.1f}M) | "
            f"{step.text_enc / g:,.1f} ({text_params / 1e6:,.1f}M) | {step.total / g:,.1f} | {share:.1%} |"
        )

    step, _ = counts[args.projection_model]
    model = next(m for m in MODELS if m.name == args.projection_model)
    paths = (("latents (UNet only)", step.unet_train), ("encoders in the step", step.total))
    print()
    print(f"PROJECTION, not a measurement: images/s per chip = MFU × peak bf16 / FLOPs per image, "
          f"{model.name} at {model.resolution} px, FLOPs from the table above")  # fmt: skip
    print()
    header = " | ".join(f"{label}, MFU {u:.0%}" for label, _ in paths for u in MFUS)
    print(f"| chip | peak bf16 TFLOP/s | {header} |")
    print("|---|---|" + "---|" * (len(paths) * len(MFUS)))
    for chip in PROJECTED_CHIPS:
        peak = PEAK_BF16_TFLOPS[chip]
        cells = " | ".join(f"{images_per_s_per_chip(f, peak, u):.0f}" for _, f in paths for u in MFUS)
        print(f"| {chip} | {peak:.0f} | {cells} |")
    if model.name == "SD2-base":
        peak = PEAK_BF16_TFLOPS["v5p"]
        compositions = (
            ("UNet only", step.unet_train),
            ("UNet + text encoder", step.unet_train + step.text_enc),
            ("UNet + VAE + text encoder", step.total),
        )
        print()
        print("Anchors (v5p, SD2-base 512 px) and the MFU they imply under these FLOP counts, for each "
              "possible content of their step:")  # fmt: skip
        print()
        print("| anchor | images/s per v5p chip | " + " | ".join(f"MFU if {c}" for c, _ in compositions) + " |")
        print("|---|---|" + "---|" * len(compositions))
        for label, rate in ANCHORS:
            cells = " | ".join(f"{rate * f / (peak * 1e12):.1%}" for _, f in compositions)
            print(f"| {label} | {rate:.0f} | {cells} |")


if __name__ == "__main__":
    main()
