"""The checkpoint store of one run: `Checkpointer` writes the device state of every process (asynchronously,
local or `gs://`), marks a checkpoint complete, applies retention, and restores into a placed state in place.
The layout it writes and what makes a checkpoint complete are in `checkpoint.py`.

Saving is asynchronous: `Checkpointer.save` blocks only while the device state is copied to host memory
(shard by shard, nothing gathered), then a background thread writes the files, the host states and the
marker, and applies retention. `wait()` blocks until the checkpoint is durable and reports a failed
save as one `CheckpointError` line.

Restoring is in place: the caller builds the model and optimizer as for a fresh run (placed and sharded on
the mesh), `optim.prime_optimizer` creates the optimizer state to load into, and `Checkpointer.restore` checks the
config fingerprint and the tensor names/shapes/dtypes against the checkpoint's index (one error line on a
mismatch) before the distributed load reads each process's chunks into its device tensors. The load
reshards: a checkpoint written on 4 devices loads on 1 device, or with another sharding, since every
process reads exactly the chunks that overlap its shards.

Every function that touches torch_xla goes through `xla_diffusion.runtime`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from . import fsio, runtime
from .checkpoint import (
    FORMAT_VERSION,
    MARKER,
    CheckpointError,
    CheckpointInfo,
    check_fingerprint,
    checkpoints_root,
    error_line,
    file_sizes,
    flat_tensors,
    host_state_name,
    list_checkpoints,
    read_dcp_metadata,
    step_dir,
    verify,
)

log = logging.getLogger(__name__)


class Checkpointer:
    """Writes and restores the checkpoints of one run, from every process of the job (each process builds
    its own Checkpointer with the same arguments and calls the same methods at the same steps: the
    writes and loads are collective).

    `total_limit`: keep at most this many complete checkpoints (None or 0: keep all); the one just written
    always counts, so retention never removes the only complete checkpoint.
    `process_group`: a gloo group over all processes (default: `runtime.checkpoint_process_group()`).
    `asynchronous`: write in a background thread (the caller is blocked only for the host copy).
    `mesh`: the training mesh. A restore on an identical mesh gives every tensor back the sharding it had when
    saved (bitwise-exact resume); on another mesh (other device count, shape or axes) tensors keep the
    shardings the new run gave them and the load reshards.
    """

    def __init__(
        self,
        output_dir: str,
        total_limit: int | None = None,
        process_group: object | None = None,
        asynchronous: bool = True,
        mesh: object | None = None,
    ):
        import torch.distributed as dist

        if total_limit is not None and total_limit < 0:
            raise ValueError(f"--checkpoints_total_limit must be >= 0, got {total_limit}")
        self.output_dir = output_dir
        self.root = checkpoints_root(output_dir)
        self.total_limit = total_limit or None
        self.asynchronous = asynchronous
        self.mesh_description = runtime.describe_mesh(mesh)
        self.group = process_group if process_group is not None else runtime.checkpoint_process_group()
        self.process_index = dist.get_rank(self.group)
        self.process_count = dist.get_world_size(self.group)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None
        self._pending_path: str | None = None
        self._lock = threading.Lock()
        self.last_save_seconds: dict[str, float] = {}  # timings of the last finished save (for the bench)
        runtime.quiet_checkpoint_warnings()
        self._probe_writable()

    # ------------------------------------------------------------------------------------- save

    def save(self, step: int, state: Mapping[str, Any], host_state: Mapping[str, Any],
             fingerprint: Mapping[str, Any]) -> str:
        """Start writing the checkpoint of global step `step`; returns its directory.

        `state`: nested dict of device tensors (e.g. `training_state(...)`); `host_state`: this process's
        JSON-able host state; `fingerprint`: `config_fingerprint(...)`. Blocks until a previous save has
        finished (raising its CheckpointError if it failed) and while the tensors are copied to host
        memory; the files are then written in the background (or before returning when not asynchronous).
        Call only at checkpoint steps: the host copy waits for the device.
        """
        self.wait()
        path = step_dir(self.output_dir, step)
        try:
            host_json = json.dumps(
                {"format": FORMAT_VERSION, "step": step, "process_index": self.process_index,
                 "process_count": self.process_count, "fingerprint": dict(fingerprint), "state": dict(host_state)},
                indent=1, sort_keys=True,
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the host state of step {step} is not JSON: {error_line(e)}") from None
        # The device layout of every tensor, restored with it on the same mesh: after a step, GSPMD's
        # propagation may have re-sharded tensors that were never annotated, and a resumed step only runs
        # the very graph of an uninterrupted one (same numerics, no new compilation) on the same layout.
        layout = {"mesh": self.mesh_description,
                  "shardings": {k: runtime.sharding_spec_string(t) for k, t in flat_tensors(state).items()}}
        t0 = time.perf_counter()
        host = runtime.host_copy_for_checkpoint(dict(state))
        stall = time.perf_counter() - t0
        timings = {"host_copy": stall}
        if not self.asynchronous:
            self._write(step, path, host, host_json, dict(fingerprint), layout, timings)
            return path
        with self._lock:
            self._pending_path = path
            self._pending = self._pool.submit(self._write, step, path, host, host_json, dict(fingerprint),
                                             layout, timings)
        return path

    def wait(self) -> str | None:
        """Block until the pending save (if any) is complete on every process; returns its directory.
        Raises CheckpointError (one line) if it failed; the previous complete checkpoint is then intact."""
        with self._lock:
            pending, path = self._pending, self._pending_path
            self._pending = self._pending_path = None
        if pending is None:
            return None
        pending.result()  # _write raises only CheckpointError
        return path

    @property
    def busy(self) -> bool:
        """True while a background save is still writing."""
        with self._lock:
            return self._pending is not None and not self._pending.done()

    def close(self) -> None:
        """Wait for the pending save, then stop the writer thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _write(self, step: int, path: str, host_state_dict: dict, host_json: str, fingerprint: dict,
               layout: dict, timings: dict[str, float]) -> None:
        """The collective part of a save (any thread): shards, host states, then the marker, then retention.
        Every phase ends with the processes agreeing on its errors, so a failure on one process stops all
        of them at the same point (none waits forever in a collective the others left)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        t0 = time.perf_counter()
        try:
            error = None
            if self.process_index == 0:
                try:
                    self._remove(path)  # a leftover of a killed save (or of a replaced later run) at this step
                except Exception as e:
                    error = f"cannot clear {path}: {error_line(e)}"
            self._agree(error)
            # A GCS object is durable once its upload returns; fsync applies to local files only (on an
            # object store torch would fall back to os.sync(), flushing every disk of the host).
            writer = FsspecWriter(path, sync_files=not fsio.is_remote(path), thread_count=1,
                                  per_thread_copy_ahead=0)
            metadata = dcp.save(host_state_dict, storage_writer=writer, planner=runtime.spmd_save_planner(),
                                process_group=self.group)
            timings["shards"] = time.perf_counter() - t0
            # The planner can leave a tensor out without an error (it did for tiles held by several devices,
            # see runtime.host_copy_for_checkpoint): a checkpoint that lacks one must never get its marker.
            missing = sorted(set(layout["shardings"]) - set(metadata.state_dict_metadata))
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CheckpointError(f"the save of step {step} left out {missing[0]}{more}")
            error = None
            try:
                fsio.write_bytes_atomic(fsio.join(path, host_state_name(self.process_index)), host_json.encode())
            except Exception as e:
                error = f"process {self.process_index} cannot write its host state: {error_line(e)}"
            self._agree(error)
            self._agree(self._finish(step, path, fingerprint, layout) if self.process_index == 0 else None)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path} was not written: {e}") from None
        except BaseException as e:  # noqa: B036  (torch's CheckpointException derives from BaseException)
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            raise CheckpointError(f"checkpoint {path} was not written: {error_line(e)}") from None
        timings["total_write"] = time.perf_counter() - t0
        self.last_save_seconds = timings

    def _agree(self, error: str | None) -> None:
        """Collective: raise CheckpointError with the first process's error if any process has one."""
        errors: list[str | None] = [None] * self.process_count
        self._all_gather(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise CheckpointError(first)

    def _finish(self, step: int, path: str, fingerprint: dict, layout: dict) -> str | None:
        """Process 0, once every process's files exist: write the marker, then apply retention. Returns an
        error line or None."""
        try:
            files = file_sizes(path)
            marker = {"format": FORMAT_VERSION, "step": step, "process_count": self.process_count,
                      "fingerprint": fingerprint, "layout": layout, "files": dict(sorted(files.items())),
                      "time": time.time()}
            fsio.write_json_atomic(fsio.join(path, MARKER), marker)
        except Exception as e:
            return f"cannot write its COMPLETE marker: {error_line(e)}"
        try:
            self._retain(step)
        except Exception as e:  # the new checkpoint is complete; a failed clean-up must not fail the save
            log.warning("checkpoint retention under %s failed: %s", self.root, error_line(e))
        return None

    def _retain(self, newest: int) -> None:
        """Delete checkpoints of steps above `newest` (an abandoned later run: `latest` must not pick them),
        incomplete ones below it, and complete ones beyond the newest `total_limit`. The checkpoint of step
        `newest`, just verified complete, is never deleted."""
        keep = self.total_limit
        complete_seen = 1  # `newest` itself
        for info in reversed(list_checkpoints(self.output_dir)):
            if info.step == newest:
                continue
            if info.step > newest:
                log.warning("removing checkpoint %s: it is from a later step of a run this one replaced", info.path)
                self._remove(info.path)
                continue
            if verify(info.path) is not None:
                self._remove(info.path)
                continue
            complete_seen += 1
            if keep is not None and complete_seen > keep:
                self._remove(info.path)

    @staticmethod
    def _remove(path: str) -> None:
        """Delete a checkpoint directory, marker first, so that a deletion cut short never leaves a
        directory that still looks complete."""
        fs, p = fsio.url_to_fs(path)
        fs.invalidate_cache(p)
        if not fs.exists(p):
            return
        marker = fsio.url_to_fs(fsio.join(path, MARKER))[1]
        if fs.exists(marker):
            fs.rm(marker)
        fs.rm(p, recursive=True)

    def _probe_writable(self) -> None:
        """Fail early, with one line, when the checkpoint root cannot be written (missing bucket, no
        permission, read-only disk), instead of at the first save hours into the run."""
        probe = fsio.join(self.root, f".probe_{self.process_index:05d}")
        try:
            fsio.makedirs(self.root)
            fsio.write_bytes_atomic(probe, b"")
            fs, p = fsio.url_to_fs(probe)
            fs.rm(p)
        except Exception as e:
            raise CheckpointError(f"cannot write checkpoints under {self.root}: {error_line(e)}") from None

    # ---------------------------------------------------------------------------------- restore

    def restore(self, checkpoint: str | CheckpointInfo, state: Mapping[str, Any],
                fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        """Load a complete checkpoint into `state`'s device tensors and return this process's host state (the
        `host_state` it passed to `save`), after checking, with one CheckpointError line each: completeness,
        the config fingerprint, the process count, and that the tensor names, shapes and dtypes match (a
        checkpoint of another model). Collective: every process calls it.

        The tensors keep their Python identity (optimizer and EMA references stay valid); their data is
        replaced. On the mesh the checkpoint was written on, each tensor gets back the sharding it had when
        saved; on another mesh it keeps its current one and the load reshards. Tiled tensors are read shard
        by shard into device memory; unsharded and replicated ones are read into host memory, then
        transferred. Nothing is compiled. If the load itself fails, the tensors' contents are undefined:
        stop the run.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        path = checkpoint.path if isinstance(checkpoint, CheckpointInfo) else checkpoint
        # Every check runs on every process and they agree before the collective load, so a problem seen by
        # one process (a failed read, another checkpoint chosen) stops all of them with its error line
        # instead of leaving the others waiting in the load.
        error, host, layout = None, {}, {}
        try:
            host, layout = self._check_restore(path, state, fingerprint)
        except CheckpointError as e:
            error = str(e)
        paths: list[str | None] = [None] * self.process_count
        self._all_gather(paths, path)
        if error is None and len(set(paths)) > 1:
            error = f"the processes chose different checkpoints to restore: {sorted(set(paths))}"
        self._agree(error)
        try:
            tensors = flat_tensors(state)
            saved_specs = layout.get("shardings", {}) if layout.get("mesh") == self.mesh_description else {}
            targets, specs = {}, {}
            for key, t in tensors.items():
                current = runtime.sharding_spec_string(t)
                specs[key] = spec = saved_specs.get(key, current)
                if spec == current and runtime.is_tiled(spec):
                    targets[key] = t  # read in place, shard by shard
                elif runtime.is_tiled(spec):
                    targets[key] = self._placed(torch.zeros(t.shape, dtype=t.dtype), t, spec, specs, key)
                else:
                    targets[key] = torch.empty(t.shape, dtype=t.dtype)  # host; placed after the read
            dcp.load(targets, storage_reader=FsspecReader(path), planner=runtime.spmd_load_planner(),
                     process_group=self.group)
            for key, t in tensors.items():
                target = targets[key]
                if target is not t:
                    t.data = target if target.device == t.device else self._placed(target, t, specs[key], specs, key)
            runtime.sync()
        except BaseException as e:  # noqa: B036  (torch's CheckpointException derives from BaseException)
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            raise CheckpointError(f"cannot restore {path}: {error_line(e)}") from None
        return host["state"]

    def _check_restore(self, path: str, state: Mapping[str, Any],
                       fingerprint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """This process's checks before a restore; returns (its host-state file, the saved layout)."""
        reason = verify(path)
        if reason is not None:
            raise CheckpointError(f"cannot restore {path}: {reason}")
        try:
            marker = json.loads(fsio.read_bytes(fsio.join(path, MARKER)).decode("utf-8"))
            check_fingerprint(path, marker.get("fingerprint", {}), fingerprint)
            if int(marker["process_count"]) != self.process_count:
                raise CheckpointError(
                    f"checkpoint {path} was written by {marker['process_count']} processes and this run has "
                    f"{self.process_count}: the per-process data positions and random streams do not carry over"
                )
            host = json.loads(fsio.read_bytes(fsio.join(path, host_state_name(self.process_index))).decode("utf-8"))
            self._check_tensors(path, read_dcp_metadata(path), flat_tensors(state))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot restore {path}: {error_line(e)}") from None
        return host, marker.get("layout") or {}

    def _all_gather(self, out: list, value: Any) -> None:
        import torch.distributed as dist

        dist.all_gather_object(out, value, group=self.group)

    @staticmethod
    def _placed(host: torch.Tensor, like: torch.Tensor, spec: str, specs: dict[str, str], key: str) -> torch.Tensor:
        """`host` on `like`'s device with sharding `spec`, or with `like`'s own sharding when `spec` cannot be
        reproduced (one warning: the resumed run then compiles one more step graph)."""
        try:
            return runtime.place(host, like.device, spec)
        except ValueError as e:
            own = runtime.sharding_spec_string(like)
            log.warning("restoring %s with sharding %s instead of the saved one: %s", key, own or "none", e)
            specs[key] = own
            return runtime.place(host, like.device, own)

    @staticmethod
    def _check_tensors(path: str, metadata: Any, tensors: Mapping[str, torch.Tensor]) -> None:
        saved = metadata.state_dict_metadata
        problems = []
        for key, t in tensors.items():
            md = saved.get(key)
            if md is None or not hasattr(md, "size"):
                problems.append(f"{key} is not in it")
            elif tuple(md.size) != tuple(t.shape):
                problems.append(f"{key} has shape {tuple(md.size)} there and {tuple(t.shape)} here")
            elif md.properties.dtype != t.dtype:
                problems.append(f"{key} is {md.properties.dtype} there and {t.dtype} here")
        problems += [f"it has {key}, which this run lacks" for key in saved if key not in tensors]
        if problems:
            more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
            raise CheckpointError(f"checkpoint {path} is of another model: {problems[0]}{more}")
