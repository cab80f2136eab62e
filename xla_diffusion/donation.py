"""The order in which a recorded step graph returns its state, so that XLA reuses each state buffer's memory for
that buffer's own new value (buffer donation), instead of copying.
"""

from __future__ import annotations

import logging

import torch

from . import runtime

log = logging.getLogger(__name__)


def donation_order(state_results: list[torch.Tensor], outputs: list[torch.Tensor], state_handles: list[int],
                   attempts: int = 4) -> list[int]:
    """The order in which the recorded graph should return the state's new values (`state_results`, aligned with
    the buffers of `state_handles`), so that XLA gives each state buffer's memory to that buffer's own new value.

    torch_xla only marks the donated inputs; XLA's OptimizeInputOutputBufferAlias pass then pairs donors with
    outputs of the same byte size, donors in parameter order against outputs in output order, ignoring which
    output is computed from which input. Paired wrongly (exp_avg's buffer given to exp_avg_sq's new value, say),
    XLA must copy both, every step: in the SD2-base-structured graph that was 1.2x the whole state per step
    (bench/donation.py). Returning the state in the order of its buffers' parameter numbers makes every pairing
    right, for any size classes. The parameter numbers follow the graph's traversal from its roots, so the order
    is found by iterating: sort by the numbers, trace again, until they come out increasing. Returns positions into
    `state_results`; the identity when the graph does not read every state buffer or no order settles."""
    order = list(range(len(state_results)))
    for _attempt in range(attempts):
        _, values = runtime.graph_inputs([state_results[k] for k in order] + outputs)
        number = {h: n for n, h in enumerate(runtime.buffer_handles(values))}
        numbers = [number.get(state_handles[k]) for k in order]
        if None in numbers:
            break
        if all(a < b for a, b in zip(numbers, numbers[1:])):
            return order
        order = [k for _, k in sorted(zip(numbers, order))]
    log.debug("donation_order: no order of the state's outputs matches its parameter order")
    return list(range(len(state_results)))
