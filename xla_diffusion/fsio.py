"""Paths through fsspec: local folders and gs:// (gcsfs) with the same calls.

Writes that other processes may be reading meanwhile are atomic: a local file is written beside its
target and renamed; a remote object is uploaded from a finished local file (a GCS object only becomes
visible once its upload completes). So a reader never sees half a shard or half a manifest.

With `STORAGE_EMULATOR_HOST` set (a GCS emulator, e.g. in tests) gcsfs talks to that endpoint itself;
emulators accept anonymous requests, so unless a token is configured we use `token="anon"` rather than
probing for Google credentials (which stalls on the metadata-server lookup off GCP).

The first gs:// access of a process opens one TCP connection to the store (10 s timeout): an unreachable
store is then a one-line `StoreUnreachable` (a ConnectionError) at once, not gcsfs's retries for ~40 s; and
gcsfs's give-up messages are logged without their tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import tempfile
import urllib.parse
from typing import Any

from .errors import StoreUnreachable


def _configure_emulator_auth() -> None:
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import fsspec.config

    gs_conf = fsspec.config.conf.setdefault("gs", {})
    if "token" not in gs_conf:
        gs_conf["token"] = "anon"
    # Child processes (img2dataset workers, DataLoader workers started with spawn) read this at import.
    os.environ.setdefault("FSSPEC_GS_TOKEN", str(gs_conf["token"]))


class _NoTraceback(logging.Filter):
    """gcsfs logs every request that runs out of retries with its traceback (`logger.exception`): dozens of
    aiohttp lines before the one-line error our caller reports. Keep gcsfs's message, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


@functools.cache
def _quiet_gcsfs() -> None:
    logging.getLogger("gcsfs").addFilter(_NoTraceback())


def _endpoint(protocol: str) -> tuple[str, int] | None:
    """(host, port) of the object store a URL scheme talks to (GCS, or the emulator in STORAGE_EMULATOR_HOST)."""
    if protocol not in ("gs", "gcs"):
        return None
    url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    return parts.hostname or "localhost", parts.port or (443 if parts.scheme == "https" else 80)


REACHABLE_TIMEOUT_S = 10.0


@functools.cache
def _check_reachable(host: str, port: int) -> None:
    """One TCP connection to the store, once per process (only success is cached). Without it an
    unreachable store surfaces after gcsfs's 6 retries with back-off, ~40 s later."""
    try:
        socket.create_connection((host, port), timeout=REACHABLE_TIMEOUT_S).close()
    except OSError as e:
        raise StoreUnreachable(f"cannot reach the object store at {host}:{port}: {e.strerror or e}") from None



def is_remote(path: str) -> bool:
    """True for URLs with a scheme other than file:// (gs://, s3://, ...)."""
    return "://" in path and not path.startswith("file://")


def url_to_fs(path: str) -> tuple[Any, str]:
    """(filesystem, path inside it) for a local path or URL."""
    import fsspec

    if is_remote(path):
        _configure_emulator_auth()
        _quiet_gcsfs()
        endpoint = _endpoint(path.split("://", 1)[0])
        if endpoint is not None:
            _check_reachable(*endpoint)
    return fsspec.core.url_to_fs(path)


def join(root: str, *parts: str) -> str:
    """Join with '/' for URLs and os.path.join for local paths."""
    if is_remote(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def exists(path: str) -> bool:
    fs, p = url_to_fs(path)
    return fs.exists(p)


def open_file(path: str, mode: str = "rb") -> Any:
    """A file object for a local path or URL; text modes read and write UTF-8. Writes to a remote path
    become visible when the file is closed (a finished upload)."""
    fs, p = url_to_fs(path)
    return fs.open(p, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def download_tree(url: str, local_dir: str) -> None:
    """Copy a remote folder (prefix) to a local folder, recursively."""
    fs, p = url_to_fs(url)
    fs.get(p.rstrip("/") + "/", local_dir, recursive=True)


def upload(local_path: str, dest: str) -> None:
    """Copy a local file or folder (recursively) to `dest` (a URL)."""
    fs, p = url_to_fs(dest)
    fs.put(local_path, p, recursive=os.path.isdir(local_path))


def remove(path: str) -> None:
    """Delete a file, if it exists."""
    fs, p = url_to_fs(path)
    if fs.exists(p):
        fs.rm(p)


def makedirs(path: str) -> None:
    """Create a local folder (and parents); a no-op for object stores, whose 'folders' are prefixes."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    fs, p = url_to_fs(path)
    return fs.cat_file(p)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


def read_jsonl(path: str) -> list[Any]:
    """The records of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in read_bytes(path).decode("utf-8").splitlines() if line.strip()]


def list_files(root: str, suffix: str) -> list[str]:
    """Sorted full paths (with the URL scheme for remote roots) of the files directly in `root` whose names
    end in `suffix` and do not start with '.' (temporary files of unfinished writes start with '.')."""
    fs, p = url_to_fs(root)
    fs.invalidate_cache(p)  # other processes may have written here since this process last listed it
    if not fs.exists(p):
        return []
    names = sorted(os.path.basename(f.rstrip("/")) for f in fs.ls(p, detail=False))
    return [join(root, n) for n in names if n.endswith(suffix) and not n.startswith(".")]


def publish_file(local_file: str, dest: str) -> None:
    """Move a finished local file to `dest` (local or remote) so that `dest` appears complete or not at all.
    The local file is gone afterwards."""
    if is_remote(dest):
        fs, p = url_to_fs(dest)
        fs.put_file(local_file, p)
        os.remove(local_file)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        os.replace(local_file, dest)  # atomic within one filesystem: tmp files are made beside dest


def local_tmp_for(dest: str) -> str:
    """A fresh local path to write `dest`'s content into before `publish_file`: beside `dest` for local
    targets (same filesystem, so the rename is atomic; hidden, so listings skip it), else in the temp dir."""
    if is_remote(dest):
        fd, path = tempfile.mkstemp(prefix=".xla_diffusion-", suffix="-" + os.path.basename(dest))
    else:
        folder = os.path.dirname(os.path.abspath(dest))
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(path, 0o644)  # mkstemp makes it private; the published file should be readable like any other
    return path


def write_bytes_atomic(dest: str, data: bytes) -> None:
    tmp = local_tmp_for(dest)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        publish_file(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(dest: str, obj: Any) -> None:
    write_bytes_atomic(dest, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

