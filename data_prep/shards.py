"""An imagefolder (images + metadata.jsonl, e.g. data_prep/synthetic.py's output) → webdataset image shards
in img2dataset's layout: `NNNNN.tar` holding `KEY.<ext>` (the image file's bytes, unchanged), `KEY.txt`
(caption) and `KEY.json` (the metadata row plus `key`), so `data_prep/encode.py` reads both alike.

Usage: ``python -m data_prep.shards --train_dir DIR/train --output_dir OUT [--samples_per_shard 1000]``
(OUT may be gs://...).
"""

from __future__ import annotations

import json
import os
import sys

from xla_diffusion import fsio
from xla_diffusion.cli import OneLineParser, run_cli
from xla_diffusion.data.tar_stream import tar_bytes
from xla_diffusion.errors import ConfigError


def imagefolder_to_shards(
    train_dir: str, output_dir: str, samples_per_shard: int = 1000, caption_column: str = "text"
) -> list[str]:
    """Write the shards (each one atomically) and return their paths, in order."""
    if samples_per_shard < 1:
        raise ConfigError("--samples_per_shard must be >= 1")
    meta = os.path.join(train_dir, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise ConfigError(f"--train_dir {train_dir}: no metadata.jsonl (an imagefolder has one row per image with "
                          "file_name and a caption)")
    rows = fsio.read_jsonl(meta)
    fsio.makedirs(output_dir)
    paths = []
    for shard, start in enumerate(range(0, len(rows), samples_per_shard)):
        samples = []
        for row in rows[start : start + samples_per_shard]:
            stem, ext = os.path.splitext(row["file_name"])
            key = stem.replace(".", "_")
            with open(os.path.join(train_dir, row["file_name"]), "rb") as img:
                data = img.read()
            meta = {**row, "key": key}
            samples.append({"__key__": key, ext.lstrip(".").lower(): data, "txt": row.get(caption_column, ""),
                            "json": json.dumps(meta, sort_keys=True)})
        path = fsio.join(output_dir, f"{shard:05d}.tar")
        fsio.write_bytes_atomic(path, tar_bytes(samples))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_dir", required=True, help="imagefolder with metadata.jsonl")
    p.add_argument("--output_dir", required=True, help="local folder or gs:// prefix")
    p.add_argument("--samples_per_shard", type=int, default=1000)
    p.add_argument("--caption_column", default="text")
    args = p.parse_args(argv)
    paths = imagefolder_to_shards(args.train_dir, args.output_dir, args.samples_per_shard, args.caption_column)
    print(json.dumps({"shards": len(paths), "output_dir": args.output_dir}))


if __name__ == "__main__":
    sys.exit(run_cli(main))
