"""data_prep/download.py: a real img2dataset run against a loopback HTTP server that serves generated images
and failing urls (404, refused connection, not an image, truncated file), writing webdataset shards to the
GCS emulator."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from PIL import Image

from tests.gcs_emulator import _free_port, make_bucket
from tests.helpers import ROOT, cli_env
from xla_diffusion import fsio
from xla_diffusion.data.tar_stream import iter_tar_samples

NUM_GOOD = 14


def _png(i: int, size: tuple[int, int] = (96, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        _Handler.hits[self.path] += 1
        if self.path.startswith("/good/"):
            body, ctype = _png(int(self.path.rsplit("/", 1)[1].split(".")[0])), "image/png"
        elif self.path == "/not_an_image.png":
            body, ctype = b"<html><body>sorry, not an image</body></html>", "text/html"
        elif self.path == "/truncated.png":
            body, ctype = _png(99, (200, 200))[:150], "image/png"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.download", *args], env=cli_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def url_list(http_server, tmp_path_factory) -> str:
    base = http_server
    rows = [{"url": f"{base}/good/{i}.png", "caption": f"colour number {i}"} for i in range(NUM_GOOD)]
    rows += [
        {"url": f"{base}/missing.png", "caption": "a 404"},
        {"url": f"http://127.0.0.1:{_free_port()}/refused.png", "caption": "nobody listens there"},
        {"url": f"{base}/not_an_image.png", "caption": "html, not an image"},
        {"url": f"{base}/truncated.png", "caption": "half a png"},
    ]
    path = str(tmp_path_factory.mktemp("urls") / "urls.parquet")
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.slow
def test_download_to_gcs_counts_failures_and_resumes(gcs_emulator, url_list):
    out = make_bucket("downloads") + "/images"
    args = ["--url_list", url_list, "--output_folder", out, "--image_size", "64", "--resize_mode", "center_crop",
            "--processes_count", "2", "--thread_count", "4", "--number_sample_per_shard", "6", "--timeout", "5"]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["count"] == NUM_GOOD + 4 and summary["shards"] == 3
    assert summary["successes"] == NUM_GOOD
    assert summary["failed_to_download"] == 2  # 404 and refused connection
    assert summary["failed_to_resize"] == 2  # not an image, truncated image
    assert sum(summary["errors"].values()) == 4

    shards = fsio.list_files(out, ".tar")
    assert [os.path.basename(s) for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = []
    for shard in shards:
        fs, path = fsio.url_to_fs(shard)
        errors: Counter = Counter()
        with fs.open(path, "rb") as f:
            samples += list(iter_tar_samples(f, errors))
        assert not errors
    assert len(samples) == NUM_GOOD
    for s in samples:
        meta = json.loads(s["json"])
        i = int(meta["url"].rsplit("/", 1)[1].split(".")[0])
        assert s["txt"].decode() == f"colour number {i}" and meta["status"] == "success"
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.size == (64, 64)
        # center_crop of a flat colour: the pixels are still that colour (up to JPEG)
        expected = ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)
        assert all(abs(a - b) <= 4 for a, b in zip(image.convert("RGB").getpixel((32, 32)), expected))

    # The same command again: every shard is done, nothing is fetched again.
    hits = sum(_Handler.hits.values())
    r2 = _run(args)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert sum(_Handler.hits.values()) == hits
    assert json.loads(r2.stdout.strip().splitlines()[-1]) == summary


def test_download_bad_column_is_one_error_line(url_list, tmp_path):
    r = _run(["--url_list", url_list, "--output_folder", str(tmp_path / "out"), "--caption_col", "text"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --caption_col 'text' is not a column of the url list; it has: url, caption"
    ]
