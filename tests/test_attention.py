"""enable_flash_attention: the CPU fallback, and the processors it installs in a TPU-like setting.

diffusers builds ``XLAFlashAttnProcessor2_0`` without a TPU (its constructor only checks the torch_xla
version and whether SPMD is on), so the TPU branch is checked offline up to the kernel call itself.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, XLAFlashAttnProcessor2_0

from xla_diffusion.attention import enable_flash_attention
from xla_diffusion.tiny import TEXT_HIDDEN_SIZE, build_unet


@pytest.fixture(autouse=True)
def fresh_diffusers_logger():
    """The once-only filter lives on a process-wide logger: start and end each test without it."""
    logger = logging.getLogger("diffusers.models.attention_processor")
    for f in list(logger.filters):
        logger.removeFilter(f)
    yield
    for f in list(logger.filters):
        logger.removeFilter(f)


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return build_unet("tiny")


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 16, TEXT_HIDDEN_SIZE, generator=g))  # fmt: skip


def test_cpu_warns_once_and_keeps_standard_attention(unet, caplog):
    before = dict(unet.attn_processors)
    assert before and all(isinstance(p, AttnProcessor2_0) for p in before.values())
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.attention"):
        installed = enable_flash_attention(unet, on_tpu=False, batch_partition_spec="data")
    assert installed is False
    lines = [r for r in caplog.records if r.name == "xla_diffusion.attention"]
    assert len(lines) == 1 and "TPU" in lines[0].getMessage()
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # the very same processor objects


@pytest.mark.parametrize(
    ("batch_spec", "expected"),
    [("data", ("data", None, None, None)),
     (("data", "fsdp"), (("data", "fsdp"), None, None, None)),
     (None, None)],
)  # fmt: skip
def test_tpu_installs_xla_flash_processors_with_the_batch_spec(unet, batch_spec, expected):
    names = set(unet.attn_processors)
    assert enable_flash_attention(unet, on_tpu=True, batch_partition_spec=batch_spec) is True
    processors = unet.attn_processors
    assert set(processors) == names  # every attention layer, self and cross
    assert all(isinstance(p, XLAFlashAttnProcessor2_0) for p in processors.values())
    assert all(p.partition_spec == expected for p in processors.values())


def test_short_sequences_fall_back_to_the_same_attention_and_warn_once(unet):
    """The tiny UNet's sequences are far below the kernel's 4096 tokens, so the installed processor runs
    scaled_dot_product_attention on CPU: same output, and diffusers' per-call warning shows once."""
    sample, t, text = _inputs()
    with torch.no_grad():
        reference = unet(sample, t, text).sample
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers.models.attention_processor")
    diffusers_logger.addHandler(handler)
    try:
        enable_flash_attention(unet, on_tpu=True, batch_partition_spec="data")
        with torch.no_grad():
            first = unet(sample, t, text).sample
            second = unet(sample, t, text).sample
    finally:
        diffusers_logger.removeHandler(handler)
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)
    fallbacks = [r for r in records if "flash attention pallas kernel" in r.getMessage()]
    assert len(fallbacks) == 1  # unfiltered: once per attention call, 2 forwards x 8 layers
