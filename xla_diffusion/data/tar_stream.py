"""Reading and writing webdataset shards (plain tar files whose members `KEY.EXT` group into samples).

Reading is a small streaming tar parser of our own rather than `tarfile`, because a data pipeline must
count what it loses: `tarfile` stops silently at the first corrupt header and drops the rest of the shard.
Here a member with a bad header checksum is counted (`corrupt_member`), the reader resynchronises on the
next valid header, and a shard cut short is counted (`truncated_shard`). The stream is read front to back
(no seeks), so it works on a GCS object opened through fsspec as well as on a local file; every sample
carries the byte offset where it begins, so a reader can later reopen the shard there (one seek).

Supported: ustar/GNU/POSIX headers, GNU long names ('L') and pax `path=` records ('x'), which is what
Python's tarfile (and so webdataset's TarWriter and img2dataset) write.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import IO

BLOCK = 512


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    # Unsigned per POSIX; some old writers summed signed bytes.
    return stored in (sum(blanked), sum(b - 256 if b > 127 else b for b in blanked))


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ('LEN path=VALUE\\n' records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            return None
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


class _Counted:
    """A read-only stream that counts the bytes read from it, from `start` (its offset in the file)."""

    def __init__(self, stream: IO[bytes], start: int):
        self.stream, self.pos = stream, start

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.pos += len(data)
        return data


def iter_tar_records(stream: IO[bytes], errors: Counter, start: int = 0) -> Iterator[tuple[int, str, bytes]]:
    """(offset, name, data) of every regular file in a tar stream, in order; `offset` is where the member's
    record begins in the file (its first header block, long-name and pax headers included), so a reader can
    seek there and start reading again. `start` is the stream's offset in the file. Damage is counted in
    `errors`: `corrupt_member` per run of blocks without a valid header, `truncated_shard` when the stream
    ends inside a member."""
    stream = _Counted(stream, start)
    long_name: str | None = None
    resyncing = False
    record_start: int | None = None  # offset of the first header of the member being read
    while True:
        header_at = stream.pos
        header = _read_exact(stream, BLOCK)
        if not header:
            return
        if len(header) < BLOCK:
            errors["truncated_shard"] += 1
            return
        if header == b"\0" * BLOCK:
            continue  # end-of-archive blocks (two of them), or padding: keep reading until EOF
        if not _checksum_ok(header):
            if not resyncing:
                errors["corrupt_member"] += 1
                resyncing = True
            continue  # skip block by block until the next valid header
        resyncing = False
        if record_start is None:
            record_start = header_at
        try:
            size = _octal(header[124:136])
        except ValueError:
            errors["corrupt_member"] += 1
            resyncing, long_name, record_start = True, None, None
            continue
        kind = header[156:157]
        data = _read_exact(stream, size)
        if len(data) < size:
            errors["truncated_shard"] += 1
            return
        _read_exact(stream, -size % BLOCK)
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":
            long_name = _pax_path(data) or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name, record_start = None, None  # directories, links, global pax headers: nothing to yield
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        yield record_start, (long_name or name), data
        long_name, record_start = None, None


def iter_tar_members(stream: IO[bytes], errors: Counter) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream, in order (`iter_tar_records` without offsets)."""
    for _, name, data in iter_tar_records(stream, errors):
        yield name, data


def split_key(name: str) -> tuple[str, str]:
    """'dir/000123.latents.safetensors' -> ('dir/000123', 'latents.safetensors'): webdataset's convention,
    the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_samples(stream: IO[bytes], errors: Counter, start: int = 0) -> Iterator[dict[str, bytes | str | int]]:
    """Group consecutive members with the same key into samples `{"__key__": key, "__offset__": where the
    sample's first member begins in the file, ext: bytes, ...}` (`start`: the stream's offset in the file, when
    it was opened at a sample's offset). A key seen twice in one sample (duplicate member) is counted as
    `duplicate_member` and the first kept."""
    sample: dict[str, bytes | str | int] | None = None
    for offset, name, data in iter_tar_records(stream, errors, start):
        key, ext = split_key(name)
        if not ext or key.startswith("__"):
            continue  # webdataset metadata members like __index__
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__offset__": offset}
        if ext in sample:
            errors["duplicate_member"] += 1
            continue
        sample[ext] = data
    if sample is not None:
        yield sample


def write_tar(fileobj: IO[bytes], samples: Iterable[dict[str, bytes | str]]) -> int:
    """Write samples `{"__key__": key, ext: bytes}` as members `key.ext` (sorted by ext) with fixed
    metadata (mtime 0, root owner), so the same samples always give the same bytes. Returns the count."""
    import webdataset as wds

    writer = wds.TarWriter(fileobj, encoder=False, mtime=0.0)
    count = 0
    for sample in samples:
        writer.write({k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v)
                      for k, v in sample.items()})
        count += 1
    writer.close()
    return count


def tar_bytes(samples: Iterable[dict[str, bytes | str]]) -> bytes:
    """`write_tar` into memory."""
    buf = io.BytesIO()
    write_tar(buf, samples)
    return buf.getvalue()
