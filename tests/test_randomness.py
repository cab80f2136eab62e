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


def test_objective_draws_only_when_asked_and_leave_the_rest_unchanged():
    """--noise_offset / --input_perturbation add their standard normal draws to the batch, seeded like the rest
    from a stream of their own: the noise and timesteps of a run do not change when an option is switched on."""
    plain = _take(WithDiffusionRandomness(_Source(), (4, 2, 2), 1000, seed=3), 3)
    both = WithDiffusionRandomness(_Source(), (4, 2, 2), 1000, seed=3,
                                   extra_draws=("perturbation_draw", "offset_draw"))
    assert both.ndims["offset_draw"] == both.ndims["perturbation_draw"] == 4
    drawn = _take(both, 3)
    for p, d in zip(plain, drawn):
        assert set(d) - set(p) == {"offset_draw", "perturbation_draw"}
        assert all(torch.equal(p[k], d[k]) for k in p)
        assert d["offset_draw"].shape == (64, 4, 1, 1) and d["perturbation_draw"].shape == (64, 4, 2, 2)
    again = _take(WithDiffusionRandomness(_Source(), (4, 2, 2), 1000, seed=3,
                                          extra_draws=("offset_draw", "perturbation_draw")), 3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(drawn, again) for k in a)
    assert not torch.equal(drawn[0]["offset_draw"], drawn[1]["offset_draw"])
    sample = torch.cat([d["perturbation_draw"].flatten() for d in drawn])
    assert abs(float(sample.mean())) < 0.1 and abs(float(sample.std()) - 1) < 0.1


def test_number_of_samples_passes_through_the_wrappers():
    source = _Source()
    source.num_samples = 640
    wrapped = CaptionDropout(WithDiffusionRandomness(source, (4, 2, 2), 1000, seed=0), 0.1,
                             {"input_ids": torch.zeros(5, dtype=torch.long)}, seed=0)
    assert wrapped.num_samples == 640
    assert WithDiffusionRandomness(_Source(), (4, 2, 2), 1000, seed=0).num_samples is None


def test_draws_depend_on_the_batch_index_alone():
    """A stream started at batch 7 draws for batch 7 exactly what the stream from 0 drew there: no generator
    state to save in a checkpoint."""
    source = WithDiffusionRandomness(CaptionDropout(_Source(), 0.5, {"input_ids": torch.zeros(5, dtype=torch.long)},
                                                    seed=1), (4, 2, 2), 1000, seed=3)
    straight = _take(source, 10)
    resumed = [b for b, _ in _take(source.iter_from({"batches": 7}), 3)]
    for x, y in zip(straight[7:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)
