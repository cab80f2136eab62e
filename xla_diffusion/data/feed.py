"""The trainer's end of the data stream: the position after the batches the step CONSUMED, not the ones the
loader workers and the device loader have prefetched, and one clear error when the stream breaks.

Every training source has `iter_from(position)` yielding `(host batch, meta)`: `meta["index"]` is the host
batch index, and a latent-shard source adds the worker that made the batch and that worker's cursor after it
(data.latents). The device loader iterates the feed in its own thread; the feed passes the batches on and
queues their metas in the same order (the loader keeps the order), and `take` pops one meta per batch the
step takes. `position` is then exactly what a checkpoint must save: resuming builds the source again and
starts it at that position, with no batch replayed.
"""

from __future__ import annotations

import collections
import copy
import re
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import DataError, UserError


def fresh_position() -> dict[str, Any]:
    """The position of a stream that has not started: no batch consumed, every worker at its start."""
    return {"batches": 0, "workers": {}, "skipped": {}}


class DataFeed:
    """Host batches for the device loader (iterate it) and the consumed position (`take`, `position`).

    `position`: where to start (from a checkpoint), or None for the start. `position["skipped"]` counts the
    samples skipped so far, by reason, in the batches consumed (it carries over a resume)."""

    def __init__(self, source: Any, position: dict[str, Any] | None = None):
        self.source, self.ndims = source, source.ndims
        self.position = copy.deepcopy(position) if position else fresh_position()
        self._start = copy.deepcopy(self.position)
        self._metas: collections.deque[dict[str, Any]] = collections.deque()
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Runs in the device loader's thread: an exception here would end that thread with a traceback on
        stderr and leave the trainer with a silently ended stream, so it is kept for `take` to report."""
        try:
            for batch, meta in self.source.iter_from(self._start):
                self._metas.append(meta)
                yield batch
        except Exception as e:  # noqa: BLE001 (reported by take() as one line)
            self._error = e

    def take(self, loader: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The next device batch from `loader` (the device loader over this feed); records it as consumed.
        Raises DataError (one line naming the cause) when the stream has failed or ended."""
        if self._error is not None:
            raise DataError(f"the data loader stopped: {cause(self._error)}")
        try:
            batch = next(loader)
        except StopIteration:
            why = cause(self._error) if self._error is not None else "the stream ended (it should never end)"
            raise DataError(f"the data loader stopped: {why}") from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (the device loader's transfer thread re-raises here)
            raise DataError(f"the data loader stopped: {cause(e)}") from None
        meta = self._metas.popleft()
        pos = self.position
        if meta["index"] != pos["batches"]:
            raise DataError(f"the data stream delivered batch {meta['index']} where batch {pos['batches']} was due")
        pos["batches"] += 1
        if "worker" in meta:
            pos["workers"][str(meta["worker"])] = list(meta["cursor"])
            pos["workers_count"] = meta["workers_count"]
        skipped = pos["skipped"]
        for reason, n in meta.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
        return batch


_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w]*\.)+([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): ")


def cause(e: BaseException) -> str:
    """An exception of the data pipeline as one line. A DataLoader worker's exception comes back in the main
    process with the worker's traceback in its message: the line that matters is its last one."""
    text = str(e).strip()
    if isinstance(e, UserError) and "\n" not in text:
        return text
    if "Original Traceback" in text:
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return _QUALIFIED.sub(r"\1: ", last)[:500]
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__
