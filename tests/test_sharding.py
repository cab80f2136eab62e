"""Input batches on the real 4-device CPU mesh: every key split 4 ways on the batch dimension."""

import os

import pytest
import torch

from xla_diffusion import runtime
from xla_diffusion.config import ConfigError, parse_args
from xla_diffusion.data.config import DataConfig
from xla_diffusion.data.source import build_data_source
from xla_diffusion.models import load_models
from xla_diffusion.trainer import check_batch_divisible


@pytest.fixture(scope="module")
def rt():
    return runtime.init_runtime(fsdp_size=1)


def test_mesh_is_named_and_spans_all_devices(rt):
    assert rt.num_devices == 4
    assert tuple(rt.mesh.axis_names) == ("data", "fsdp")
    assert tuple(rt.mesh.mesh_shape) == (4, 1)


def test_input_batches_are_sharded_four_ways(rt, tiny_pipeline, shapes_dir):
    cfg = parse_args([
        "--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir", os.path.join(shapes_dir, "train"),
        "--resolution", "64", "--train_batch_size", "8", "--center_crop",
    ])
    models = load_models(cfg.pretrained_model_name_or_path)
    data = DataConfig.from_train_config(cfg, torch.float32)
    source = build_data_source(data, models, rt, manifest=None)  # an image folder, not latent shards
    host_batch = next(iter(source))
    device_batch = next(iter(runtime.device_loader(source, source.ndims, rt.mesh)))
    assert set(device_batch) == {"pixel_values", "input_ids", "noise", "timesteps", "latent_eps"}
    for key, tensor in device_batch.items():
        spec = runtime.sharding_spec_string(tensor)
        expected = "{devices=[4" + ",1" * (tensor.ndim - 1) + "]0,1,2,3}"
        assert spec == expected, f"{key}: {spec}"
        # the sharded device tensor holds exactly the host batch (same seed → same first batch)
        torch.testing.assert_close(tensor.cpu(), host_batch[key], rtol=0, atol=0)
    assert device_batch["pixel_values"].shape == (8, 3, 64, 64)
    assert device_batch["noise"].shape == (8, 4, 16, 16)


def test_batch_must_divide_over_devices(rt):
    assert check_batch_divisible(8, rt) == 8
    with pytest.raises(ConfigError, match="not divisible by the 4 data-parallel devices"):
        check_batch_divisible(6, rt)


def test_frozen_parts_enter_the_first_step_annotated_replicated(rt, tiny_pipeline):
    """Every weight of the frozen VAE and text encoder carries a replicated annotation before any graph runs.
    Without it, torch_xla annotates the data at its first dispatch, and ops reading the weights lower with a
    sharding from step 2 on only: a second step graph (seen with the batch-local norms in bf16)."""
    models = load_models(tiny_pipeline)
    for module in (models.vae, models.text_encoder):
        placed = runtime.place_frozen(module, torch.bfloat16, rt.device)
        specs = {runtime.sharding_spec_string(p) for p in placed.parameters()}
        assert specs == {"{replicated}"}, specs
        assert {p.dtype for p in placed.parameters()} == {torch.bfloat16}
