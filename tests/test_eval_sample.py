"""eval.sample: our fixed-shape CFG loop against diffusers' StableDiffusionPipeline, determinism per sample,
guidance 1 == unguided, the sharded mesh path == the CPU path with graphs compiled once, and the CLI."""

import contextlib
import json
import os

import numpy as np
import pytest
import torch

from eval.sample import main
from xla_diffusion.cli import run_cli
from xla_diffusion.config import SAMPLERS
from xla_diffusion.data.randomness import sample_generator
from xla_diffusion.sampling import (
    SCHEDULERS,
    SampleOptions,
    SamplerModels,
    generate,
    guided,
    load_sampler_models,
    make_scheduler,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = ["a red circle on a blue background", "a white square on a black background",
           "a green triangle on a red background"]


@pytest.fixture(scope="module")
def cpu_models(tiny_pipeline) -> SamplerModels:
    return load_sampler_models(tiny_pipeline, "cpu")[0]


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_pipeline):
    """diffusers' pipeline on the CPU. Its loop calls xm.mark_step() whenever torch_xla is importable, which
    would start the XLA runtime outside SPMD mode in this test process (and a later use_spmd() then crashes):
    that switch is turned off while these reference runs go."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipe.set_progress_bar_config(disable=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_stable_diffusion, "XLA_AVAILABLE", False)
        yield pipe


def test_sampler_names_agree_with_the_trainer_flag():
    assert tuple(SCHEDULERS) == SAMPLERS


@pytest.mark.parametrize(
    "scheduler, guidance", [("ddim", 1.0), ("ddim", 4.0), ("euler", 4.0), ("dpm-solver++", 4.0), ("ddpm", 4.0)]
)
def test_loop_matches_stable_diffusion_pipeline(cpu_models, diffusers_pipe, scheduler, guidance):
    """Same per-sample generators (initial noise and, for DDPM, the step noise): our loop gives diffusers'
    images, with and without classifier-free guidance."""
    opts = SampleOptions(guidance_scale=guidance, num_inference_steps=3, scheduler=scheduler, seed=5)
    ours = generate(cpu_models, PROMPTS[:2], opts)
    diffusers_pipe.scheduler = make_scheduler(scheduler, diffusers_pipe.scheduler.config)
    ref = diffusers_pipe(
        PROMPTS[:2], guidance_scale=guidance, num_inference_steps=3, height=64, width=64, output_type="np",
        generator=[sample_generator(5, i) for i in range(2)],
    ).images
    assert ours.dtype == np.uint8 and ours.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours / 255.0, ref, atol=1.01 / 255)


def test_guidance_one_is_the_unguided_path(cpu_models):
    """Scale 1 skips the unconditional half; the guided formula at a scale just above 1 (which does run
    both halves) lands on the same images, and the combine itself is exact at 1 up to rounding."""
    unguided = generate(cpu_models, PROMPTS, SampleOptions(guidance_scale=1.0, num_inference_steps=3, seed=1))
    guided_path = generate(cpu_models, PROMPTS, SampleOptions(guidance_scale=1.0 + 1e-6, num_inference_steps=3,
                                                              seed=1))
    assert np.abs(unguided.astype(int) - guided_path.astype(int)).max() <= 1
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(guided(u, c, 1.0), c)
    torch.testing.assert_close(guided(u, c, 0.0), u)
    # and guidance does change the images (the test above compares two different code paths)
    strong = generate(cpu_models, PROMPTS, SampleOptions(guidance_scale=8.0, num_inference_steps=3, seed=1))
    assert np.abs(strong.astype(int) - unguided.astype(int)).max() > 5


def test_samples_do_not_depend_on_batching(cpu_models):
    """Sample i's noise comes from (seed, i) only: batch size 1 and 4 give the same 6 images; another seed
    gives others."""
    opts = dict(guidance_scale=3.0, num_inference_steps=2, scheduler="euler-ancestral", num_images_per_prompt=2,
                seed=11)
    one = generate(cpu_models, PROMPTS, SampleOptions(max_batch_size=1, **opts))
    four = generate(cpu_models, PROMPTS, SampleOptions(max_batch_size=4, **opts))
    assert one.shape == (6, 64, 64, 3)
    assert np.abs(one.astype(int) - four.astype(int)).max() <= 1
    other = generate(cpu_models, PROMPTS, SampleOptions(max_batch_size=4, **{**opts, "seed": 12}))
    assert np.abs(other.astype(int) - four.astype(int)).max() > 5


@pytest.mark.slow
def test_mesh_sampling_matches_cpu_and_compiles_once(tiny_pipeline, cpu_models):
    """On the 4-device mesh: 3 prompts padded to a batch of 4 sharded over the devices, padding dropped, the
    same images as eager CPU; a second call compiles nothing."""
    from xla_diffusion import runtime

    opts = SampleOptions(guidance_scale=4.0, num_inference_steps=3, scheduler="dpm-solver++", seed=2)
    ref = generate(cpu_models, PROMPTS, opts)
    models, mesh = load_sampler_models(tiny_pipeline, "xla")
    assert mesh.size() == 4
    first = runtime.compile_count()
    out = generate(models, PROMPTS, opts, mesh=mesh)
    compiled = runtime.compile_count() - first
    again = generate(models, PROMPTS, opts, mesh=mesh)
    assert runtime.compile_count() - first == compiled, "the second sampling call compiled new graphs"
    # text encoder, UNet + guidance, decode, and the solver's few update variants: a handful of graphs
    assert 3 <= compiled <= 8
    assert out.shape == (3, 64, 64, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    np.testing.assert_array_equal(out, again)


def test_cli_writes_pngs_grid_npz_and_prompts(tiny_pipeline, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"text": p, "tag": i}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    out = tmp_path / "out"
    rc = run_cli(main, [
        "--pipeline", tiny_pipeline, "--prompt_file", str(prompt_file), "--output_dir", str(out),
        "--num_inference_steps", "2", "--num_images_per_prompt", "2", "--scheduler", "euler", "--seed", "3",
        "--max_batch_size", "3",
    ])
    assert rc == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (4, 64, 64, 3) and data["images"].dtype == np.uint8
    assert list(data["prompts"]) == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert list(data["prompt_index"]) == [0, 0, 1, 1]
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3] and [r["tag"] for r in records] == [0, 0, 1, 1]
    from PIL import Image

    for r, image in zip(records, data["images"]):
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["file_name"])), image)
    assert Image.open(out / "grid.png").size[0] > 64
    assert "4 samples of 64x64 px" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "a", "--scheduler", "heun"], "invalid choice"),
        (["--prompt_file", "/no/such/prompts.txt"], "no such file"),
        (["--prompt", " ; "], "no prompts"),
        (["--prompt", "a", "--height", "60"], "multiples of 8"),
        (["--prompt", "a", "--num_inference_steps", "0"], "--num_inference_steps must be >= 1"),
        (["--prompt", "a", "--prompt_file", "x"], "exactly one of --prompt and --prompt_file"),
    ],
)
def test_cli_bad_input_is_one_error_line(tiny_pipeline, tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) if "invalid choice" in needle else contextlib.nullcontext():
        rc = run_cli(main, ["--pipeline", tiny_pipeline, "--output_dir", str(tmp_path / "o"), *argv])
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not os.path.exists(tmp_path / "o" / "samples.npz")

