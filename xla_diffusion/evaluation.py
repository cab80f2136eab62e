"""Evaluation inside the training loop: every --eval_steps the fixed-timestep validation loss on a held-out
set, every --validation_steps samples of the validation prompts.

Both run between two training steps, after the step's graph was cut, in graphs of their own: the loss is
`train_step.compute_loss` without the backward pass on fixed-shape batches (one graph, compiled at the first
evaluation and reused for every batch, timestep and later evaluation), sampling is `sampling.generate`'s
fixed-shape loop on the mesh. They read the UNet's weights and write nothing the step reads, so the training
graph never changes. Their compilations are counted apart from the training step's (logged as
`eval_compilations` and `validation_compilations`, cumulative); the trainer keeps their time and compilations
out of the step's own (`monitor.StepMonitor.paused`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import fsio, runtime
from .config import TrainConfig
from .data.config import DataConfig
from .data.images import ImageCaptionBatches, load_image_caption_dataset
from .data.latents import OrderedLatentBatches, list_shards, read_manifest, shards_for_process
from .errors import ConfigError, EvalError
from .models import frozen_dtype, load_models
from .prompts import load_prompt_records
from .sample_files import sample_records, write_samples
from .sampling import SampleOptions, SamplerModels, eval_mode, generate, make_scheduler
from .train_step import FrozenParts, StepConfig, compute_loss
from .validation import FixedTimestepBatches, fixed_timesteps, validation_loss

log = logging.getLogger(__name__)


def _contiguous_offset(n: int, process_index: int, process_count: int) -> int:
    """Index of this host's first sample under datasets' contiguous sharding of n samples."""
    base, extra = divmod(n, process_count)
    return process_index * base + min(process_index, extra)


def heldout_batches(cfg: TrainConfig, models: Any, rt: runtime.Runtime) -> FixedTimestepBatches:
    """This host's held-out set as `FixedTimestepBatches` yielding (t, host batch) with the training batch
    size: --eval_data_dir (image folder or latent dataset), else the --eval_fraction the training source
    leaves out. Raises ConfigError when it cannot give one full batch."""
    train_manifest = read_manifest(cfg.train_data_dir) if cfg.dataset_name is None else None
    eval_manifest = read_manifest(cfg.eval_data_dir) if cfg.eval_data_dir else None
    if train_manifest is not None and cfg.eval_data_dir is None:
        raise ConfigError("--eval_steps on latent shards needs --eval_data_dir (a held-out latent dataset or "
                          "image folder): the shards cannot hold a fraction out")
    timesteps = fixed_timesteps(models.noise_scheduler.config.num_train_timesteps, cfg.eval_timesteps)
    data = DataConfig.from_train_config(cfg, frozen_dtype(cfg.mixed_precision)).for_evaluation(
        cfg.train_batch_size)
    if eval_manifest is not None:
        if eval_manifest.has_text_states is False and models.text_encoder is None:
            raise ConfigError(f"the held-out latents at {cfg.eval_data_dir} hold no text states and the text "
                              "encoder is not loaded")
        shards = shards_for_process(list_shards(eval_manifest.root), rt.process_index, rt.process_count)
        use_states = eval_manifest.has_text_states and (train_manifest is None or train_manifest.has_text_states)
        source: Any = OrderedLatentBatches(eval_manifest, shards, data.batch_size, use_states, data.text_dtype,
                                           cfg.max_eval_samples)
        latent_shape, offset = eval_manifest.latent_shape, rt.process_index << 32  # distinct per host
    else:
        if models.vae is None:
            raise ConfigError("held-out images need the VAE, which training on latent shards does not load: "
                              "pass a latent dataset as --eval_data_dir")
        if cfg.eval_data_dir:
            data = dataclasses.replace(data, dataset_name=None, train_data_dir=cfg.eval_data_dir,
                                       max_train_samples=None, heldout_fraction=0.0)
        else:
            data = dataclasses.replace(data, heldout_fraction=cfg.eval_fraction)
        dataset = load_image_caption_dataset(data, part="heldout")
        total = len(dataset)
        if rt.process_count > 1:
            dataset = dataset.shard(num_shards=rt.process_count, index=rt.process_index, contiguous=True)
        if cfg.max_eval_samples is not None:
            dataset = dataset.select(range(min(cfg.max_eval_samples, len(dataset))))
        if len(dataset) < data.batch_size:
            raise ConfigError(f"the held-out set has {len(dataset)} samples on this host, fewer than one batch "
                              f"(--train_batch_size {data.batch_size}): raise --eval_fraction or pass a larger "
                              "--eval_data_dir")
        source = ImageCaptionBatches(dataset, models.tokenizer, data).ordered()
        latent_shape = models.latent_shape(cfg.resolution)
        offset = _contiguous_offset(total, rt.process_index, rt.process_count)
    # Seed 0, not --seed: runs with different seeds are scored on exactly the same noise.
    return FixedTimestepBatches(source, timesteps, latent_shape, seed=0, index_offset=offset)


@dataclass
class InLoopEvaluator:
    """Runs the evaluations due at a step, on whatever weights the UNet holds (the trainer swaps the EMA in)."""

    cfg: TrainConfig
    rt: runtime.Runtime
    tracker: Any
    unet: torch.nn.Module
    frozen: FrozenParts
    step_cfg: StepConfig
    heldout: Any = None
    sampler: SamplerModels | None = None
    prompt_records: list[dict[str, Any]] = field(default_factory=list)
    eval_compilations: int = 0
    validation_compilations: int = 0
    last_grid: str | None = None  # the grid.png of the last validation (process 0), for the model card
    last_eval: dict[str, Any] | None = None  # the last eval_loss record, for the model card

    @classmethod
    def create(cls, cfg: TrainConfig, models: Any, rt: runtime.Runtime, tracker: Any, unet: torch.nn.Module,
               frozen: FrozenParts, step_cfg: StepConfig) -> InLoopEvaluator | None:
        """None when neither evaluation is on; raises ConfigError for bad evaluation inputs (before training)."""
        if cfg.eval_steps == 0 and cfg.validation_steps == 0:
            return None
        ev = cls(cfg, rt, tracker, unet, frozen, step_cfg)
        if cfg.eval_steps:
            ev.heldout = heldout_batches(cfg, models, rt)
        if cfg.validation_steps:
            ev._setup_sampling(models)
        return ev

    def _setup_sampling(self, models: Any) -> None:
        value = self.cfg.validation_prompts
        try:
            # Several prompts (diffusers' form) are one each; a path (local or gs://) that exists is a prompt
            # file; anything else is the prompts themselves, ';'-separated.
            self.prompt_records = ([{"text": p} for p in value] if isinstance(value, (list, tuple))
                                   else load_prompt_records(prompt_file=value) if fsio.exists(value)
                                   else load_prompt_records(prompt=value))
        except EvalError as e:
            raise ConfigError(f"--validation_prompts: {e}") from None
        vae, text_encoder = self.frozen.vae, self.frozen.text_encoder
        if vae is None or text_encoder is None:
            # Training on latent shards loads neither encoder; sampling needs the decoder and the text encoder.
            extra = load_models(self.cfg.pretrained_model_name_or_path, self.cfg.revision, self.cfg.variant,
                                self.cfg.cache_dir, load_unet=False, load_vae=vae is None,
                                load_text_encoder=text_encoder is None)
            dtype = frozen_dtype(self.cfg.mixed_precision)
            vae = vae if vae is not None else runtime.place_frozen(extra.vae, dtype, self.rt.device)
            if text_encoder is None:
                text_encoder = runtime.place_frozen(extra.text_encoder, dtype, self.rt.device)
        # Sample with the objective being trained (e.g. v-prediction from an epsilon checkpoint), as the export does.
        scheduler_config = {**models.noise_scheduler.config, "prediction_type": self.step_cfg.prediction_type}
        try:
            make_scheduler(self.cfg.validation_scheduler, scheduler_config)  # refused now, not at the first validation
        except EvalError as e:
            raise ConfigError(f"--validation_scheduler: {e}") from None
        self.sampler = SamplerModels.from_models(models, unet=self.unet, vae=vae, text_encoder=text_encoder,
                                                 scheduler_config=scheduler_config)

    def sample_options(self) -> SampleOptions:
        cfg = self.cfg
        return SampleOptions(
            guidance_scale=cfg.validation_guidance_scale, num_inference_steps=cfg.validation_num_inference_steps,
            scheduler=cfg.validation_scheduler, seed=cfg.seed, num_images_per_prompt=cfg.num_validation_images,
            max_batch_size=len(self.prompt_records) * cfg.num_validation_images, height=cfg.resolution,
            width=cfg.resolution, bf16=cfg.mixed_precision == "bf16",
        )

    def eval_loss(self, step: int) -> dict[str, Any]:
        """Fixed-timestep validation loss of the current weights; logs and returns the metrics."""
        # The plain objective (no loss weighting, plain noise): comparable across runs with different options.
        plain = self.step_cfg.plain()
        f = self.frozen

        def loss_fn(host_batch: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = runtime.to_mesh(host_batch, self.rt.mesh)
            with torch.no_grad():
                return compute_loss(self.unet, f.vae, f.text_encoder, batch, f.alphas_cumprod, plain)

        before = runtime.compile_count()
        with eval_mode(self.unet):
            metrics = validation_loss(loss_fn, self.heldout, after_each=runtime.sync)
        self.eval_compilations += runtime.compile_count() - before
        record = {"step": step, **metrics, "eval_compilations": self.eval_compilations}
        self.tracker.log(record)
        self.last_eval = record
        return record

    def validate(self, step: int) -> dict[str, Any]:
        """Sample the validation prompts with the current weights; process 0 writes
        OUTPUT_DIR/validation/step_XXXXXX/ (images, grid.png, samples.npz, prompts.jsonl)."""
        opts = self.sample_options()
        before = runtime.compile_count()
        images = generate(self.sampler, [r["text"] for r in self.prompt_records], opts, mesh=self.rt.mesh)
        self.validation_compilations += runtime.compile_count() - before
        out_dir = fsio.join(self.cfg.output_dir, "validation", f"step_{step:06d}")
        if self.rt.is_main_process:
            records = sample_records(self.prompt_records, opts)
            paths = write_samples(out_dir, images, records, grid_cols=min(8, len(images)))
            self.last_grid = paths["grid"]
            # The images are host arrays already: the trackers get them without touching a device.
            with fsio.open_file(paths["grid"], "rb") as f:
                grid = np.asarray(Image.open(f).convert("RGB"))
            self.tracker.log_images(step, {"validation": list(images), "validation_grid": [grid]},
                                    captions={"validation": [r["text"] for r in records]})
        record = {"step": step, "validation_dir": out_dir, "validation_compilations": self.validation_compilations}
        self.tracker.log(record)
        return record

    def summary(self) -> dict[str, Any]:
        return {"eval_compilations": self.eval_compilations, "validation_compilations": self.validation_compilations}

    def due(self, step: int) -> bool:
        cfg = self.cfg
        return bool(cfg.eval_steps and step % cfg.eval_steps == 0
                    or cfg.validation_steps and step % cfg.validation_steps == 0)

    def run(self, step: int) -> None:
        """Run what is due at `step`."""
        if self.cfg.eval_steps and step % self.cfg.eval_steps == 0:
            self.eval_loss(step)
        if self.cfg.validation_steps and step % self.cfg.validation_steps == 0:
            self.validate(step)
