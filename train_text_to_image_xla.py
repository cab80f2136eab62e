#!/usr/bin/env python
"""Fine-tune a Stable Diffusion UNet with PyTorch/XLA SPMD.

Run the same command on every TPU host (no torchrun):

    python train_text_to_image_xla.py --pretrained_model_name_or_path=... --dataset_name=... \
        --train_batch_size=32 --mixed_precision=bf16 --output_dir=...

`--train_batch_size` is per host; the global batch is sharded over the whole device mesh.
"""

from __future__ import annotations

import sys

from xla_diffusion.cli import run_cli
from xla_diffusion.config import parse_args
from xla_diffusion.trainer import train


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))  # bad flags exit here with one error line, before any device work


if __name__ == "__main__":
    sys.exit(run_cli(main))
