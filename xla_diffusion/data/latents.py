"""Pre-encoded latent shards (written by `data_prep/encode.py`) → fixed-shape host batches.

Layout of a latent dataset (local folder or gs:// prefix):

    manifest.json              what made the latents: model, VAE scaling, resolution, shapes, counts
    empty_prompt.safetensors   text states / ids of the empty caption (for caption dropout / CFG)
    00000.tar  00000.stats.json  ...   webdataset shards; one sample = KEY.safetensors + KEY.txt + KEY.json

Each `KEY.safetensors` holds `latent_mean` and `latent_std` (C, h, w) bf16: the VAE posterior, sampled in
the step as mean + std * eps with host-drawn eps exactly like on-the-fly encoding; `input_ids` (L,) int32;
and, unless encoded with --no_text_states, `encoder_hidden_states` (L, D) bf16.

Reading: every host takes its own shards (`shards[process_index::process_count]`: TPU pods have no
torch.distributed rank in the environment, so the split uses the runtime's process index), each loader
worker its own part of those, shards are visited in a fresh seeded order per pass, forever (the stream never
ends), each shard is read in chunks that are emitted in a seeded permutation, and samples come out as
fixed-shape batches. A worker's position is four integers (see `_LatentSampleStream`), so a resumed run
seeks to it instead of replaying the batches before it.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import fsio
from ..errors import ConfigError, DataError
from .randomness import sample_generator
from .tar_stream import iter_tar_samples

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "xla_diffusion.latents"
FORMAT_VERSION = 1
EMPTY_PROMPT = "empty_prompt.safetensors"


@dataclass(frozen=True)
class LatentManifest:
    """The parts of manifest.json the trainer relies on (the file holds more: model ids, counts)."""

    root: str
    resolution: int
    latent_shape: tuple[int, int, int]  # (C, h, w)
    text_shape: tuple[int, int]  # (L, D): token length, text encoder hidden size
    has_text_states: bool
    scaling_factor: float
    shift_factor: float | None
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, root: str, m: dict[str, Any]) -> LatentManifest:
        if m.get("format") != FORMAT or int(m.get("version", -1)) > FORMAT_VERSION:
            raise ConfigError(
                f"{fsio.join(root, MANIFEST)} is not a latent dataset manifest this version can read "
                f"(format {m.get('format')!r}, version {m.get('version')!r})"
            )
        return cls(
            root=root,
            resolution=int(m["resolution"]),
            latent_shape=tuple(int(x) for x in m["latent_shape"]),
            text_shape=tuple(int(x) for x in m["text_shape"]),
            has_text_states=bool(m["text_states"]),
            scaling_factor=float(m["vae"]["scaling_factor"]),
            shift_factor=None if m["vae"].get("shift_factor") is None else float(m["vae"]["shift_factor"]),
            raw=m,
        )


def read_manifest(root: str | None) -> LatentManifest | None:
    """The manifest of the latent dataset at `root`, or None when `root` is not one (e.g. an image folder)."""
    if not root:
        return None
    path = fsio.join(root, MANIFEST)
    try:
        if not fsio.exists(path):
            return None
        data = fsio.read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    return LatentManifest.from_dict(root, data)


def check_matches_model(
    manifest: LatentManifest, unet_config: Any, resolution: int, text_hidden_size: int | None = None,
    tokenizer_max_length: int | None = None,
) -> None:
    """Raise ConfigError (one line) when the latents cannot feed this model: latent channels vs the UNet's
    input channels, text hidden size vs its cross-attention width, the resolution, the token length."""
    where = manifest.root
    channels = manifest.latent_shape[0]
    if channels != unet_config.in_channels:
        raise ConfigError(
            f"the latent shards at {where} have {channels} latent channels but the UNet takes "
            f"{unet_config.in_channels}: they were encoded with another VAE ({manifest.raw.get('vae', {}).get('id')})"
        )
    cross = unet_config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    hidden = manifest.text_shape[1]
    if manifest.has_text_states and hidden != cross:
        raise ConfigError(
            f"the latent shards at {where} hold text states of width {hidden} but the UNet cross-attends to "
            f"width {cross}: they were encoded with another text encoder"
        )
    if text_hidden_size is not None and text_hidden_size != cross:
        raise ConfigError(f"the text encoder's width {text_hidden_size} does not match the UNet's {cross}")
    if resolution != manifest.resolution:
        raise ConfigError(
            f"--resolution {resolution} but the latent shards at {where} were encoded at "
            f"{manifest.resolution} px: pass --resolution {manifest.resolution} or re-encode"
        )
    if tokenizer_max_length is not None and tokenizer_max_length != manifest.text_shape[0]:
        raise ConfigError(
            f"the latent shards hold {manifest.text_shape[0]} token ids per caption but the tokenizer's max "
            f"length is {tokenizer_max_length}"
        )


def list_shards(root: str) -> list[str]:
    """Every finished shard (`*.tar`) of a latent dataset, sorted by name."""
    return fsio.list_files(root, ".tar")


def shards_for_process(shards: list[str], process_index: int, process_count: int) -> list[str]:
    """This host's shards: every process_count-th one from process_index. The parts of all hosts are
    disjoint and together are all shards. Raises ConfigError when some host would get none."""
    if len(shards) < process_count:
        raise ConfigError(
            f"{len(shards)} latent shards cannot be split over {process_count} hosts; re-encode with smaller "
            "--samples_per_shard (or more input shards) so every host reads its own"
        )
    return shards[process_index::process_count]


def decode_sample(sample: dict[str, Any], manifest: LatentManifest) -> dict[str, torch.Tensor]:
    """One shard sample → CPU tensors with the manifest's shapes; raises ValueError when it does not fit."""
    from safetensors.torch import load as load_safetensors

    if "safetensors" not in sample:
        raise ValueError("no .safetensors member")
    t = load_safetensors(sample["safetensors"])
    out = {"latent_mean": t["latent_mean"], "latent_std": t["latent_std"], "input_ids": t["input_ids"]}
    if manifest.has_text_states:
        out["encoder_hidden_states"] = t["encoder_hidden_states"]
    expected = {
        "latent_mean": manifest.latent_shape, "latent_std": manifest.latent_shape,
        "input_ids": manifest.text_shape[:1], "encoder_hidden_states": manifest.text_shape,
    }
    for k, v in out.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise ValueError(f"{k} has shape {tuple(v.shape)}, expected {tuple(expected[k])}")
    return out


def read_shard(url: str, manifest: LatentManifest, errors: Counter) -> Iterator[dict[str, torch.Tensor]]:
    """The decoded samples of one latent shard, in order; damaged members and undecodable samples are
    skipped and counted in `errors` (the tar reader's reasons, and `bad_sample`)."""
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        for sample in iter_tar_samples(f, errors):
            try:
                decoded = decode_sample(sample, manifest)
            except Exception as e:  # noqa: BLE001 (any undecodable sample is skipped, not fatal)
                errors["bad_sample"] += 1
                log.warning("skipping sample %s of %s: %s", sample.get("__key__"), url, e)
                continue
            yield decoded


def collate(samples: list[dict[str, torch.Tensor]], use_text_states: bool, text_dtype: torch.dtype
            ) -> dict[str, torch.Tensor]:
    """Samples → one host batch: `latent_mean`, `latent_std` (B, C, h, w) bf16, and `encoder_hidden_states`
    (B, L, D) in `text_dtype` (the dtype the text encoder would have produced in the step) or `input_ids` (B, L)
    int64."""
    batch = {
        "latent_mean": torch.stack([s["latent_mean"] for s in samples]),
        "latent_std": torch.stack([s["latent_std"] for s in samples]),
    }
    if use_text_states:
        batch["encoder_hidden_states"] = torch.stack([s["encoder_hidden_states"] for s in samples]).to(text_dtype)
    else:
        batch["input_ids"] = torch.stack([s["input_ids"] for s in samples]).long()
    return batch


def batch_ndims(use_text_states: bool) -> dict[str, int]:
    """Rank of every key `collate` yields (the device loader shards each one on dim 0)."""
    text = {"encoder_hidden_states": 3} if use_text_states else {"input_ids": 2}
    return {"latent_mean": 4, "latent_std": 4, **text}


def _identity(x: Any) -> Any:
    return x


class _LatentSampleStream(torch.utils.data.IterableDataset):
    """Endless batches from a list of shards, for one host, split over `num_workers` loader workers.

    Logical worker w reads `shards[w::W]`: pass p visits them in an order seeded by (seed, w, p); each shard is
    read in chunks of `chunk_size` consecutive samples, and each chunk is emitted in a permutation seeded by
    (seed, w, p, shard position, chunk offset). Where worker w's next sample comes from is its cursor
    `[pass, shard position, byte offset of the chunk in the shard, samples of the chunk already taken]`:
    resuming reopens that shard at that offset, re-reads one chunk and skips the taken samples, whatever the
    step. Host batch k is worker k mod W's: the DataLoader takes batches from its workers round-robin, and
    when the stream restarts at batch k0 DataLoader worker i plays logical worker (k0 + i) mod W.
    """

    def __init__(
        self, shards: list[str], manifest: LatentManifest, batch_size: int, chunk_size: int, seed: int,
        text_dtype: torch.dtype, use_text_states: bool, num_workers: int,
    ):
        super().__init__()
        self.shards, self.manifest, self.batch_size = shards, manifest, batch_size
        self.chunk_size, self.seed, self.text_dtype = chunk_size, seed, text_dtype
        self.use_text_states = use_text_states
        self.workers = max(num_workers, 1)  # logical workers (0 loader workers: one, in this process)
        self.start: tuple[int, dict[int, list[int]]] = (0, {})  # (first host batch, cursor per logical worker)

    def _chunks(self, shards: list[str], worker: int, cursor: list[int]
                ) -> Iterator[tuple[list[dict[str, torch.Tensor]], list[int], Counter]]:
        """(decoded samples of one chunk in emission order, the chunk's cursor with taken=0, damage counted
        while reading it), from `cursor` on, forever. The first chunk comes without the samples the cursor
        says were taken, and without its damage when some were (it was counted then)."""
        p, s, offset, taken = cursor
        while True:
            order = list(range(len(shards)))
            random.Random(f"{self.seed}:{worker}:{p}").shuffle(order)
            yielded = 0
            while s < len(order):
                url = shards[order[s]]
                fs, path = fsio.url_to_fs(url)
                with fs.open(path, "rb") as f:
                    if offset:
                        f.seek(offset)
                    errors: Counter = Counter()
                    raw = iter_tar_samples(f, errors, start=offset)
                    while True:
                        chunk_start, before = None, Counter(errors)
                        decoded = []
                        for sample in itertools.islice(raw, self.chunk_size):
                            if chunk_start is None:
                                chunk_start = int(sample["__offset__"])
                            try:
                                decoded.append(decode_sample(sample, self.manifest))
                            except Exception as e:  # noqa: BLE001 (an undecodable sample is skipped, not fatal)
                                errors["bad_sample"] += 1
                                log.warning("skipping sample %s of %s: %s", sample.get("__key__"), url, e)
                        damage = errors - before
                        if damage:
                            log.warning("latent shard %s: skipped %s", url, dict(damage))
                        if chunk_start is None:  # end of the shard (damage at its tail goes with the next batch)
                            if damage:
                                yield [], [p, s, 0, 0], damage
                            break
                        g = sample_generator(self.seed, worker, p, s, chunk_start)
                        emitted = [decoded[i] for i in torch.randperm(len(decoded), generator=g).tolist()]
                        yielded += len(emitted)
                        yield emitted[taken:], [p, s, chunk_start, taken], (Counter() if taken else damage)
                        taken = 0
                s, offset = s + 1, 0
            if not yielded and cursor == [0, 0, 0, 0]:
                raise DataError(f"no readable sample in the latent shards {shards}")
            p, s, cursor = p + 1, 0, [0, 0, 0, 0]

    def _worker_batches(self, worker: int, cursor: list[int], index: int
                        ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        shards = self.shards[worker :: self.workers]
        samples: list[dict[str, torch.Tensor]] = []
        skipped: Counter = Counter()
        for chunk, at, damage in self._chunks(shards, worker, cursor):
            skipped.update(damage)
            for i, sample in enumerate(chunk):
                samples.append(sample)
                if len(samples) == self.batch_size:
                    after = [at[0], at[1], at[2], at[3] + i + 1]
                    meta = {"index": index, "worker": worker, "workers_count": self.workers, "cursor": after,
                            "skipped": dict(skipped)}
                    yield collate(samples, self.use_text_states, self.text_dtype), meta
                    index += self.workers
                    samples, skipped = [], Counter()

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        i = 0 if info is None else info.id
        first, cursors = self.start
        worker = (first + i) % self.workers
        yield from self._worker_batches(worker, list(cursors.get(worker, [0, 0, 0, 0])), first + i)


class OrderedLatentBatches:
    """Re-iterable single pass over shards in their order (held-out evaluation): the same shard reader and
    collation as the training stream, no shuffling, at most `max_samples` samples, last partial batch dropped."""

    def __init__(self, manifest: LatentManifest, shards: list[str], batch_size: int, use_text_states: bool,
                 text_dtype: torch.dtype, max_samples: int | None = None):
        self.manifest, self.shards, self.batch_size = manifest, shards, batch_size
        self.use_text_states, self.text_dtype, self.max_samples = use_text_states, text_dtype, max_samples
        self.ndims = batch_ndims(use_text_states)
        self.errors: Counter = Counter()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        samples = (s for url in self.shards for s in read_shard(url, self.manifest, self.errors))
        chunk: list[dict[str, torch.Tensor]] = []
        for count, sample in enumerate(samples):
            if self.max_samples is not None and count >= self.max_samples:
                return
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                yield collate(chunk, self.use_text_states, self.text_dtype)
                chunk = []


class LatentShardBatches:
    """Endless, fixed-shape host batches from latent shards:
    `latent_mean`, `latent_std` (B, C, h, w) bf16, and `encoder_hidden_states` (B, L, D) in `text_dtype`
    (when the shards hold text states and `use_text_states`) or `input_ids` (B, L) int64.

    `iter_from(position)` yields `(batch, meta)` from host batch `position["batches"]` on, each worker at its
    cursor in `position["workers"]` (see `_LatentSampleStream`); meta = {"index": k, "worker": w, "cursor":
    w's cursor after this batch, "skipped": {reason: count} found while reading it}. Iterating the object
    itself yields the batches alone, from the start. `shuffle_buffer` is the size of the shuffled chunks.
    """

    def __init__(
        self,
        manifest: LatentManifest,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        text_dtype: torch.dtype = torch.float32,
        use_text_states: bool = True,
        shards: list[str] | None = None,
        prefetch_factor: int = 4,
    ):
        all_shards = list_shards(manifest.root) if shards is None else shards
        if not all_shards:
            raise ConfigError(f"no latent shards (*.tar) at {manifest.root}")
        self.shards = shards_for_process(all_shards, process_index, process_count)
        if num_workers > len(self.shards):
            log.warning("%d loader workers for %d shards on this host: using %d", num_workers, len(self.shards),
                        len(self.shards))
            num_workers = len(self.shards)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.use_text_states = use_text_states and manifest.has_text_states
        self.stream = _LatentSampleStream(
            self.shards, manifest, batch_size, shuffle_buffer,
            # Distinct streams per host; the same for every run with this seed.
            seed=seed * 1_000_003 + process_index, text_dtype=text_dtype, use_text_states=self.use_text_states,
            num_workers=num_workers,
        )
        self.ndims = batch_ndims(self.use_text_states)

    def iter_from(self, position: dict[str, Any] | None) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        position = position or {}
        workers = int(position.get("workers_count", self.stream.workers))
        if workers != self.stream.workers:
            raise ConfigError(
                f"the saved data position is of {workers} latent-shard reader(s) and this run has "
                f"{self.stream.workers}: resume with --dataloader_num_workers {workers if workers > 1 else 0} "
                "(the shards are split among the workers)"
            )
        self.stream.start = (int(position.get("batches", 0)),
                             {int(w): list(c) for w, c in position.get("workers", {}).items()})
        yield from torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
            prefetch_factor=self.prefetch_factor if self.num_workers else None, persistent_workers=False,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (batch for batch, _ in self.iter_from(None))


def build_latent_source(data: Any, models: Any, rt: Any, manifest: LatentManifest) -> Any:
    """The trainer's data source for a latent dataset (`data`: a `data.source.DataConfig`): this host's
    `LatentShardBatches` wrapped with the per-step randomness (`noise`, `timesteps`, and `latent_eps` to sample
    the stored posterior). Raises ConfigError when the latents do not fit the model or the flags."""
    from .randomness import WithDiffusionRandomness

    if data.random_flip:
        raise ConfigError("--random_flip cannot apply to pre-encoded latents (they were encoded unflipped)")
    text_encoder = models.text_encoder
    check_matches_model(
        manifest, models.unet.config, data.resolution,
        text_hidden_size=None if manifest.has_text_states else text_encoder.config.hidden_size,
        tokenizer_max_length=None if manifest.has_text_states else models.tokenizer.model_max_length,
    )
    vae_config = models.vae_config
    if abs(float(vae_config.scaling_factor) - manifest.scaling_factor) > 1e-9:
        log.warning(
            "the latent shards were encoded with scaling_factor %s but the pipeline's VAE has %s; training uses "
            "the shards' value", manifest.scaling_factor, vae_config.scaling_factor,
        )
    shards = list_shards(manifest.root)
    batches = LatentShardBatches(
        manifest, data.batch_size, rt.process_index, rt.process_count, data.num_workers,
        shuffle_buffer=data.shuffle_buffer_size, seed=data.seed, text_dtype=data.text_dtype, shards=shards,
        prefetch_factor=data.prefetch_factor,
    )
    # The encoder records how many samples its shards hold (data_prep.encode_output.update_manifest_counts).
    samples = manifest.raw.get("counts", {}).get("samples")
    batches.num_samples = int(samples) if samples else None
    log.info(
        "training on pre-encoded latents at %s: %d of %d shards on this host, text states %s",
        manifest.root, len(batches.shards), len(shards),
        "stored" if batches.use_text_states else "computed in the step",
    )
    source = WithDiffusionRandomness(
        batches, manifest.latent_shape, models.noise_scheduler.config.num_train_timesteps,
        seed=data.seed, process_index=rt.process_index, extra_draws=data.extra_draws,
    )
    # For caption dropout (data.source.empty_prompt): the empty caption in the form the batches carry.
    source.empty_prompt = read_empty_prompt(manifest, data.text_dtype) if batches.use_text_states else None
    return source


def read_empty_prompt(manifest: LatentManifest, text_dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """`{"encoder_hidden_states": (L, D)}` of the empty caption, stored by the encoder beside the shards;
    None when the dataset has none."""
    from safetensors.torch import load as load_safetensors

    path = fsio.join(manifest.root, EMPTY_PROMPT)
    if not manifest.has_text_states or not fsio.exists(path):
        return None
    tensors = load_safetensors(fsio.read_bytes(path))
    return {"encoder_hidden_states": tensors["encoder_hidden_states"].to(text_dtype)}
