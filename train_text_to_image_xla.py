#!/usr/bin/env python
"""Fine-tune a Stable Diffusion UNet with PyTorch/XLA SPMD.

Run the same command on every TPU host (no torchrun):

    python train_text_to_image_xla.py --pretrained_model_name_or_path=... --dataset_name=... \
        --train_batch_size=32 --mixed_precision=bf16 --output_dir=...

`--train_batch_size` is per host; the global batch is sharded over the whole device mesh.
"""

from __future__ import annotations

import logging
import sys

from xla_diffusion.config import ConfigError, parse_args
from xla_diffusion.models import ModelLoadError
from xla_diffusion.trainer import TooManyCompilations, train


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)  # bad flags exit here, before any device work
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train(cfg)
    except (ConfigError, ModelLoadError, TooManyCompilations) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
