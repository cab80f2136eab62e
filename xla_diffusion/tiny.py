"""Build a tiny, randomly initialised Stable Diffusion pipeline folder fully offline.

The folder has the same layout as a real SD 1.x checkpoint (tokenizer, text_encoder, vae, unet,
scheduler, model_index.json), so every code path that loads SD with ``from_pretrained`` can be
exercised in seconds on CPU without downloading weights.

Usage: ``python -m xla_diffusion.tiny OUTPUT_DIR [--seed N]``
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .cli import OneLineParser, run_cli

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
EOW = "</w>"  # CLIP marks the last symbol of every word with this suffix.
MAX_LENGTH = 16

# Words that must each map to exactly one token; covers every caption of data_prep.synthetic.
WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "of", "in", "with", "background",
    "circle", "square", "triangle",
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple",
    "cyan", "magenta", "gray", "pink", "brown",
)  # fmt: skip

TEXT_HIDDEN_SIZE = 32
TEXT_EMBEDDING_SCALE = 50.0  # token embedding std 0.02 -> 1.0, position std 0.01 -> 0.5


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply CLIP's BPE to one word (same algorithm as ``CLIPTokenizer.bpe``)."""
    symbols = list(word[:-1]) + [word[-1] + EOW]
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab_and_merges(words: Iterable[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Make a minimal CLIP BPE vocab in which each of ``words`` is a single token.

    Merges are only ever appended, and a new merge has the lowest priority, so it can only fire
    once no older merge applies: words that already tokenise to one token are never disturbed.
    """
    # Single characters (plain and word-final) let any lowercase word, number or punctuation tokenise
    # without falling back to the unknown token, which CLIP aliases to <|endoftext|>.
    base = list(string.ascii_lowercase + string.digits + string.punctuation)
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    tokens = base + [c + EOW for c in base] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_tokenizer(words: Iterable[str] = WORDS) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over the hand-made vocab, padding with ``<|endoftext|>`` to 16 tokens."""
    vocab, merges = build_vocab_and_merges(words)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            # CLIPTokenizer skips the first line of merges.txt (a version header).
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(
            vocab_file,
            merges_file,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            model_max_length=MAX_LENGTH,
        )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """2-layer CLIP text encoder; last_hidden_state is (B, 16, 32)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        # eos_token_id != 2 makes CLIP pool at the first EOS id rather than the legacy argmax.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    # CLIP initialises embeddings with std 0.02 (tokens) and 0.01 (positions) while every residual block
    # adds O(1) updates (it reads LayerNorm-ed input), so a *frozen random* encoder washes the words out:
    # the states of "a black ..." and "a red ..." at the colour position have cosine 0.97. Unit-scale
    # embeddings keep each state about its own word and position (cosine 0.74 between the two colours,
    # ≥ 0.99 for one word in different contexts), so held-out word combinations map to states seen in
    # training. A real, trained CLIP does not need this.
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.mul_(TEXT_EMBEDDING_SCALE)
        model.text_model.embeddings.position_embedding.weight.mul_(TEXT_EMBEDDING_SCALE)
    return model


def build_vae() -> AutoencoderKL:
    """VAE with 4x spatial downsampling: image (B, 3, 64, 64) <-> latent (B, 4, 16, 16)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


UNET_PRESETS: dict[str, dict] = {
    # the test kit: the smallest UNet with cross-attention, cheap to compile
    "tiny": {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8,
    },
    # the demo's: cross-attention at both resolutions, so the prompt reaches the full-resolution features
    "demo": {
        "block_out_channels": (48, 96),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 16,
    },
}


def build_unet(preset: str = "tiny") -> UNet2DConditionModel:
    """UNet on latents (B, 4, 16, 16) conditioned on text states (B, 16, 32)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        norm_num_groups=8,
        **UNET_PRESETS[preset],
    )


def build_scheduler() -> DDPMScheduler:
    """DDPM noise schedule with Stable Diffusion 1.x training settings."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        steps_offset=1,
        clip_sample=False,
    )


def build_tiny_pipeline(output_dir: str, seed: int = 0, vae_dir: str | None = None, unet: str = "tiny") -> str:
    """Write a tiny random-weight ``StableDiffusionPipeline`` to ``output_dir`` and return it.

    Each module is constructed right after ``torch.manual_seed(seed)`` so its weights do not depend
    on the construction order of the others; the same seed gives byte-identical safetensors.
    """
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(tokenizer)
    torch.manual_seed(seed)
    # A trained VAE (xla_diffusion/tiny_vae.py) makes decoded samples meaningful; random init is enough
    # for every test of the training machinery.
    vae = AutoencoderKL.from_pretrained(vae_dir) if vae_dir else build_vae()
    torch.manual_seed(seed)
    unet_model = build_unet(unet)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet_model,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_dir", default=None, help="a trained tiny AutoencoderKL folder to use")
    parser.add_argument("--unet", default="tiny", choices=sorted(UNET_PRESETS))
    args = parser.parse_args(argv)
    print(build_tiny_pipeline(args.output_dir, seed=args.seed, vae_dir=args.vae_dir, unet=args.unet))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
