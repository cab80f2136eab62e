"""Sampling with classifier-free guidance: the loop the trainer's in-loop validation, `eval.sample` and
`eval.evaluate` share, on the CPU or sharded over the SPMD mesh.

The loop is written here instead of calling StableDiffusionPipeline.__call__ so that on TPU it runs with fixed
shapes on the mesh: every batch has the same (padded) size and is sharded over all devices, and each denoising
step is cut into two graphs, UNet + guidance and then the scheduler update, so the expensive UNet graph compiles
once and serves every step and batch whatever branch the scheduler takes at a given step (multistep solvers
change their update formula at the first and last steps). Each sample's noise comes from its own host generator
seeded by (seed, sample index): a sample does not depend on the batch it was drawn in, the batch size, the
padding or the device count.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import runtime
from .data.images import tokenize
from .data.randomness import sample_generator
from .errors import EvalError, check
from .xla_ops import xla_friendly_ops

# name → (diffusers class, extra config); each is built from the pipeline's own scheduler config so the
# training schedule (betas, prediction type, offsets) carries over.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


# diffusers' samplers without a "sample" (x0) prediction branch: they raise NotImplementedError in step().
NO_SAMPLE_PREDICTION = ("euler-ancestral",)


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh diffusers scheduler `name` (see SCHEDULERS) built from a scheduler config. Raises EvalError for an
    unknown name, and for a sampler that cannot read the config's prediction_type."""
    import diffusers

    if name not in SCHEDULERS:
        raise EvalError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    if name in NO_SAMPLE_PREDICTION and dict(config).get("prediction_type") == "sample":
        usable = ", ".join(n for n in SCHEDULERS if n not in NO_SAMPLE_PREDICTION)
        raise EvalError(f"the {name} sampler cannot sample a model trained with prediction_type sample; use one of "
                        f"{usable}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


@dataclass(frozen=True)
class SampleOptions:
    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    scheduler: str = "ddim"
    seed: int = 0
    num_images_per_prompt: int = 1
    max_batch_size: int = 8
    height: int | None = None  # default: the UNet's sample size times the VAE's downsampling
    width: int | None = None
    bf16: bool = False  # UNet under bf16 autocast (frozen parts keep whatever dtype they have)

    def __post_init__(self) -> None:
        check([
            (self.num_inference_steps < 1, "--num_inference_steps must be >= 1"),
            (self.guidance_scale < 0, "--guidance_scale must be >= 0"),
            (self.num_images_per_prompt < 1, "--num_images_per_prompt must be >= 1"),
            (self.max_batch_size < 1, "--max_batch_size must be >= 1"),
            (self.scheduler not in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}"),
        ], EvalError)


@dataclass
class SamplerModels:
    """What generation needs; modules may live on the CPU or on an XLA device."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: Any
    vae_scale: int  # the VAE's spatial downsampling (models.Models.vae_scale)

    @classmethod
    def from_models(cls, models: Any, **override: Any) -> SamplerModels:
        """From xla_diffusion.models.Models; `override` swaps parts, e.g. the trainer's device copies."""
        parts = {
            "tokenizer": models.tokenizer, "text_encoder": models.text_encoder, "unet": models.unet,
            "vae": models.vae, "scheduler_config": models.noise_scheduler.config, "vae_scale": models.vae_scale,
        }
        parts.update(override)
        return cls(**parts)

    def image_size(self, opts: SampleOptions) -> tuple[int, int]:
        """(height, width) in pixels; raises EvalError when the UNet cannot take that latent size."""
        default = self.unet.config.sample_size * self.vae_scale
        height, width = opts.height or default, opts.width or default
        multiple = self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple or height < multiple or width < multiple:
            raise EvalError(f"--height and --width must be positive multiples of {multiple} for this pipeline, "
                            f"got {height}x{width}")
        return height, width


def guided(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): uncond + scale * (cond - uncond); any shape."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generators} if "generator" in params else {}


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class _Placement:
    """Host → device transfers: on a mesh, batch tensors are sharded on dim 0 over every device."""

    def __init__(self, device: torch.device, mesh: Any = None):
        self.device, self.mesh = device, mesh
        self.is_xla = device.type == "xla"

    @property
    def num_shards(self) -> int:
        return int(self.mesh.size()) if self.mesh is not None else 1

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh is None:
            return x.to(self.device)
        # A global tensor (every host holds all of it): each host sends its own shards.
        return runtime.to_mesh(x, self.mesh, host_local=False)

    def sync(self) -> None:
        if self.is_xla:
            runtime.sync()

    def autocast(self, enabled: bool) -> Any:
        return runtime.autocast(self.device, enabled)


def sample_batch(
    models: SamplerModels,
    texts: Sequence[str],
    generators: list[torch.Generator],
    opts: SampleOptions,
    size: tuple[int, int],
    place: _Placement,
) -> torch.Tensor:
    """One batch of B = len(texts) images, uint8 (B, H, W, 3) on the CPU. `generators[i]` draws sample i's
    noise. With guidance > 1 the UNet sees (2B, ...): the "" unconditional half first, as diffusers does."""
    b = len(texts)
    use_cfg = opts.guidance_scale > 1  # a run-level constant: no branch on tensor values
    scheduler = make_scheduler(opts.scheduler, models.scheduler_config)
    scheduler.set_timesteps(opts.num_inference_steps)
    unet_dtype = _module_dtype(models.unet)

    ids = tokenize(models.tokenizer, ([""] * b if use_cfg else []) + list(texts))
    with torch.no_grad():
        hidden = models.text_encoder(place.batch(ids), return_dict=False)[0]  # (2B or B, L, D)
        if not opts.bf16:
            hidden = hidden.to(unet_dtype)
    place.sync()

    height, width = size
    shape = (1, models.unet.config.in_channels, height // models.vae_scale, width // models.vae_scale)
    noise = torch.cat([torch.randn(shape, generator=g) for g in generators])  # (B, C, h, w), host
    # init_noise_sigma is a host scalar (1 for DDPM/DDIM, sigma_max for Euler): scale before the transfer.
    latents = place.batch(noise * scheduler.init_noise_sigma)
    step_kwargs = _step_kwargs(scheduler, generators)
    for t in scheduler.timesteps:  # t stays on the host: schedulers look it up in their own tables
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        t_batch = place.batch(t.reshape(1).repeat(model_in.shape[0]))
        with torch.no_grad(), place.autocast(opts.bf16), xla_friendly_ops():
            pred = models.unet(model_in, t_batch, hidden, return_dict=False)[0].float()
        if use_cfg:
            pred = guided(*pred.chunk(2), opts.guidance_scale)
        place.sync()  # graph 1: UNet + guidance, the same graph at every step
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        place.sync()  # graph 2: the (small) scheduler update
    return decode_latents(models.vae, latents, place)


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, place: _Placement | None = None) -> torch.Tensor:
    """Scaled latents (B, C, h, w) → uint8 images (B, H, W, 3) on the CPU, undoing the training scaling
    (x / scaling_factor + shift_factor) before the VAE decoder, as the diffusers pipelines do."""
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    z = latents / scaling + (shift if shift is not None else 0.0)
    with torch.no_grad(), xla_friendly_ops():
        image = vae.decode(z.to(_module_dtype(vae)), return_dict=False)[0].float()  # (B, 3, H, W) in [-1, 1]
    image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if place is not None:
        place.sync()
    return image.cpu()


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Any:
    """Modules in eval mode inside the block, each back to its own mode after (the trainer's UNet trains)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def generate(
    models: SamplerModels,
    prompts: Sequence[str],
    opts: SampleOptions,
    mesh: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """All samples as uint8 (N, H, W, 3), N = len(prompts) * num_images_per_prompt; sample i shows prompt
    i // num_images_per_prompt. On CPU batches run eagerly; with a `mesh` (modules on the XLA device) every
    batch is padded to the same size, a multiple of the device count, sharded over the mesh, and the padding
    is dropped after."""
    if not prompts:
        raise EvalError("no prompts to sample")
    size = models.image_size(opts)
    place = _Placement(next(models.unet.parameters()).device, mesh)
    texts = [p for p in prompts for _ in range(opts.num_images_per_prompt)]
    n = len(texts)
    batch = min(opts.max_batch_size, n)
    if mesh is not None:
        batch = math.ceil(batch / place.num_shards) * place.num_shards
    out: list[np.ndarray] = []
    with eval_mode(models.unet, models.text_encoder, models.vae):
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            width = batch if mesh is not None else stop - start
            indices = range(start, start + width)
            batch_texts = [texts[min(i, n - 1)] for i in indices]  # padding repeats the last prompt
            generators = [sample_generator(opts.seed, i) for i in indices]
            images = sample_batch(models, batch_texts, generators, opts, size, place)
            out.append(images[: stop - start].numpy())
            if progress is not None:
                progress(stop, n)
    return np.concatenate(out)


def load_sampler_models(pipeline: str, device: str = "cpu", bf16: bool = False) -> tuple[SamplerModels, Any]:
    """Load a pipeline folder (local, hub id or gs://) and place it: on "cpu" as is (fp32); on "xla" the SPMD
    runtime starts, the frozen parts go to the device (bf16 when `bf16`) and the mesh is returned too."""
    from .models import frozen_dtype, load_models

    models = load_models(pipeline)
    parts = SamplerModels.from_models(models)
    if device == "cpu":
        return parts, None
    rt = runtime.init_runtime()
    dtype = frozen_dtype("bf16" if bf16 else "no")
    parts.text_encoder = runtime.place_frozen(parts.text_encoder, dtype, rt.device)
    parts.vae = runtime.place_frozen(parts.vae, dtype, rt.device)
    parts.unet = parts.unet.to(rt.device)
    return parts, rt.mesh
