"""The trainer's host-side wiring of the ecosystem flags, without a device: epochs and --scale_lr turned into the
run's config, the hub repo name, and what happens after the export (model card, push, a failed push as one line
with the export intact). The end-to-end runs in tests/helpers.py cover the same paths through the CLI."""

from __future__ import annotations

import os

import pytest
import torch

from tests.hub_server import HubServer
from tests.test_hub import REPO, TOKEN, _export, _tree, hub, hub_online  # noqa: F401 (fixtures)
from xla_diffusion.cli import run_cli
from xla_diffusion.config import parse_args
from xla_diffusion.errors import ConfigError
from xla_diffusion.runtime import Runtime
from xla_diffusion.trainer import hub_repo_id, publish, resolve_epochs

BASE = ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-2-base", "--train_data_dir", "/data/train",
        "--train_batch_size", "8"]


def _rt(process_index: int = 0, process_count: int = 2) -> Runtime:
    return Runtime(device=torch.device("cpu"), process_index=process_index, process_count=process_count,
                   num_devices=4 * process_count, mesh=None)


def test_epochs_become_steps_alike_on_every_host():
    """1000 samples, 8 per host on 2 hosts: an epoch is 1000 // 16 = 62 steps (last partial batch dropped)."""
    cfg = parse_args(BASE + ["--num_train_epochs", "3", "--validation_prompts", "a", "b", "--validation_epochs", "2"])
    for host in (0, 1):
        run = resolve_epochs(cfg, _rt(host), num_samples=1000)
        assert (run.max_train_steps, run.validation_steps, run.validation_epochs) == (186, 124, None)
    assert cfg.max_train_steps is None  # the user's config is left as it was


def test_validation_prompts_alone_validate_every_five_epochs_and_steps_win():
    cfg = parse_args(BASE + ["--max_train_steps", "500", "--validation_prompts", "a"])
    run = resolve_epochs(cfg, _rt(), num_samples=1000)
    assert (run.max_train_steps, run.validation_steps) == (500, 5 * 62)  # diffusers' --validation_epochs 5
    explicit = parse_args(BASE + ["--max_train_steps", "10", "--validation_prompts", "a", "--validation_steps", "3"])
    assert resolve_epochs(explicit, _rt(), num_samples=None) is explicit  # nothing to resolve: size not needed


def test_scale_lr_is_times_the_global_batch():
    cfg = parse_args(BASE + ["--max_train_steps", "10", "--learning_rate", "1e-6", "--scale_lr"])
    assert resolve_epochs(cfg, _rt(process_count=4), None).learning_rate == pytest.approx(1e-6 * 32)


@pytest.mark.parametrize("num_samples, needle", [
    (None, "--num_train_epochs needs the number of training samples"),
    (15, "--num_train_epochs: 15 training samples make no full global batch of 16"),
])
def test_epochs_without_a_usable_size_are_one_line(num_samples, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_epochs(parse_args(BASE), _rt(), num_samples)


def test_hub_repo_defaults_to_the_output_folder_name():
    assert hub_repo_id(parse_args(BASE + ["--push_to_hub", "--output_dir", "/tmp/runs/sd-naruto/"])) == "sd-naruto"
    assert hub_repo_id(parse_args(BASE + ["--push_to_hub", "--hub_model_id", "me/x"])) == "me/x"


class _Evaluated:
    """What publish reads from the in-loop evaluator."""

    def __init__(self, grid: str):
        self.last_grid, self.prompt_records = grid, [{"text": "a red circle"}, {"text": "a blue square"}]
        self.last_eval = {"step": 10, "eval_loss": 0.25, "eval_loss_t0125": 0.5, "eval_compilations": 1}


SUMMARY = {"steps": 10, "mesh": {"data": 4, "fsdp": 1}, "num_processes": 1, "num_devices": 4,
           "mean_step_time_s": 0.5, "images_per_s": 16.0}


def _run(tmp_path, *extra):
    folder, grid = _export(tmp_path)
    cfg = parse_args(BASE + ["--output_dir", folder, "--max_train_steps", "10", *extra])
    return cfg, folder, _Evaluated(grid)


def test_model_card_from_the_run(tmp_path):
    cfg, folder, ev = _run(tmp_path, "--validation_prompts", "a red circle", "a blue square",
                           "--validation_steps", "5")
    publish(cfg, SUMMARY, ev, None)  # no push: the card only
    with open(os.path.join(folder, "README.md")) as f:
        card = f.read()
    for expected in ("base_model: stabilityai/stable-diffusion-2-base", "license: openrail++", "| steps | 10 |",
                     "| device mesh | data 4 × fsdp 1 |", "| mean step time (after warm-up) | 0.5 s |",
                     "![validation images](validation_grid.png)", "| eval_loss | 0.25 |", "| eval_loss_t0125 | 0.5 |",
                     "| validation_steps | 5 |", "*a red circle*; *a blue square*"):
        assert expected in card, expected
    assert "eval_compilations" not in card and "hub_token" not in card


def test_push_sends_the_export_without_validation_folders(tmp_path, hub, hub_online, capfd):  # noqa: F811
    cfg, folder, ev = _run(tmp_path, "--push_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN)
    publish(cfg, SUMMARY, ev, REPO)
    arrived = hub.files(REPO)
    assert arrived == {p: b for p, b in _tree(folder).items()
                       if not p.startswith(("logs/wandb/", "checkpoints/", "validation/"))}
    assert "README.md" in arrived and "validation_grid.png" in arrived
    out, err = capfd.readouterr()
    assert TOKEN not in out + err and TOKEN.encode() not in arrived["README.md"]


def test_failed_push_is_one_line_exit_1_and_the_export_stays(tmp_path, hub_online, capsys):  # noqa: F811
    with HubServer("hf_TheOnlyTokenThisHubTakes") as server:
        from huggingface_hub import constants

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(constants, "ENDPOINT", server.endpoint)
            cfg, folder, ev = _run(tmp_path, "--push_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN)
            before = _tree(folder)
            code = run_cli(lambda argv: publish(cfg, SUMMARY, ev, REPO), [])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: push to ") and "rejected the token (401" in err[0]
    assert TOKEN not in err[0]
    after = _tree(folder)
    card = after.pop("README.md").decode()  # the card was written before the push, and stays
    assert f'from_pretrained("{REPO}")' in card and TOKEN not in card
    assert after == {**before, "validation_grid.png": after["validation_grid.png"]}  # the export is intact
    assert server.repos == {}


def test_non_ema_revision_loads_the_trained_unet(tiny_pipeline, monkeypatch):
    """--non_ema_revision: the UNet to train comes from that revision, the other parts from --revision (a local
    folder has no revisions, so the loader's arguments are what is checked)."""
    import diffusers
    import transformers

    from xla_diffusion.trainer import load_training_models

    seen = {}
    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTextModel):
        original = cls.from_pretrained.__func__

        def record(klass, *args, _original=original, **kwargs):
            seen[klass.__name__] = kwargs.get("revision")
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(record))
    cfg = parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir", "/data/train",
                      "--revision", "main", "--non_ema_revision", "non-ema"])
    models = load_training_models(cfg, latents=None)
    assert models.unet is not None
    assert seen == {"UNet2DConditionModel": "non-ema", "AutoencoderKL": "main", "CLIPTextModel": "main"}


def test_data_flags_reach_the_reader():
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from xla_diffusion.data.config import DataConfig
    from xla_diffusion.data.images import image_transform

    cfg = parse_args(BASE + ["--image_interpolation_mode", "lanczos", "--loader_prefetch_factor", "6",
                             "--noise_offset", "0.05"])
    data = DataConfig.from_train_config(cfg, torch.float32)
    assert (data.interpolation, data.prefetch_factor, data.extra_draws) == ("lanczos", 6, ("offset_draw",))
    img = Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())
    pixels = image_transform(32, True, False, data.interpolation)(img)
    lanczos = TF.center_crop(TF.resize(img, 32, interpolation=InterpolationMode.LANCZOS), 32)
    assert torch.equal(pixels, TF.normalize(TF.to_tensor(lanczos), [0.5], [0.5]))
    assert not torch.equal(pixels, image_transform(32, True, False)(img))  # bilinear differs
    assert DataConfig.from_train_config(parse_args(BASE), torch.float32).interpolation == "bilinear"
