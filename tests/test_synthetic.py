"""Tests for the synthetic shapes dataset (no torch / torch_xla needed)."""

from __future__ import annotations

import filecmp
import json
import random
from pathlib import Path

import numpy as np
import pytest

from data_prep.synthetic import (
    COLOURS,
    SHAPES,
    all_combinations,
    caption,
    draw_shape,
    heldout_combinations,
    write_shapes_dataset,
)

NUM_IMAGES = 180


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(out), NUM_IMAGES, resolution=32, seed=0)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption() -> None:
    assert caption("red", "circle", "blue") == "a red circle on a blue background"


@pytest.mark.parametrize("shape", SHAPES)
def test_draw_shape(shape: str) -> None:
    rng = random.Random(0)
    for _ in range(20):
        img = np.asarray(draw_shape("red", shape, "blue", 64, rng))
        assert img.shape == (64, 64, 3)
        fg = np.all(img == COLOURS["red"], axis=-1)
        bg = np.all(img == COLOURS["blue"], axis=-1)
        assert np.all(fg | bg)  # only the two colours, no anti-aliasing
        # Background is visible on every border: the shape is fully inside and smaller than the image.
        assert bg[0].any() and bg[-1].any() and bg[:, 0].any() and bg[:, -1].any()
        ys, xs = np.nonzero(fg)
        side = max(np.ptp(ys), np.ptp(xs)) + 1
        assert 0.3 * 64 <= side <= 0.75 * 64


def test_draw_shape_rejects_same_colours() -> None:
    with pytest.raises(ValueError):
        draw_shape("red", "circle", "red", 32, random.Random(0))


def test_heldout_split() -> None:
    combos = all_combinations()
    assert len(combos) == 90
    heldout = heldout_combinations(0)
    assert heldout == heldout_combinations(0)
    assert len(heldout) == 9 and len(set(heldout)) == 9
    assert all(c in combos and c[0] != c[2] for c in heldout)
    train = [c for c in combos if c not in heldout]
    for f, s, b in heldout:  # every part of a held-out combo is seen in training
        assert any(t[0] == f and t[1] == s for t in train)
        assert any(t[1] == s and t[2] == b for t in train)
        assert any(t[0] == f and t[2] == b for t in train)


def test_metadata(dataset_dir: Path) -> None:
    train_dir = dataset_dir / "train"
    rows = _read_jsonl(train_dir / "metadata.jsonl")
    assert len(rows) == NUM_IMAGES
    assert not (dataset_dir / "train.tmp").exists()
    assert {p.name for p in train_dir.glob("*.png")} == {r["file_name"] for r in rows}
    heldout = set(heldout_combinations(0))
    for row in rows:
        assert set(row) == {"file_name", "text", "fg", "shape", "bg"}
        assert row["text"] == caption(row["fg"], row["shape"], row["bg"])
        assert row["fg"] in COLOURS and row["bg"] in COLOURS and row["shape"] in SHAPES
        assert row["fg"] != row["bg"]
        assert (row["fg"], row["shape"], row["bg"]) not in heldout
    assert {r["fg"] for r in rows} == set(COLOURS) == {r["bg"] for r in rows}
    assert {r["shape"] for r in rows} == set(SHAPES)
    # Combos are cycled, so 180 images over 81 training combos gives each combo 2 or 3 images.
    counts: dict[tuple, int] = {}
    for r in rows:
        key = (r["fg"], r["shape"], r["bg"])
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 81 and set(counts.values()) <= {2, 3}


def test_heldout_prompts_file(dataset_dir: Path) -> None:
    rows = _read_jsonl(dataset_dir / "heldout_prompts.jsonl")
    assert [(r["fg"], r["shape"], r["bg"]) for r in rows] == heldout_combinations(0)
    assert all(r["text"] == caption(r["fg"], r["shape"], r["bg"]) for r in rows)


def test_deterministic(dataset_dir: Path, tmp_path: Path) -> None:
    write_shapes_dataset(str(tmp_path), NUM_IMAGES, resolution=32, seed=0)
    cmp = filecmp.dircmp(dataset_dir / "train", tmp_path / "train")
    assert not cmp.left_only and not cmp.right_only
    _, mismatch, errors = filecmp.cmpfiles(
        dataset_dir / "train", tmp_path / "train", cmp.common_files, shallow=False
    )
    assert not mismatch and not errors
    heldout = "heldout_prompts.jsonl"
    assert filecmp.cmp(dataset_dir / heldout, tmp_path / heldout, shallow=False)


def test_rewrite_replaces_train(tmp_path: Path) -> None:
    write_shapes_dataset(str(tmp_path), 20, resolution=16, seed=0)
    write_shapes_dataset(str(tmp_path), 10, resolution=16, seed=1)
    assert len(list((tmp_path / "train").glob("*.png"))) == 10
    assert not (tmp_path / "train.tmp").exists()


def test_imagefolder_loads(dataset_dir: Path, tmp_path: Path) -> None:
    import datasets

    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(dataset_dir / "train"), split="train", cache_dir=str(tmp_path)
    )
    assert {"image", "text"} <= set(ds.column_names)
    assert len(ds) == NUM_IMAGES
    assert ds[0]["image"].size == (32, 32)
    assert ds[0]["text"].startswith("a ")


def test_prepare_shapes_refuses_a_folder_of_another_heldout_split(dataset_dir: Path, tmp_path: Path) -> None:
    """The demo's data stage reuses a finished train/ folder; one built for another held-out split would put
    the prompts evaluated as unseen into training, so it is one error line, before any model is loaded."""
    import subprocess
    import sys

    from data_prep.prepare_shapes import check_heldout_split
    from xla_diffusion.errors import ConfigError

    check_heldout_split(str(dataset_dir), 0)  # the split it was built with
    with pytest.raises(ConfigError, match="another held-out split than --heldout_seed 1"):
        check_heldout_split(str(dataset_dir), 1)
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no readable"):
        check_heldout_split(str(tmp_path), 0)

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "data_prep.prepare_shapes", "--output_dir", str(dataset_dir),
                        "--pretrained_model_name_or_path", str(tmp_path / "no-such-pipeline"), "--heldout_seed", "2"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "another held-out split than --heldout_seed 2" in r.stderr and "Traceback" not in r.stderr
