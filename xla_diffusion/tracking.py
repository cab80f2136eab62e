"""Metric sinks behind one small interface. Process 0 is the only one that writes.

Every tracker has `log(metrics)`, `log_images(step, images)` and `close()`; the hyper-parameters go in when
it is made. `metrics` is a flat dict of Python numbers (and the odd string) that a step closure built, with
the step under "step": trackers never touch a device tensor, so logging adds no host sync and no graph.

`make_trackers` turns diffusers' `--report_to` into a fan-out of the JSONL file (always on) and TensorBoard
and/or wandb. Their files live under `<output_dir>/<logging_dir>/`:

- `metrics.jsonl`: one JSON object per `log` call;
- `<project>/events.out.tfevents.*`: TensorBoard scalars, images and the HParams plugin's hyper-parameters
  (the run directory is named after the project, as accelerate's TensorBoard tracker does; gs:// works);
- `wandb/offline-run-*` or `wandb/run-*`: wandb's run files (online or offline per `WANDB_MODE`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .errors import UserError

REPORT_TO_CHOICES = ("tensorboard", "wandb", "all", "none")
DEFAULT_REPORT_TO = "tensorboard"  # diffusers' train_text_to_image.py default
DEFAULT_PROJECT = "text2image-fine-tune"  # diffusers' --tracker_project_name default
DEFAULT_LOGGING_DIR = "logs"  # diffusers' --logging_dir default, relative to --output_dir

# Config keys whose values must never be shown anywhere (tracker config, model card, logs): one of these
# words between underscores or at an end, so `hub_token` is secret and `tokenizer_name` is not.
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey)($|_)")

ImageLike = Any  # a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or a PIL image


class TrackerError(UserError, ValueError):
    """A tracker cannot be set up (unknown --report_to, package missing, wandb not logged in); the message
    is one line for the user."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...

    def log_images(self, step: int, images: Mapping[str, Sequence[ImageLike]],
                   captions: Mapping[str, Sequence[str]] | None = None) -> None: ...

    def close(self) -> None: ...


def is_secret_key(key: str) -> bool:
    """True for config keys like `hub_token` whose values must not leave the process."""
    return _SECRET_KEY.search(key.lower().replace("-", "_")) is not None


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` without its secret-bearing keys (e.g. `hub_token`): what trackers and the model card show."""
    return {k: v for k, v in config.items() if not is_secret_key(k)}


def redact_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with the values of secret flags (`--hub_token X`, `--hub_token=X`) replaced by "***"."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if name.startswith("--") and is_secret_key(name[2:]):
            if eq:
                out.append(f"{name}=***")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record except "step" (strings such as paths are not plotted); a nested
    mapping of numbers (e.g. data_skipped: {reason: count}) becomes "key/inner" entries."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update({f"{k}/{name}": value for name, value in _scalars(v).items()})
            continue
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            continue
        out[k] = float(v)
    return out


def as_uint8_hwc(image: ImageLike) -> np.ndarray:
    """A PIL image or uint8 array (H, W[, C]) as a uint8 array (H, W, C), C in {1, 3, 4}."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (H, W, C) arrays or PIL images, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise TypeError(f"images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    return arr


class JsonlTracker:
    """Appends one JSON object per `log` call to `path` (local disk), flushed at once so a crashed run
    keeps what it logged. Images are not written here: the run keeps them on disk already."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._file.flush()

    def log_images(self, step: int, images: Mapping[str, Sequence[ImageLike]],
                   captions: Mapping[str, Sequence[str]] | None = None) -> None:
        pass

    def close(self) -> None:
        self._file.close()


class NullTracker:
    """What processes other than 0 use."""

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def log_images(self, step: int, images: Mapping[str, Sequence[ImageLike]],
                   captions: Mapping[str, Sequence[str]] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _hparam_value(v: Any) -> int | float | str | bool:
    """TensorBoard's HParams plugin takes numbers, strings and booleans only: others become JSON text."""
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)


class TensorBoardTracker:
    """torch.utils.tensorboard's SummaryWriter in `logdir`: scalars under their metric names, images under
    `name` (one image) or `name/i`, the config as HParams-plugin hyper-parameters and as a JSON text.

    A remote `logdir` (gs://...) is written locally and copied up whole, at most every `upload_every_s` and
    at close: object stores cannot append, and TensorBoard's own fsspec path rewrites the event file with only
    the records since its last flush (seen with gcsfs: the earlier records were lost)."""

    def __init__(self, logdir: str, config: Mapping[str, Any], upload_every_s: float = 60.0):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.logdir = logdir
        self._remote = "://" in logdir
        self._local = tempfile.mkdtemp(prefix="xla_diffusion-tb-") if self._remote else logdir
        self._upload_every_s, self._uploaded_at = upload_every_s, 0.0
        self.writer = SummaryWriter(log_dir=self._local)
        # The plugin's experiment and session-start records go in now; the session-end record at close.
        # (SummaryWriter.add_hparams would write all three to a new sub-run, apart from the scalars.)
        exp, ssi, self._session_end = hparams({k: _hparam_value(v) for k, v in config.items()}, {})
        self.writer.file_writer.add_summary(exp)
        self.writer.file_writer.add_summary(ssi)
        self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=1, sort_keys=True, default=str)
                             + "\n```", global_step=0)
        self._step = 0
        self._flush()

    def _flush(self, force: bool = False) -> None:
        import time

        self.writer.flush()  # every --logging_steps: a crashed run keeps its curve
        if self._remote and (force or time.monotonic() - self._uploaded_at >= self._upload_every_s):
            from . import fsio

            fs, root = fsio.url_to_fs(self.logdir)
            for name in os.listdir(self._local):
                fs.put_file(os.path.join(self._local, name), f"{root.rstrip('/')}/{name}")
            self._uploaded_at = time.monotonic()

    def log(self, metrics: dict[str, Any]) -> None:
        self._step = int(metrics.get("step", self._step))
        for name, value in _scalars(metrics).items():
            self.writer.add_scalar(name, value, global_step=self._step)
        self._flush()

    def log_images(self, step: int, images: Mapping[str, Sequence[ImageLike]],
                   captions: Mapping[str, Sequence[str]] | None = None) -> None:
        for name, imgs in images.items():
            for i, img in enumerate(imgs):
                tag = name if len(imgs) == 1 else f"{name}/{i}"
                self.writer.add_image(tag, as_uint8_hwc(img), global_step=step, dataformats="HWC")
        self._flush()

    def close(self) -> None:
        self.writer.file_writer.add_summary(self._session_end)
        self.writer.close()
        if self._remote:
            import shutil

            self._flush(force=True)
            shutil.rmtree(self._local, ignore_errors=True)


class WandbTracker:
    """A wandb run (online or offline per WANDB_MODE / `wandb offline`) with the config as its config;
    scalars and images go in with `step=` the training step, so records logged at one step share a row."""

    def __init__(self, project: str, run_dir: str | None, config: Mapping[str, Any]):
        import wandb

        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
        # wandb records sys.argv in the run's metadata (and uploads it): a --hub_token given on the command
        # line would go with it, so the secret values are masked while the run starts.
        argv = sys.argv
        sys.argv = redact_argv(argv)
        try:
            self.run = wandb.init(project=project, dir=run_dir, config=dict(config))
        except wandb.errors.Error as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrackerError(f"--report_to wandb: {first} (or set WANDB_API_KEY, or WANDB_MODE=offline to log "
                               "locally)") from None
        finally:
            sys.argv = argv
        self._wandb = wandb

    def log(self, metrics: dict[str, Any]) -> None:
        values = _scalars(metrics)
        if "step" in metrics:
            self.run.log(values, step=int(metrics["step"]))
        else:
            self.run.log(values)

    def log_images(self, step: int, images: Mapping[str, Sequence[ImageLike]],
                   captions: Mapping[str, Sequence[str]] | None = None) -> None:
        captions = captions or {}
        record = {}
        for name, imgs in images.items():
            caps = list(captions.get(name, [None] * len(imgs)))
            record[name] = [self._wandb.Image(as_uint8_hwc(img), caption=c) for img, c in zip(imgs, caps)]
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()


class CompositeTracker:
    """Fans every call out to several trackers; `close` closes all of them even if one fails."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def log(self, metrics: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(metrics)

    def log_images(self, step: int, images: Mapping[str, Sequence[ImageLike]],
                   captions: Mapping[str, Sequence[str]] | None = None) -> None:
        for t in self.trackers:
            t.log_images(step, images, captions)

    def close(self) -> None:
        error: BaseException | None = None
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 (closed the others first; raised below)
                error = error or e
        if error is not None:
            raise error


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(tool: str) -> bool:
    try:
        if tool == "tensorboard":
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        else:
            import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_report_to(report_to: str | None) -> list[str]:
    """The trackers `--report_to` asks for besides the JSONL file: [] for "none", both installed ones for
    "all" (accelerate's meaning: every available integration). Raises TrackerError for an unknown value or
    a named tool whose package is missing. Call it on every process, so all hosts fail alike and early."""
    value = (report_to or "none").strip().lower()
    if value not in REPORT_TO_CHOICES:
        raise TrackerError(f"--report_to {report_to!r}: expected one of {', '.join(REPORT_TO_CHOICES)}")
    if value == "none":
        return []
    if value == "all":
        tools = [t for t in ("tensorboard", "wandb") if _installed(t)]
        if not tools:
            raise TrackerError("--report_to all: neither tensorboard nor wandb is installed: "
                               "pip install tensorboard wandb")
        return tools
    if not _installed(value):
        raise TrackerError(f"--report_to {value} needs the {_PACKAGES[value]} package: pip install {_PACKAGES[value]}")
    return [value]


def logging_root(logging_dir: str, output_dir: str) -> str:
    """Where a run's logs go: `logging_dir` relative to `output_dir` unless absolute or remote (diffusers')."""
    if "://" in logging_dir or os.path.isabs(logging_dir):
        return logging_dir
    return f"{output_dir.rstrip('/')}/{logging_dir}"


def metrics_path(logging_dir: str, output_dir: str) -> str | None:
    """The run's metrics.jsonl, or None when its logs go to a remote store (the JSONL file is local only)."""
    root = logging_root(logging_dir, output_dir)
    return None if "://" in root else os.path.join(root, "metrics.jsonl")


def make_trackers(
    report_to: str | None,
    project: str,
    logging_dir: str,
    output_dir: str,
    config_dict: Mapping[str, Any],
    is_main_process: bool,
) -> Tracker:
    """The run's tracker: on process 0 the JSONL file (when `output_dir` is local) plus what `report_to`
    names, all fed the same records; elsewhere a NullTracker. `logging_dir` is relative to `output_dir`
    unless absolute (diffusers' meaning). The config reaches the tools without its secret keys
    (`public_config`). Raises TrackerError (one line) on every process for a bad `report_to`."""
    tools = resolve_report_to(report_to)
    if not is_main_process:
        return NullTracker()
    config = public_config(config_dict)
    log_root = logging_root(logging_dir, output_dir)
    local = "://" not in log_root
    trackers: list[Tracker] = []
    jsonl = metrics_path(logging_dir, output_dir)
    if jsonl is not None:
        trackers.append(JsonlTracker(jsonl))
    try:
        if "tensorboard" in tools:
            trackers.append(TensorBoardTracker(f"{log_root.rstrip('/')}/{project}", config))
        if "wandb" in tools:
            # wandb writes its run files locally and syncs them; for a remote log_root it uses ./wandb.
            trackers.append(WandbTracker(project, log_root if local else None, config))
    except BaseException:
        CompositeTracker(trackers).close()
        raise
    return CompositeTracker(trackers)

