"""Flash attention on TPU: diffusers' Pallas-kernel attention processor, installed on a plain UNet.

diffusers' ``XLAFlashAttnProcessor2_0`` (0.35) sends q, k, v of (B, heads, S, head_dim) to torch_xla's
flash-attention kernel only when all three have at least 4096 tokens; every other call (cross-attention
on 77 text tokens, the lower-resolution levels) runs ``scaled_dot_product_attention`` as before. At
512 px that is the self-attention of the 64×64 level only. Each such fallback logs a warning from diffusers
on every call, and a lazy-tensor training loop calls the forward once per step, so it is let through once.
"""

from __future__ import annotations

import logging

from diffusers import ModelMixin

log = logging.getLogger(__name__)

# diffusers' logger for the processor and the start of the message it logs on every fallback call.
_DIFFUSERS_PROCESSOR_LOGGER = "diffusers.models.attention_processor"
_FALLBACK_MESSAGE = "Unable to use the flash attention pallas kernel"


class _OnceFilter(logging.Filter):
    """Passes the first record that starts with ``prefix`` and drops the later ones; others pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _fallback_warning_once() -> None:
    logger = logging.getLogger(_DIFFUSERS_PROCESSOR_LOGGER)
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter(_FALLBACK_MESSAGE))


def enable_flash_attention(unet: ModelMixin, on_tpu: bool, batch_partition_spec: str | tuple[str, ...] | None) -> bool:
    """Install the XLA flash-attention processor on every attention layer of ``unet`` when on TPU.

    Args:
        unet: a diffusers model (``UNet2DConditionModel``), before it is sharded or compiled.
        on_tpu: whether the XLA device is a TPU (the Pallas kernel exists only there).
        batch_partition_spec: the mesh axis, or tuple of axes, that shard the batch dimension (e.g. "data"
            or ("data", "fsdp")); None when the run is not SPMD. The kernel's q, k, v are
            (B, heads, S, head_dim), so its partition spec is (batch axes, None, None, None).

    Returns:
        True if the processors were installed. Off TPU, logs one warning and leaves the standard
        attention (``AttnProcessor2_0``) in place.
    """
    if not on_tpu:
        log.warning("flash attention needs a TPU; keeping the standard attention (scaled_dot_product_attention)")
        return False
    spec = None if batch_partition_spec is None else (batch_partition_spec, None, None, None)
    unet.enable_xla_flash_attention(partition_spec=spec)
    _fallback_warning_once()
    return True
