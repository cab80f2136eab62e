"""Run in a fresh process with XLA's dump flags (XLA reads them at start-up): record and replay
tests/test_replay.py's step, per tensor or with flat state, and print as JSON which graph parameter each state
output of the compiled step is computed from, beside the aliasing and copies XLA compiled.

    python -m tests.replay_alias_worker per_tensor|flat DUMP_DIR
"""

from __future__ import annotations

import json
import sys

from tests.test_replay import _run
from xla_diffusion import hlo, runtime


def main() -> None:
    layout, dump_dir = sys.argv[1], sys.argv[2]
    rt = runtime.init_runtime(fsdp_size=2)
    _, _, replay, _ = _run(rt, enabled=True, flat=layout == "flat")
    rec = replay.recording
    param_of_state = {ref: n for n, (kind, ref) in enumerate(rec.sources) if kind == "state"}
    # the graph returns the state first, in `rec.order`: output j is the new value of state k = rec.order[j]
    own = {j: param_of_state[k] for j, k in enumerate(rec.order)}
    step = hlo.step_module(dump_dir)
    print(json.dumps({"own": own, "aliases": hlo.input_output_aliases(step.hlo_text),
                      "copy_bytes": hlo.entry_copy_bytes(step.hlo_text), "n_state": rec.n_state}))


if __name__ == "__main__":
    main()
