"""A GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1 for tests and benchmarks.

`start_emulator()` runs this file as a child process and points this process at it
(`STORAGE_EMULATOR_HOST`, which gcsfs reads itself); child processes inherit that. The child polls its
parent and stops when the parent is gone, so no emulator outlives the session that started it, even when
that session is killed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_emulator(timeout: float = 30.0) -> Emulator:
    """Start the emulator, wait until it answers, and set STORAGE_EMULATOR_HOST for this process."""
    # gcsfs probes a gRPC endpoint on first bucket access unless told not to (~60 s stall off GCP).
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(port), str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the GCS emulator did not start") from None
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    os.environ["STORAGE_EMULATOR_HOST"] = url
    return Emulator(proc, url)


def make_bucket(name: str) -> str:
    """Create a bucket on the emulator; returns 'gs://name'."""
    from xla_diffusion import fsio

    fs, _ = fsio.url_to_fs(f"gs://{name}")
    if not fs.exists(name):
        fs.mkdir(name)
    return f"gs://{name}"


def _serve(port: int, parent: int) -> None:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        while os.getppid() == parent:  # re-parented: whoever started us is gone
            time.sleep(0.5)
    finally:
        server.stop()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
