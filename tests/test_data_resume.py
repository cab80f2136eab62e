"""The training data streams resume from a small saved position, without replaying batches: latent shards
(workers, chunk shuffle, damaged samples) and raw images (epochs, crops/flips/caption choice, corrupt
images), the per-batch randomness, and the feed that counts consumed (not prefetched) batches and turns a
broken loader into one line. No XLA here: host batches only."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections import Counter

import pytest
import torch

from tests.checkpoint_worker import toy_latents
from xla_diffusion.data.config import DataConfig
from xla_diffusion.data.feed import DataFeed, cause
from xla_diffusion.data.images import ImageCaptionBatches, load_image_caption_dataset
from xla_diffusion.data.latents import LatentShardBatches
from xla_diffusion.data.randomness import CaptionDropout, WithDiffusionRandomness
from xla_diffusion.data.tar_stream import iter_tar_samples
from xla_diffusion.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("single_thread_torch")


class _Wrapped:
    """A source as the trainer sees it (the randomness wrappers over a reader)."""

    def __init__(self, source):
        self.source, self.ndims = source, source.ndims

    def iter_from(self, position):
        return self.source.iter_from(position)


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return [int(x) for x in batch["latent_mean"][:, 0, 0, 0].float()]


def _consume(source, n: int, position=None) -> tuple[list[dict], dict]:
    """n batches through a DataFeed fed by a thread that prefetches ahead (as the device loader does);
    returns them and the feed's position (JSON round trip, as a checkpoint stores it)."""
    feed = DataFeed(source, position)
    ahead: queue.Queue = queue.Queue(maxsize=6)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        for batch in feed:
            if not put(batch):
                return
        put(None)  # the stream ended (the device loader then raises StopIteration)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    loader = iter(lambda: ahead.get(timeout=60), None)
    got = [feed.take(loader) for _ in range(n)]
    stop.set()
    return got, json.loads(json.dumps(feed.position))


@pytest.mark.parametrize("workers", [0, 2])
def test_latent_stream_resumes_from_its_position(tmp_path, workers):
    m = toy_latents(str(tmp_path), bad=(1, 4))

    def source():
        return _Wrapped(LatentShardBatches(m, 4, num_workers=workers, shuffle_buffer=5, seed=1))

    straight, _ = _consume(source(), 40)
    first, position = _consume(source(), 17)
    assert position["batches"] == 17 and position["workers_count"] == max(workers, 1)
    assert len(position["workers"]) == max(workers, 1)
    assert all(len(c) == 4 for c in position["workers"].values())  # four integers per worker
    resumed, end = _consume(source(), 23, position)
    assert [_ids(b) for b in first + resumed] == [_ids(b) for b in straight]
    # The damaged sample is counted once, whether or not the stream resumed after reading its chunk.
    _, whole = _consume(source(), 40)
    assert end["skipped"] == whole["skipped"] and sum(whole["skipped"].values()) >= 1
    # Chunks are shuffled, every sample of a pass comes once, the stream goes on past a pass.
    ids = [i for b in straight for i in _ids(b)]
    assert ids[:8] != sorted(ids[:8]) and max(Counter(ids).values()) <= 4
    assert len(set(ids)) == 51  # 52 samples, one damaged


def test_latent_position_of_another_worker_count_is_one_line(tmp_path):
    m = toy_latents(str(tmp_path))
    _, position = _consume(_Wrapped(LatentShardBatches(m, 4, num_workers=2, shuffle_buffer=5)), 3)
    with pytest.raises(ConfigError, match="of 2 latent-shard reader.* resume with --dataloader_num_workers 2"):
        next(LatentShardBatches(m, 4, num_workers=0, shuffle_buffer=5).iter_from(position))


def test_tar_offsets_reopen_a_shard_at_a_sample(tmp_path):
    m = toy_latents(str(tmp_path), shards=1, per_shard=6)
    path = os.path.join(m.root, "00000.tar")
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f, Counter()))
    with open(path, "rb") as f:
        f.seek(samples[3]["__offset__"])
        rest = list(iter_tar_samples(f, Counter(), start=samples[3]["__offset__"]))
    assert [s["__key__"] for s in rest] == [s["__key__"] for s in samples[3:]]
    assert [s["__offset__"] for s in rest] == [s["__offset__"] for s in samples[3:]]


@pytest.fixture(scope="module")
def tokenizer(tiny_pipeline):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(os.path.join(tiny_pipeline, "tokenizer"))


@pytest.fixture(scope="module")
def damaged_images(shapes_dir, tmp_path_factory) -> str:
    """The 64 shapes with 3 broken files: not an image, cut short, empty."""
    out = str(tmp_path_factory.mktemp("damaged") / "train")
    shutil.copytree(os.path.join(shapes_dir, "train"), out)
    names = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    with open(os.path.join(out, names[5]), "wb") as f:
        f.write(b"this is not a png")
    path = os.path.join(out, names[20])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    open(os.path.join(out, names[41]), "wb").close()
    return out


def _image_source(folder: str, tokenizer, workers: int, seed: int = 3, **kw):
    data = DataConfig(dataset_name=None, train_data_dir=folder, batch_size=8, resolution=64, random_flip=True,
                      num_workers=workers, seed=seed, **kw)
    batches = ImageCaptionBatches(load_image_caption_dataset(data), tokenizer, data)
    return WithDiffusionRandomness(CaptionDropout(batches, 0.3, {"input_ids": torch.zeros(16, dtype=torch.long)},
                                                  seed), (4, 16, 16), 1000, seed=seed, with_latent_eps=True)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_image_stream_resumes_and_skips_corrupt_images(damaged_images, tokenizer):
    """20 batches of 8 over 64 images (2.5 epochs): straight, and 9 + resume for 11 (2 workers), are equal in
    every tensor (pixels after random crop/flip, ids after caption dropout, noise, timesteps, eps); 0 workers
    give the same batches; the 3 broken files are skipped per reason in every epoch, the shapes stay fixed."""
    straight, end = _consume(_image_source(damaged_images, tokenizer, 2), 20)
    first, position = _consume(_image_source(damaged_images, tokenizer, 2), 9)
    assert position["batches"] == 9 and set(position) == {"batches", "workers", "skipped"}
    resumed, resumed_end = _consume(_image_source(damaged_images, tokenizer, 2), 11, position)
    assert _same(first + resumed, straight)
    assert resumed_end["skipped"] == end["skipped"]
    assert _same(_consume(_image_source(damaged_images, tokenizer, 0), 20)[0], straight)
    assert all(b["pixel_values"].shape == (8, 3, 64, 64) and b["input_ids"].shape == (8, 16) for b in straight)
    # epochs 0 and 1 visit all 64 positions, epoch 2 its first 32: each broken file once per visit
    assert set(end["skipped"]) == {"unreadable_image", "damaged_image"}
    assert 6 <= sum(end["skipped"].values()) <= 9
    # another seed is another order and other random crops
    assert not _same(_consume(_image_source(damaged_images, tokenizer, 0, seed=4), 2)[0], straight[:2])


def test_a_dataset_without_usable_images_stops_with_one_line(tmp_path, shapes_dir, tokenizer):
    folder = str(tmp_path / "train")
    shutil.copytree(os.path.join(shapes_dir, "train"), folder)
    for name in os.listdir(folder):
        if name.endswith(".png"):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"junk")
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            _consume(_image_source(folder, tokenizer, workers), 1)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("the data loader stopped: ")
        assert "none of the 64 samples of this host's dataset can be used ({'unreadable_image': 64})" in msg, msg


class _DyingWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        if i == 5:
            os._exit(3)  # a worker that dies without a Python exception (killed, OOM, segfault)
        return torch.zeros(2)


class _LoaderSource:
    """A source whose DataLoader worker dies at batch 2 ("exit"), or whose reader raises at batch 3 ("raise")."""

    ndims = {"x": 2}

    def __init__(self, workers: int, fail: str):
        self.workers, self.fail = workers, fail

    def iter_from(self, position):
        if self.fail == "raise":
            for k in range(100):
                if k == 3:
                    raise ValueError(f"cannot parse record {k}")
                yield {"x": torch.zeros(2, 2)}, {"index": k}
        loader = torch.utils.data.DataLoader(_DyingWorker(), batch_size=2, num_workers=self.workers)
        for k, x in enumerate(loader):
            yield {"x": x}, {"index": k}


def test_a_dead_loader_worker_is_one_line_naming_the_cause():
    with pytest.raises(DataError) as e:
        _consume(_LoaderSource(2, "exit"), 10)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the data loader stopped: ") and "exited unexpectedly" in msg, msg
    with pytest.raises(DataError) as e:
        _consume(_LoaderSource(0, "raise"), 10)
    assert str(e.value) == "the data loader stopped: ValueError: cannot parse record 3"
    # a worker's exception comes back with its traceback in the message: its last line is the cause
    wrapped = ValueError("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 3, in f\n    raise ValueError('bad caption')\n"
                         "ValueError: bad caption\n")
    assert cause(wrapped) == "ValueError: bad caption"
