"""Exporting the trained UNet as a diffusers pipeline folder (process 0 only).

The folder is written beside the target first and moved in entry by entry with `model_index.json`
last, so a crash mid-export never leaves a folder that `from_pretrained` takes for complete.
Remote targets (gs://…) are uploaded from that local folder, again with `model_index.json` last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch

from . import fsio, runtime

log = logging.getLogger(__name__)


def unet_to_cpu(unet: torch.nn.Module) -> torch.nn.Module:
    """A CPU fp32 copy of a (possibly sharded) device UNet; sharded tensors are gathered."""
    from diffusers import UNet2DConditionModel

    cpu = UNet2DConditionModel.from_config(unet.config)
    if any(p.device.type == "xla" for p in unet.parameters()):
        # Pending ops on the weights (the EMA swapped in) run as one graph here; otherwise each tensor's copy
        # to the host would compile and run a graph of its own (70 compilations for a sharded tiny UNet).
        runtime.sync()
    state = {k: v.detach().to("cpu", torch.float32) for k, v in unet.state_dict().items()}
    cpu.load_state_dict(state)
    return cpu


def _publish_local(tmp: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    marker = os.path.join(target, "model_index.json")
    if os.path.exists(marker):
        os.remove(marker)  # the old export stops looking complete before its parts are replaced
    for name in sorted(os.listdir(tmp)):
        if name == "model_index.json":
            continue
        dst = os.path.join(target, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        elif os.path.exists(dst):
            os.remove(dst)
        shutil.move(os.path.join(tmp, name), dst)
    shutil.move(os.path.join(tmp, "model_index.json"), marker)


def _publish_remote(tmp: str, target: str) -> None:
    fsio.remove(fsio.join(target, "model_index.json"))
    for name in sorted(os.listdir(tmp)):
        if name != "model_index.json":
            fsio.upload(os.path.join(tmp, name), fsio.join(target, name))
    fsio.upload(os.path.join(tmp, "model_index.json"), fsio.join(target, "model_index.json"))


def export_pipeline(
    source: str,
    unet: torch.nn.Module,
    output_dir: str,
    revision: str | None = None,
    variant: str | None = None,
    extra_files: dict[str, Any] | None = None,
    prediction_type: str | None = None,
    sample_size: int | None = None,
) -> str:
    """Write a StableDiffusionPipeline folder: the trained `unet` plus every other part exactly as
    loaded from `source` (safetensors), with the scheduler's `prediction_type` set to the one trained
    and the UNet's `sample_size` (latent side) set to the one trained at, when given. `extra_files` maps
    file names to JSON-able objects written beside it. Returns `output_dir`."""
    from diffusers import StableDiffusionPipeline

    cpu_unet = unet_to_cpu(unet)
    pipe = StableDiffusionPipeline.from_pretrained(source, unet=cpu_unet, revision=revision, variant=variant)
    if prediction_type is not None:
        # A UNet trained for v-prediction from an epsilon checkpoint must be sampled as v-prediction.
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    if sample_size is not None:
        # The pipeline's default height/width is unet.sample_size × the VAE factor: make it the training
        # resolution, or a model trained at 32 px from a 64 px checkpoint samples at 64 px by default.
        pipe.unet.register_to_config(sample_size=sample_size)
    local_parent = None if fsio.is_remote(output_dir) else output_dir
    if local_parent:
        os.makedirs(os.path.dirname(os.path.abspath(local_parent)) or ".", exist_ok=True)
    tmp_root = os.path.dirname(os.path.abspath(local_parent)) if local_parent else None
    tmp = tempfile.mkdtemp(prefix=".export-", dir=tmp_root)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, obj in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
        (_publish_local if local_parent else _publish_remote)(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported pipeline to %s", output_dir)
    return output_dir
