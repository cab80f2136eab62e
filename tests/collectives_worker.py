"""Run in a fresh process (XLA reads its dump flags at start-up): a GroupNorm and a LayerNorm forward and
backward on a batch split over the 4-device mesh, through torch's F.group_norm / F.layer_norm or
xla_ops.group_norm / layer_norm; prints the all-gathers of the compiled graph as JSON.

    python -m tests.collectives_worker original|ours DUMP_DIR
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from xla_diffusion import hlo, runtime
from xla_diffusion.xla_ops import group_norm, layer_norm


def main() -> None:
    which, dump_dir = sys.argv[1], sys.argv[2]
    rt = runtime.init_runtime()
    g = torch.Generator().manual_seed(0)
    x = runtime.to_mesh(torch.randn(16, 32, 8, 8, generator=g), rt.mesh).requires_grad_(True)
    weight = torch.randn(32, generator=g).to(rt.device).requires_grad_(True)
    bias = torch.randn(32, generator=g).to(rt.device).requires_grad_(True)
    gn, ln = (F.group_norm, F.layer_norm) if which == "original" else (group_norm, layer_norm)
    y = gn(x, 8, weight, bias, 1e-5)
    tokens = y.flatten(2).transpose(1, 2)  # (B, 64 tokens, 32 channels), as a transformer block sees it
    z = ln(tokens, (32,), weight, bias, 1e-5)
    (z * z).sum().backward()
    runtime.sync()
    runtime.wait_device_ops()
    counts = [hlo.count_collectives(m.hlo_text)["all-gather"].count for m in hlo.read_hlo_dump(dump_dir)]
    print(json.dumps({"all_gathers": sum(counts), "modules": len(counts)}))


if __name__ == "__main__":
    main()
