"""Evaluation inside the training loop: every --eval_steps the fixed-timestep validation loss on a held-out
set, every --validation_steps samples of the validation prompts.

Both run between two training steps, after the step's graph was cut, in graphs of their own: the loss is
`train_step.compute_loss` without the backward pass on fixed-shape batches (one graph, compiled at the first
evaluation and reused for every batch, timestep and later evaluation), sampling is eval.sample's fixed-shape
loop on the mesh. They read the UNet's weights and write nothing the step reads, so the training graph never
changes. Their compilations are counted apart from the training step's (logged as `eval_compilations` and
`validation_compilations`, cumulative), so the step's own bound (--max_compilations) still holds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import runtime
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


def _contiguous_offset(n: int, process_index: int, process_count: int) -> int:
    """Index of this host's first sample under datasets' contiguous sharding of n samples."""
    base, extra = divmod(n, process_count)
    return process_index * base + min(process_index, extra)


class _OrderedImageBatches:
    """Re-iterable single pass over held-out images (ImageCaptionBatches.ordered_pass)."""

    def __init__(self, batches: Any):
        self.batches, self.ndims = batches, batches.ndims

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches.ordered_pass()


class _OrderedLatentBatches:
    """Re-iterable single pass over this host's latent shards, in shard order, last partial batch dropped."""

    def __init__(self, manifest: Any, shards: list[str], batch_size: int, use_text_states: bool,
                 text_dtype: torch.dtype, max_samples: int | None):
        self.manifest, self.shards, self.batch_size = manifest, shards, batch_size
        self.use_text_states, self.text_dtype, self.max_samples = use_text_states, text_dtype, max_samples
        self.ndims = {"latent_mean": 4, "latent_std": 4}
        self.ndims.update({"encoder_hidden_states": 3} if use_text_states else {"input_ids": 2})

    def _samples(self) -> Iterator[dict[str, torch.Tensor]]:
        from collections import Counter

        from . import fsio
        from .data.latents import decode_sample
        from .data.tar_stream import iter_tar_samples

        errors: Counter = Counter()
        count = 0
        for url in self.shards:
            fs, path = fsio.url_to_fs(url)
            with fs.open(path, "rb") as f:
                for sample in iter_tar_samples(f, errors):
                    if self.max_samples is not None and count >= self.max_samples:
                        return
                    count += 1
                    yield decode_sample(sample, self.manifest)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        chunk: list[dict[str, torch.Tensor]] = []
        for s in self._samples():
            chunk.append(s)
            if len(chunk) == self.batch_size:
                batch = {"latent_mean": torch.stack([c["latent_mean"] for c in chunk]),
                         "latent_std": torch.stack([c["latent_std"] for c in chunk])}
                if self.use_text_states:
                    batch["encoder_hidden_states"] = torch.stack(
                        [c["encoder_hidden_states"] for c in chunk]).to(self.text_dtype)
                else:
                    batch["input_ids"] = torch.stack([c["input_ids"] for c in chunk]).long()
                yield batch
                chunk = []


def heldout_batches(cfg: TrainConfig, models: Any, rt: runtime.Runtime) -> Any:
    """This host's held-out set as `FixedTimestepBatches` yielding (t, host batch) with the training batch
    size: --eval_data_dir (image folder or latent dataset), else the --eval_fraction the training source
    leaves out. Raises ConfigError when it cannot give one full batch."""
    from eval.metrics import FixedTimestepBatches, fixed_timesteps

    from .data.images import ImageCaptionBatches, load_image_caption_dataset
    from .data.latents import list_shards, read_manifest, shards_for_process
    from .models import frozen_dtype

    train_manifest = read_manifest(cfg.train_data_dir) if cfg.dataset_name is None else None
    eval_manifest = read_manifest(cfg.eval_data_dir) if cfg.eval_data_dir else None
    if train_manifest is not None and cfg.eval_data_dir is None:
        raise ConfigError("--eval_steps on latent shards needs --eval_data_dir (a held-out latent dataset or "
                          "image folder): the shards cannot hold a fraction out")
    timesteps = fixed_timesteps(models.noise_scheduler.config.num_train_timesteps, cfg.eval_timesteps)
    b = cfg.train_batch_size
    if eval_manifest is not None:
        if eval_manifest.has_text_states is False and models.text_encoder is None:
            raise ConfigError(f"the held-out latents at {cfg.eval_data_dir} hold no text states and the text "
                              "encoder is not loaded")
        shards = shards_for_process(list_shards(eval_manifest.root), rt.process_index, rt.process_count)
        use_states = eval_manifest.has_text_states and (train_manifest is None or train_manifest.has_text_states)
        source: Any = _OrderedLatentBatches(eval_manifest, shards, b, use_states,
                                            frozen_dtype(cfg.mixed_precision), cfg.max_eval_samples)
        latent_shape, offset = eval_manifest.latent_shape, rt.process_index << 32  # distinct per host
    else:
        if models.vae is None:
            raise ConfigError("held-out images need the VAE, which training on latent shards does not load: "
                              "pass a latent dataset as --eval_data_dir")
        dataset = load_image_caption_dataset(
            None if cfg.eval_data_dir else cfg.dataset_name, cfg.eval_data_dir or cfg.train_data_dir,
            cfg.image_column, cfg.caption_column, dataset_config_name=cfg.dataset_config_name,
            cache_dir=cfg.cache_dir, max_train_samples=None if cfg.eval_data_dir else cfg.max_train_samples,
            heldout_fraction=0.0 if cfg.eval_data_dir else cfg.eval_fraction, part="heldout",
        )
        total = len(dataset)
        if rt.process_count > 1:
            dataset = dataset.shard(num_shards=rt.process_count, index=rt.process_index, contiguous=True)
        if cfg.max_eval_samples is not None:
            dataset = dataset.select(range(min(cfg.max_eval_samples, len(dataset))))
        if len(dataset) < b:
            raise ConfigError(f"the held-out set has {len(dataset)} samples on this host, fewer than one batch "
                              f"(--train_batch_size {b}): raise --eval_fraction or pass a larger --eval_data_dir")
        source = _OrderedImageBatches(ImageCaptionBatches(
            dataset, models.tokenizer, cfg.image_column, cfg.caption_column, b, cfg.resolution,
            center_crop=True, random_flip=False, num_workers=cfg.dataloader_num_workers, seed=cfg.seed,
            pixel_dtype=frozen_dtype(cfg.mixed_precision),
        ))
        latent_shape = models.latent_shape(cfg.resolution)
        offset = _contiguous_offset(total, rt.process_index, rt.process_count)
    # Seed 0, not --seed: runs with different seeds are scored on exactly the same noise.
    return FixedTimestepBatches(source, timesteps, latent_shape, seed=0, index_offset=offset)


@dataclass
class InLoopEvaluator:
    """Runs the evaluations due at a step and keeps their compilation counts and time apart from the step's."""

    cfg: TrainConfig
    rt: runtime.Runtime
    tracker: Any
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    alphas_cumprod: torch.Tensor
    step_cfg: Any
    heldout: Any = None
    sampler: Any = None  # eval.sample.SamplerModels on the device
    prompt_records: list[dict[str, Any]] = field(default_factory=list)
    eval_compilations: int = 0
    validation_compilations: int = 0
    seconds: float = 0.0

    @classmethod
    def create(cls, cfg: TrainConfig, models: Any, rt: runtime.Runtime, tracker: Any, unet: torch.nn.Module,
               vae: torch.nn.Module | None, text_encoder: torch.nn.Module | None, alphas_cumprod: torch.Tensor,
               step_cfg: Any) -> InLoopEvaluator | None:
        """None when neither evaluation is on; raises ConfigError for bad evaluation inputs (before training)."""
        if cfg.eval_steps == 0 and cfg.validation_steps == 0:
            return None
        ev = cls(cfg, rt, tracker, unet, vae, text_encoder, alphas_cumprod, step_cfg)
        if cfg.eval_steps:
            ev.heldout = heldout_batches(cfg, models, rt)
        if cfg.validation_steps:
            ev._setup_sampling(models)
        return ev

    def _setup_sampling(self, models: Any) -> None:
        from eval.common import EvalError, load_prompt_records
        from eval.sample import SamplerModels

        from .models import frozen_dtype, load_models

        value = self.cfg.validation_prompts
        try:
            self.prompt_records = (load_prompt_records(prompt_file=value) if os.path.isfile(value)
                                   else load_prompt_records(prompt=value))
        except EvalError as e:
            raise ConfigError(f"--validation_prompts: {e}") from None
        vae, text_encoder = self.vae, self.text_encoder
        if vae is None or text_encoder is None:
            # Training on latent shards loads neither encoder; sampling needs the decoder and the text encoder.
            extra = load_models(self.cfg.pretrained_model_name_or_path, self.cfg.revision, self.cfg.variant,
                                self.cfg.cache_dir, load_unet=False, load_vae=vae is None,
                                load_text_encoder=text_encoder is None)
            dtype = frozen_dtype(self.cfg.mixed_precision)
            vae = vae if vae is not None else extra.vae.to(dtype=dtype).to(self.rt.device)
            text_encoder = text_encoder if text_encoder is not None else extra.text_encoder.to(dtype=dtype).to(
                self.rt.device)
        # Sample with the objective being trained (e.g. v-prediction from an epsilon checkpoint), as the export does.
        scheduler_config = {**models.noise_scheduler.config, "prediction_type": self.step_cfg.prediction_type}
        self.sampler = SamplerModels.from_models(models, unet=self.unet, vae=vae, text_encoder=text_encoder,
                                                 scheduler_config=scheduler_config)

    def sample_options(self) -> Any:
        from eval.sample import SampleOptions

        cfg = self.cfg
        return SampleOptions(
            guidance_scale=cfg.validation_guidance_scale, num_inference_steps=cfg.validation_num_inference_steps,
            scheduler=cfg.validation_scheduler, seed=cfg.seed, num_images_per_prompt=cfg.num_validation_images,
            max_batch_size=len(self.prompt_records) * cfg.num_validation_images, height=cfg.resolution,
            width=cfg.resolution, bf16=cfg.mixed_precision == "bf16",
        )

    def eval_loss(self, step: int) -> dict[str, Any]:
        """Fixed-timestep validation loss of the current weights; logs and returns the metrics."""
        from eval.metrics import validation_loss
        from eval.sample import eval_mode

        from .train_step import compute_loss

        def loss_fn(host_batch: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = to_device(host_batch, self.rt)
            with torch.no_grad():
                return compute_loss(self.unet, self.vae, self.text_encoder, batch, self.alphas_cumprod, plain)

        # The plain objective (no min-SNR weighting): comparable across runs with different loss weightings.
        plain = dataclasses.replace(self.step_cfg, snr_gamma=None)

        before = runtime.compile_count()
        with eval_mode(self.unet):
            metrics = validation_loss(loss_fn, self.heldout, after_each=runtime.sync)
        self.eval_compilations += runtime.compile_count() - before
        record = {"step": step, **metrics, "eval_compilations": self.eval_compilations}
        self.tracker.log(record)
        return record

    def validate(self, step: int) -> dict[str, Any]:
        """Sample the validation prompts with the current weights; process 0 writes
        OUTPUT_DIR/validation/step_XXXXXX/ (images, grid.png, samples.npz, prompts.jsonl)."""
        from eval.sample import generate, sample_records, write_samples

        opts = self.sample_options()
        before = runtime.compile_count()
        images = generate(self.sampler, [r["text"] for r in self.prompt_records], opts, mesh=self.rt.mesh)
        self.validation_compilations += runtime.compile_count() - before
        out_dir = f"{self.cfg.output_dir.rstrip('/')}/validation/step_{step:06d}"
        if self.rt.is_main_process:
            write_samples(out_dir, images, sample_records(self.prompt_records, opts),
                          grid_cols=min(8, len(images)))
        record = {"step": step, "validation_dir": out_dir, "validation_compilations": self.validation_compilations}
        self.tracker.log(record)
        return record

    def summary(self) -> dict[str, Any]:
        return {"eval_compilations": self.eval_compilations, "validation_compilations": self.validation_compilations,
                "eval_time_s": self.seconds}

    def maybe_run(self, step: int) -> tuple[int, float]:
        """Run what is due at `step`; returns (compilations, seconds) it spent, which the caller keeps out
        of the training step's counts and timing."""
        start, before = time.perf_counter(), self.eval_compilations + self.validation_compilations
        if self.cfg.eval_steps and step % self.cfg.eval_steps == 0:
            self.eval_loss(step)
        if self.cfg.validation_steps and step % self.cfg.validation_steps == 0:
            self.validate(step)
        spent = time.perf_counter() - start
        self.seconds += spent
        return self.eval_compilations + self.validation_compilations - before, spent


def to_device(batch: dict[str, torch.Tensor], rt: runtime.Runtime) -> dict[str, torch.Tensor]:
    """A host batch on the mesh, every key sharded on dim 0 the way the training loader shards it."""
    import torch_xla.core.xla_model as xm

    return {
        k: xm.send_cpu_data_to_device([v], rt.device, input_sharding=runtime.batch_sharding_spec(rt.mesh, v.ndim))[0]
        for k, v in batch.items()
    }
