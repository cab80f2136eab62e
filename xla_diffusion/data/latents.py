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
ends), samples go through a shuffle buffer and come out as fixed-shape batches.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import fsio
from ..errors import ConfigError
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


class _LatentSampleStream(torch.utils.data.IterableDataset):
    """Endless batches from a list of shards, for one host; split further among DataLoader workers."""

    def __init__(
        self, shards: list[str], manifest: LatentManifest, batch_size: int, shuffle_buffer: int, seed: int,
        text_dtype: torch.dtype, use_text_states: bool,
    ):
        super().__init__()
        self.shards, self.manifest, self.batch_size = shards, manifest, batch_size
        self.shuffle_buffer, self.seed, self.text_dtype = shuffle_buffer, seed, text_dtype
        self.use_text_states = use_text_states
        self.errors: Counter = Counter()  # skipped data, by reason (this process's workers log theirs)

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _samples(self, shards: list[str], rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
        """Shards in a fresh random order per pass, forever; damaged samples skipped and counted."""
        while True:
            order = shards[:]
            rng.shuffle(order)
            yielded = 0
            for url in order:
                before = sum(self.errors.values())
                for decoded in read_shard(url, self.manifest, self.errors):
                    yielded += 1
                    yield decoded
                if sum(self.errors.values()) > before:
                    log.warning("latent shard %s: skipped so far %s", url, dict(self.errors))
            if not yielded:
                raise RuntimeError(f"no readable sample in the latent shards {shards}")

    def _collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(samples, self.use_text_states, self.text_dtype)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import webdataset as wds

        worker, num_workers = self._worker()
        shards = self.shards[worker::num_workers]
        rng = random.Random(f"{self.seed}:{worker}")
        samples = self._samples(shards, random.Random(f"{self.seed}:{worker}:shards"))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        yield from wds.batched(self.batch_size, collation_fn=self._collate, partial=False)(samples)


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
    (when the shards hold text states and `use_text_states`) or `input_ids` (B, L) int64."""

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
    ):
        all_shards = list_shards(manifest.root) if shards is None else shards
        if not all_shards:
            raise ConfigError(f"no latent shards (*.tar) at {manifest.root}")
        self.shards = shards_for_process(all_shards, process_index, process_count)
        if num_workers > len(self.shards):
            log.warning("%d loader workers for %d shards on this host: using %d", num_workers, len(self.shards),
                        len(self.shards))
            num_workers = len(self.shards)
        self.num_workers = num_workers
        self.use_text_states = use_text_states and manifest.has_text_states
        self.stream = _LatentSampleStream(
            self.shards, manifest, batch_size, shuffle_buffer,
            # Distinct streams per host; the same for every run with this seed.
            seed=seed * 1_000_003 + process_index, text_dtype=text_dtype, use_text_states=self.use_text_states,
        )
        self.ndims = batch_ndims(self.use_text_states)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None, persistent_workers=False,
        )
        yield from loader


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
    )
    log.info(
        "training on pre-encoded latents at %s: %d of %d shards on this host, text states %s",
        manifest.root, len(batches.shards), len(shards),
        "stored" if batches.use_text_states else "computed in the step",
    )
    source = WithDiffusionRandomness(
        batches, manifest.latent_shape, models.noise_scheduler.config.num_train_timesteps,
        seed=data.seed, process_index=rt.process_index,
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
