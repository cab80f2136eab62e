"""Tests for the offline tiny Stable Diffusion pipeline builder (CPU eager torch only)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from xla_diffusion.tiny import WORDS, build_tiny_pipeline, build_tokenizer

CAPTION = "a red circle on a blue background"


@pytest.fixture(scope="module")
def tiny_dir(tiny_pipeline: str) -> Path:
    """The session's seed-0 pipeline (tests/conftest.py)."""
    return Path(tiny_pipeline)


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout(tiny_dir: Path) -> None:
    files = {str(p) for p in _files(tiny_dir)}
    for expected in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert expected in files


def test_same_seed_is_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    again = Path(build_tiny_pipeline(str(tmp_path / "again"), seed=0))
    assert _files(again) == _files(tiny_dir)
    for rel in _files(tiny_dir):
        assert filecmp.cmp(tiny_dir / rel, again / rel, shallow=False), rel


def test_different_seed_changes_weights(tiny_dir: Path, tmp_path: Path) -> None:
    other = Path(build_tiny_pipeline(str(tmp_path / "other"), seed=1))
    rel = "unet/diffusion_pytorch_model.safetensors"
    assert not filecmp.cmp(tiny_dir / rel, other / rel, shallow=False)


def test_tokenizer_one_token_per_known_word() -> None:
    tok = build_tokenizer()
    for word in WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
    ids = tok(CAPTION).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in CAPTION.split()]
    # Unknown words fall back to characters instead of the unknown token.
    assert tok.unk_token_id not in tok("zebra 42, ok!").input_ids[1:-1]


def test_tokenizer_pads_to_max_length(tiny_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert tok.model_max_length == 16
    ids = tok(CAPTION, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 16 and ids[9:] == [tok.eos_token_id] * 7


@pytest.mark.usefixtures("single_thread_torch")
def test_from_pretrained_generates(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as sd_module
    import torch
    from diffusers import StableDiffusionPipeline

    # diffusers calls xm.mark_step() per step whenever torch_xla is installed; keep this pure eager CPU.
    monkeypatch.setattr(sd_module, "XLA_AVAILABLE", False)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length
    out = pipe(
        CAPTION,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3)
    latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)


def test_frozen_random_text_encoder_keeps_words_and_their_positions() -> None:
    """The property the demo's prompt adherence rests on (see build_text_encoder): the state at a word's
    position is about that word there, not washed out by the random blocks, and not about the other words
    (so held-out combinations give states seen in training)."""
    import torch
    import torch.nn.functional as F

    from data_prep.synthetic import caption
    from xla_diffusion.tiny import build_text_encoder

    tok = build_tokenizer()
    torch.manual_seed(0)
    encoder = build_text_encoder(tok)
    prompts = [caption("black", "circle", "red"), caption("red", "circle", "black"),
               caption("green", "square", "black")]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        h = encoder(ids).last_hidden_state  # (3, 16, 32); token 0 is BOS: the fg colour is at 2, the bg at 6
    # two colours in the same slot are far apart...
    assert F.cosine_similarity(h[0, 2], h[1, 2], dim=0) < 0.85
    assert F.cosine_similarity(h[0, 6], h[1, 6], dim=0) < 0.85
    # ...and one colour in one slot barely depends on the rest of the caption
    assert F.cosine_similarity(h[1, 6], h[2, 6], dim=0) > 0.98
