"""Host-drawn per-step randomness: deterministic, per-host distinct, and caption dropout."""

import torch

from xla_diffusion.data.randomness import CaptionDropout, WithDiffusionRandomness


class _Source:
    ndims = {"input_ids": 2}

    def iter_from(self, position):
        i = (position or {}).get("batches", 0)
        while True:
            yield {"input_ids": torch.arange(i, i + 64 * 5).reshape(64, 5) + 100}, {"index": i}
            i += 1

    def __iter__(self):
        return (batch for batch, _ in self.iter_from(None))


def _take(it, n):
    it = iter(it)
    return [next(it) for _ in range(n)]


def test_randomness_is_seeded_and_distinct_per_host():
    a = _take(WithDiffusionRandomness(_Source(), (4, 2, 2), 1000, seed=3, process_index=0), 2)
    b = _take(WithDiffusionRandomness(_Source(), (4, 2, 2), 1000, seed=3, process_index=0), 2)
    c = _take(WithDiffusionRandomness(_Source(), (4, 2, 2), 1000, seed=3, process_index=1), 2)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["noise"], c[0]["noise"])
    assert a[0]["noise"].shape == (64, 4, 2, 2) and a[0]["timesteps"].dtype == torch.int64
    assert int(a[0]["timesteps"].min()) >= 0 and int(a[0]["timesteps"].max()) < 1000


def test_caption_dropout_replaces_a_fraction_with_the_empty_prompt():
    empty = torch.tensor([1, 2, 2, 2, 2])
    batches = _take(CaptionDropout(_Source(), 0.25, {"input_ids": empty}, seed=0), 20)
    originals = _take(_Source(), 20)
    dropped = 0
    for got, orig in zip(batches, originals):
        is_empty = (got["input_ids"] == empty).all(dim=1)
        kept = (got["input_ids"] == orig["input_ids"]).all(dim=1)
        assert bool((is_empty ^ kept).all())  # every row is either untouched or exactly the empty prompt
        dropped += int(is_empty.sum())
    assert 0.18 < dropped / (20 * 64) < 0.32
    again = _take(CaptionDropout(_Source(), 0.25, {"input_ids": empty}, seed=0), 20)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))


def test_draws_depend_on_the_batch_index_alone():
    """A stream started at batch 7 draws for batch 7 exactly what the stream from 0 drew there: no generator
    state to save in a checkpoint."""
    source = WithDiffusionRandomness(CaptionDropout(_Source(), 0.5, {"input_ids": torch.zeros(5, dtype=torch.long)},
                                                    seed=1), (4, 2, 2), 1000, seed=3)
    straight = _take(source, 10)
    resumed = [b for b, _ in _take(source.iter_from({"batches": 7}), 3)]
    for x, y in zip(straight[7:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)
