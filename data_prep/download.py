"""Download image–caption pairs into webdataset image shards with img2dataset.

A url list (parquet or csv/tsv: a file or a folder of them, local or gs://) with a url column and a caption
column becomes `OUTPUT/NNNNN.tar` shards holding `KEY.jpg` + `KEY.txt` (caption) + `KEY.json` (url, sizes,
status), plus img2dataset's `NNNNN_stats.json` / `NNNNN.parquet` per shard. Failed downloads and images that
cannot be decoded or resized are not in the shards; they are counted in each shard's stats (and summed in
the summary this command prints). The output folder may be local or gs://.

Resume: rerunning the same command skips the shards whose stats file exists (img2dataset's "incremental"
mode); `--incremental_mode overwrite` starts over, `extend` appends new shards for a new url list.

    python -m data_prep.download --url_list urls.parquet --output_folder gs://bucket/images \\
        --image_size 512 --resize_mode keep_ratio --processes_count 16 --thread_count 64

Then encode: `python -m data_prep.encode --input_shards gs://bucket/images ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Any

from xla_diffusion import fsio
from xla_diffusion.cli import OneLineParser, run_cli
from xla_diffusion.errors import ConfigError

INPUT_FORMATS = ("parquet", "csv", "tsv")
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url_list", required=True, help="parquet/csv/tsv file, or a folder of them (local or gs://)")
    p.add_argument("--output_folder", required=True, help="where the shards go (local or gs://)")
    p.add_argument("--input_format", choices=INPUT_FORMATS, default=None,
                   help="format of the url list (default: from the file extension)")
    p.add_argument("--url_col", default="url", help="column holding the image urls (default: url)")
    p.add_argument("--caption_col", default="caption", help="column holding the captions (default: caption)")
    p.add_argument("--image_size", type=int, default=512, help="output image size (default: 512)")
    p.add_argument("--min_image_size", type=int, default=0,
                   help="skip images whose shorter side is below this (default: 0)")
    p.add_argument("--max_aspect_ratio", type=float, default=float("inf"), help="skip images more elongated")
    p.add_argument("--resize_mode", choices=RESIZE_MODES, default="keep_ratio",
                   help="keep_ratio: shorter side to --image_size (the encoder center-crops later); "
                   "center_crop; border: pad to a square; no (default: keep_ratio)")
    p.add_argument("--resize_only_if_bigger", action="store_true", help="never upscale")
    p.add_argument("--encode_format", choices=("jpg", "png", "webp"), default="jpg")
    p.add_argument("--encode_quality", type=int, default=95)
    p.add_argument("--processes_count", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--thread_count", type=int, default=64, help="download threads per process")
    p.add_argument("--number_sample_per_shard", type=int, default=10000)
    p.add_argument("--distributor", choices=DISTRIBUTORS, default="multiprocessing")
    p.add_argument("--subjob_size", type=int, default=1000, help="shards per pyspark/ray sub-job")
    p.add_argument("--incremental_mode", choices=("incremental", "overwrite", "extend"), default="incremental",
                   help="incremental (default): resume, skipping finished shards")
    p.add_argument("--timeout", type=int, default=10, help="seconds per download")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--save_additional_columns", nargs="*", default=None, help="more url-list columns to keep")
    p.add_argument("--user_agent_token", default=None)
    p.add_argument("--enable_wandb", action="store_true")
    return p


def _input_format(url_list: str, given: str | None) -> str:
    if given:
        return given
    fs, path = fsio.url_to_fs(url_list)
    if fs.isdir(path):
        for fmt in INPUT_FORMATS:
            if fs.glob(f"{path.rstrip('/')}/*.{fmt}"):
                return fmt
        raise ConfigError(f"--url_list {url_list}: no .parquet/.csv/.tsv file in this folder")
    ext = url_list.rsplit(".", 1)[-1].lower()
    if ext not in INPUT_FORMATS:
        raise ConfigError(f"--url_list {url_list}: cannot tell the format from the extension; pass --input_format")
    return ext


def _columns(url_list: str, fmt: str) -> list[str]:
    """Column names of the (first) url list file, read without loading it."""
    import pandas as pd
    import pyarrow.parquet as pq

    fs, path = fsio.url_to_fs(url_list)
    first = sorted(fs.glob(f"{path.rstrip('/')}/*.{fmt}"))[0] if fs.isdir(path) else path
    with fs.open(first, "rb") as f:
        if fmt == "parquet":
            return list(pq.ParquetFile(f).schema_arrow.names)
        return list(pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", nrows=0).columns)


def validate(args: argparse.Namespace) -> str:
    """Check the arguments and the url list before starting workers; returns the input format."""
    if not fsio.exists(args.url_list):
        raise ConfigError(f"--url_list {args.url_list} does not exist")
    for name in ("image_size", "processes_count", "thread_count", "number_sample_per_shard"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    fmt = _input_format(args.url_list, args.input_format)
    columns = _columns(args.url_list, fmt)
    for flag, col in (("--url_col", args.url_col), ("--caption_col", args.caption_col)):
        if col not in columns:
            raise ConfigError(f"{flag} {col!r} is not a column of the url list; it has: {', '.join(columns)}")
    if args.distributor != "multiprocessing":
        try:
            __import__(args.distributor)
        except ImportError:
            raise ConfigError(f"--distributor {args.distributor} needs `pip install {args.distributor}`") from None
    return fmt


def summarize(output_folder: str) -> dict[str, Any]:
    """Sum img2dataset's per-shard stats files: counts, successes, failures by kind and by error message."""
    totals: Counter = Counter()
    errors: Counter = Counter()
    shards = 0
    for path in fsio.list_files(output_folder, "_stats.json"):
        stats = fsio.read_json(path)
        shards += 1
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(stats.get(k, 0))
        errors.update({k: v for k, v in stats.get("status_dict", {}).items() if k != "success"})
    return {"output_folder": output_folder, "shards": shards, **dict(totals), "errors": dict(errors.most_common())}


def download(args: argparse.Namespace) -> dict[str, Any]:
    """Run img2dataset with webdataset output; returns the summed stats of every shard in the folder."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import otherwise
    fmt = validate(args)
    fsio.url_to_fs(args.output_folder)  # with a GCS emulator, sets up anonymous auth for the workers too
    from img2dataset import download as img2dataset_download

    try:
        _run_img2dataset(img2dataset_download, args, fmt)
    except FileNotFoundError as e:
        # img2dataset's last act is removing its `_tmp` folder; on object stores (gs://, s3://) that "folder"
        # vanished with its last file, so the removal fails after all the work is done
        # (rom1504/img2dataset#319). Anything else is a real error.
        if "_tmp" not in str(e):
            raise
    return summarize(args.output_folder)


def _run_img2dataset(img2dataset_download: Any, args: argparse.Namespace, fmt: str) -> None:
    img2dataset_download(
        url_list=args.url_list,
        output_folder=args.output_folder,
        output_format="webdataset",
        input_format=fmt,
        url_col=args.url_col,
        caption_col=args.caption_col,
        image_size=args.image_size,
        min_image_size=args.min_image_size,
        max_aspect_ratio=args.max_aspect_ratio,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=args.resize_only_if_bigger,
        encode_format=args.encode_format,
        encode_quality=args.encode_quality,
        processes_count=args.processes_count,
        thread_count=args.thread_count,
        number_sample_per_shard=args.number_sample_per_shard,
        distributor=args.distributor,
        subjob_size=args.subjob_size,
        incremental_mode=args.incremental_mode,
        timeout=args.timeout,
        retries=args.retries,
        save_additional_columns=args.save_additional_columns,
        user_agent_token=args.user_agent_token,
        enable_wandb=args.enable_wandb,
    )


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(download(build_parser().parse_args(argv)), sort_keys=True))


if __name__ == "__main__":
    sys.exit(run_cli(main))
