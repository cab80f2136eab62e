"""Synthetic captioned images of one coloured shape on a plain background.

Captions are compositional ("a red circle on a blue background"), and a few (fg, shape, bg)
combinations are held out of training entirely, so a trained model can be probed on prompts it
has never seen while each of their parts has been seen.

Usage: ``python -m data_prep.synthetic --output_dir DIR --num_images N --resolution 64 --seed 0``
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import sys

from xla_diffusion.cli import OneLineParser, run_cli
from xla_diffusion.shapes import COLOURS, SHAPES, caption, draw_shape

HELDOUT_FRACTION = 0.1

Combo = tuple[str, str, str]  # (fg colour, shape, bg colour)


def all_combinations() -> list[Combo]:
    """Every (fg, shape, bg) with fg != bg, in a fixed order (6 * 3 * 5 = 90)."""
    return [(f, s, b) for f, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if f != b]


def _pairs(combo: Combo) -> tuple[tuple[str, str, str], ...]:
    """The three attribute pairs of a combo, tagged by role so (fg=red) differs from (bg=red)."""
    f, s, b = combo
    return (("fs", f, s), ("sb", s, b), ("fb", f, b))


def heldout_combinations(seed: int = 0) -> list[Combo]:
    """About 10% of all fg != bg combos, never used for training images.

    Chosen greedily from a seeded shuffle such that, for every held-out combo, each of its
    attribute pairs (fg+shape, shape+bg, fg+bg) still occurs in training; this implies every colour
    appears in training as both fg and bg and every shape appears too. Per-shape and per-colour
    caps spread the held-out set over all attributes.
    """
    combos = all_combinations()
    target = round(HELDOUT_FRACTION * len(combos))
    per_shape_cap = -(-target // len(SHAPES))
    per_colour_cap = -(-target // len(COLOURS))  # per role
    pair_counts: dict[tuple[str, str, str], int] = {}
    for c in combos:
        for p in _pairs(c):
            pair_counts[p] = pair_counts.get(p, 0) + 1

    candidates = combos[:]
    random.Random(seed).shuffle(candidates)
    chosen: list[Combo] = []
    for c in candidates:
        if len(chosen) == target:
            break
        f, s, b = c
        if (
            sum(x[1] == s for x in chosen) >= per_shape_cap
            or sum(x[0] == f for x in chosen) >= per_colour_cap
            or sum(x[2] == b for x in chosen) >= per_colour_cap
            or any(pair_counts[p] <= 1 for p in _pairs(c))  # would remove the last training example
        ):
            continue
        chosen.append(c)
        for p in _pairs(c):
            pair_counts[p] -= 1
    return sorted(chosen)


def _training_combos(num_images: int, heldout: list[Combo], rng: random.Random) -> list[Combo]:
    """Cycle through freshly shuffled passes over the training combos so counts stay balanced."""
    excluded = set(heldout)
    pool = [c for c in all_combinations() if c not in excluded]
    out: list[Combo] = []
    while len(out) < num_images:
        rng.shuffle(pool)
        out.extend(pool)
    return out[:num_images]


def write_shapes_dataset(
    out_dir: str, num_images: int, resolution: int = 64, seed: int = 0, heldout_seed: int = 0
) -> dict:
    """Write ``out_dir/train/`` (PNGs + metadata.jsonl, HF imagefolder layout) and
    ``out_dir/heldout_prompts.jsonl``; byte-identical for the same arguments.

    ``heldout_seed`` is separate from ``seed`` so datasets drawn with different image seeds share
    one evaluation split. ``train/`` is built as ``train.tmp/`` and renamed only when complete, so
    an existing ``train/`` is never half-written.
    """
    heldout = heldout_combinations(heldout_seed)
    rng = random.Random(seed)
    combos = _training_combos(num_images, heldout, rng)
    os.makedirs(out_dir, exist_ok=True)
    train_dir, tmp_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "train.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)

    width = max(5, len(str(num_images - 1)))
    with open(os.path.join(tmp_dir, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for i, (fg, shape, bg) in enumerate(combos):
            file_name = f"{i:0{width}d}.png"
            # Per-image RNG: an image depends only on (seed, index, combo), not on earlier draws.
            image = draw_shape(fg, shape, bg, resolution, random.Random(f"{seed}:{i}"))
            image.save(os.path.join(tmp_dir, file_name), format="PNG")
            row = {"file_name": file_name, "text": caption(fg, shape, bg), "fg": fg, "shape": shape, "bg": bg}
            meta.write(json.dumps(row) + "\n")

    heldout_path = os.path.join(out_dir, "heldout_prompts.jsonl")
    with open(heldout_path + ".tmp", "w", encoding="utf-8") as f:
        for fg, shape, bg in heldout:
            f.write(json.dumps({"text": caption(fg, shape, bg), "fg": fg, "shape": shape, "bg": bg}) + "\n")
    os.replace(heldout_path + ".tmp", heldout_path)

    shutil.rmtree(train_dir, ignore_errors=True)
    os.replace(tmp_dir, train_dir)
    return {
        "train_dir": train_dir,
        "heldout_path": heldout_path,
        "num_images": num_images,
        "num_train_combos": len(all_combinations()) - len(heldout),
        "num_heldout_combos": len(heldout),
        "resolution": resolution,
        "seed": seed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout_seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_shapes_dataset(
        args.output_dir, args.num_images, args.resolution, args.seed, heldout_seed=args.heldout_seed
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(run_cli(main))
