"""The trainer CLI with AdamW's state left to its first step, as before priming (`state.prime_optimizer`): step 1
then compiles a graph of its own and step 2 the steady one. A real recompilation for the --max_compilations
test, now that a clean run compiles one graph."""

from __future__ import annotations

import sys

from train_text_to_image_xla import main
from xla_diffusion import state
from xla_diffusion.cli import run_cli

if __name__ == "__main__":
    state.prime_optimizer = lambda optimizer: None
    sys.exit(run_cli(main))
