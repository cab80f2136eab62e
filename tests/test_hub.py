"""Model card and hub push, against a loopback server speaking the hub's HTTP API (tests/hub_server.py) to
the real huggingface_hub client: which files arrive with which bytes, one-line errors, and the token
nowhere in output, logs, the card or what was uploaded."""

from __future__ import annotations

import hashlib
import logging
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hub_server import HubServer
from xla_diffusion.hub import HubError, base_model_license, push_to_hub, write_model_card

TOKEN = "hf_LoopbackOnlyTokenThatMustNeverBeSeen0123"
REPO = "test-user/tiny-sd-xla"

HYPERPARAMETERS = {"learning_rate": 1e-4, "train_batch_size": 16, "resolution": 64, "mixed_precision": "bf16",
                   "snr_gamma": 5.0, "use_ema": True, "validation_prompts": "a red circle | a blue square",
                   "hub_token": TOKEN, "push_to_hub": True}
EVAL = {"eval_loss": 0.1234, "eval_loss_t0062": 0.5, "step": 1000}


@pytest.fixture
def hub_online(monkeypatch):
    """The test session runs with HF_HUB_OFFLINE=1; these tests talk to loopback only."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()  # sessions made while offline refuse every request
    yield
    reset_sessions()


@pytest.fixture
def hub(monkeypatch):
    """The loopback hub, with huggingface_hub pointed at it as HF_ENDPOINT does (read at import: patched)."""
    from huggingface_hub import constants

    with HubServer(TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def caplog_all(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def _tree(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder).replace(os.sep, "/")] = f.read()
    return out


def _export(tmp_path) -> tuple[str, str]:
    """A pipeline-shaped output folder (with run files that must not be pushed) and a validation grid."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    for sub in ("unet", "scheduler", "logs/wandb/offline-run-1", "checkpoints/step_10", "validation/step_000010"):
        (out / sub).mkdir(parents=True)
    (out / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
    (out / "unet" / "config.json").write_text('{"sample_size": 8}\n')
    save_file({"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))},
              str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    (out / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}\n')
    (out / "train_summary.json").write_text('{"steps": 10}\n')
    (out / "logs" / "metrics.jsonl").write_text('{"loss": 0.5, "step": 10}\n')
    (out / "logs" / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"wandb run file")
    (out / "checkpoints" / "step_10" / "state.bin").write_bytes(b"checkpoint shard")
    grid = out / "validation" / "step_000010" / "grid.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(grid)
    return str(out), str(grid)


def _card(folder: str, grid: str | None, **kw) -> str:
    args = dict(base_model="stabilityai/stable-diffusion-2-base", hyperparameters=HYPERPARAMETERS, steps=1000,
                mesh={"data": 4, "fsdp": 1}, num_processes=1, num_devices=4, mean_step_time_s=0.6042,
                images_per_s=52.97, dataset="lambdalabs/naruto-blip-captions", validation_grid=grid,
                validation_prompts=["a red circle", "a blue square"], eval_metrics=EVAL, repo_id=REPO)
    args.update(kw)
    return write_model_card(folder, **args)


def _assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


# ------------------------------------------------------------------------------------------ model card


def test_model_card_metadata_read_by_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard

    folder, grid = _export(tmp_path)
    path = _card(folder, grid)
    card = ModelCard.load(path)  # the hub library's own parser of the YAML metadata
    meta = card.data.to_dict()
    assert meta["license"] == "openrail++"
    assert meta["base_model"] == "stabilityai/stable-diffusion-2-base"
    assert meta["datasets"] == ["lambdalabs/naruto-blip-captions"]
    assert {"stable-diffusion", "text-to-image", "diffusers", "diffusers-training", "pytorch-xla"} <= set(meta["tags"])
    assert meta["library_name"] == "diffusers"


def test_model_card_body(tmp_path):
    folder, grid = _export(tmp_path)
    with open(_card(folder, grid)) as f:
        text = f.read()
    # The grid is copied beside the card and linked relatively.
    assert "![validation images](validation_grid.png)" in text
    with open(os.path.join(folder, "validation_grid.png"), "rb") as a, open(grid, "rb") as b:
        assert a.read() == b.read()
    for expected in ("| steps | 1000 |", "| hosts (processes) | 1 |", "| devices | 4 |",
                     "| device mesh | data 4 × fsdp 1 |", "| mean step time (after warm-up) | 0.6042 s |",
                     "| throughput | 52.97 images/s |", "| learning_rate | 0.0001 |", "| snr_gamma | 5 |",
                     "| validation_prompts | a red circle \\| a blue square |", "| eval_loss | 0.1234 |",
                     'DiffusionPipeline.from_pretrained("test-user/tiny-sd-xla")'):
        assert expected in text, expected
    assert "hub_token" not in text
    _assert_no_token(text)


def test_license_from_a_local_base_and_local_paths_kept_out_of_metadata(tmp_path):
    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags:\n- x\n---\n# base\n")
    assert base_model_license(str(base)) == "creativeml-openrail-m"
    folder, _ = _export(tmp_path)
    meta = ModelCard.load(_card(folder, None, base_model=str(base), dataset=str(tmp_path / "data"))).data.to_dict()
    assert meta["license"] == "creativeml-openrail-m"
    assert "base_model" not in meta and "datasets" not in meta  # the hub takes hub ids only there
    assert not os.path.exists(os.path.join(folder, "validation_grid.png"))


def test_unknown_license_is_left_out(tmp_path):
    from huggingface_hub import ModelCard

    folder, _ = _export(tmp_path)
    meta = ModelCard.load(_card(folder, None, base_model="someone/some-model")).data.to_dict()
    assert "license" not in meta and meta["base_model"] == "someone/some-model"


def test_missing_grid_is_one_line(tmp_path):
    folder, _ = _export(tmp_path)
    with pytest.raises(HubError, match="does not exist"):
        _card(folder, str(tmp_path / "nope.png"))


# ------------------------------------------------------------------------------------------------ push


def test_push_uploads_the_folder_with_its_bytes(tmp_path, hub, hub_online, capfd, caplog_all):
    folder, grid = _export(tmp_path)
    _card(folder, grid)
    local = _tree(folder)
    url = push_to_hub(folder, REPO, TOKEN, private=True, is_main_process=True)

    expected = {p: b for p, b in local.items() if not p.startswith(("logs/wandb/", "checkpoints/"))}
    assert hub.files(REPO) == expected
    assert {"README.md", "validation_grid.png", "unet/diffusion_pytorch_model.safetensors",
            "model_index.json"} <= set(expected)
    assert hub.repos[REPO].private
    assert url.endswith(f"/{REPO}/commit/{hub.repos[REPO].heads['main']}")
    # Binary files went through the LFS path (batch, PUT, verify); the rest inline in the commit.
    lfs = {hashlib.sha256(local[p]).hexdigest() for p in ("unet/diffusion_pytorch_model.safetensors",
                                                          "validation_grid.png", "validation/step_000010/grid.png")}
    assert set(hub.lfs_objects) == lfs
    served = [(m, p.split("/")[1] if p.startswith("/_lfs/") else p) for m, p, _ in hub.requests]
    assert ("POST", f"/{REPO}.git/info/lfs/objects/batch") in served
    # (The copied grid and its original share one object; the client may send it once per path.)
    assert {p.split("/")[2] for m, p, _ in hub.requests if m == "PUT" and p.startswith("/_lfs/")} == lfs
    assert ("POST", f"/api/models/{REPO}/commit/main") in served
    assert set(hub.validated_readmes) == {local["README.md"].decode()}  # the client had the card's metadata checked
    assert all(status in (200, 409) for _, _, status in hub.requests)

    out, err = capfd.readouterr()
    _assert_no_token(out, err, caplog_all.text, *(b.decode("latin-1") for b in hub.files(REPO).values()),
                     *(p for _, p, _ in hub.requests))


def test_push_to_a_branch_and_again_unchanged(tmp_path, hub, hub_online):
    folder, grid = _export(tmp_path)
    _card(folder, grid)
    push_to_hub(folder, REPO, TOKEN, revision="xla/run-1", is_main_process=True)
    assert hub.files(REPO, "main") == {}
    assert "README.md" in hub.files(REPO, "xla/run-1")
    commits = len(hub.repos[REPO].commits)
    # The same folder again: the repo and branch exist (409s are fine), nothing changed, no new commit.
    url = push_to_hub(folder, REPO, TOKEN, revision="xla/run-1", is_main_process=True)
    assert len(hub.repos[REPO].commits) == commits
    assert url.endswith(hub.repos[REPO].heads["xla/run-1"])
    # A changed file is committed.
    with open(os.path.join(folder, "train_summary.json"), "w") as f:
        f.write('{"steps": 20}\n')
    push_to_hub(folder, REPO, TOKEN, revision="xla/run-1", is_main_process=True)
    assert hub.files(REPO, "xla/run-1")["train_summary.json"] == b'{"steps": 20}\n'


def test_rejected_token_is_one_line_and_the_export_stays(tmp_path, hub, hub_online, capfd, caplog_all):
    folder, grid = _export(tmp_path)
    _card(folder, grid)
    before = _tree(folder)
    wrong = TOKEN[::-1]
    with pytest.raises(HubError) as e:
        push_to_hub(folder, REPO, wrong, is_main_process=True)
    message = str(e.value)
    assert "\n" not in message and "401" in message and "rejected the token" in message
    assert wrong not in message
    assert _tree(folder) == before
    assert hub.repos == {}
    out, err = capfd.readouterr()
    for text in (out, err, caplog_all.text, message):
        assert wrong not in text and TOKEN not in text


def test_unreachable_hub_is_one_line(tmp_path, hub_online, capfd, caplog_all):
    folder, grid = _export(tmp_path)
    _card(folder, grid)
    before = _tree(folder)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(HubError) as e:
        push_to_hub(folder, REPO, TOKEN, is_main_process=True, endpoint=endpoint)
    message = str(e.value)
    assert message == f"push to {endpoint}/{REPO}: cannot reach the hub at {endpoint} (ConnectionError)"
    assert _tree(folder) == before
    out, err = capfd.readouterr()
    _assert_no_token(out, err, caplog_all.text, message)


def test_explicit_endpoint(tmp_path, hub_online):
    """HfApi(endpoint=) instead of HF_ENDPOINT (the other tests): the first push of a folder works."""
    with HubServer(TOKEN) as other:
        folder, _ = _export(tmp_path)
        url = push_to_hub(folder, REPO, TOKEN, is_main_process=True, endpoint=other.endpoint)
        expected = {p: b for p, b in _tree(folder).items() if not p.startswith(("logs/wandb/", "checkpoints/"))}
        assert other.files(REPO) == expected
        assert url.endswith(other.repos[REPO].heads["main"])


def test_only_process_zero_pushes(tmp_path, hub, hub_online):
    folder, _ = _export(tmp_path)
    assert push_to_hub(folder, REPO, TOKEN, is_main_process=False) is None
    assert hub.requests == []


def test_offline_mode_is_one_line(tmp_path, hub):
    """The session's HF_HUB_OFFLINE=1 (as set in conftest): huggingface_hub would refuse every request."""
    folder, _ = _export(tmp_path)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(folder, REPO, TOKEN, is_main_process=True)
    assert hub.requests == []


def test_not_a_local_folder(tmp_path):
    with pytest.raises(HubError, match="not a local folder"):
        push_to_hub(str(tmp_path / "missing"), REPO, TOKEN, is_main_process=True)


def test_model_card_on_gcs(tmp_path, gcs_emulator):
    """A gs:// output folder gets the card and its grid too; a gs:// base's README gives the license."""
    from tests.gcs_emulator import make_bucket
    from xla_diffusion import fsio

    bucket = make_bucket("cards")
    fsio.write_bytes_atomic(f"{bucket}/base/README.md", b"---\nlicense: creativeml-openrail-m\n---\n# base\n")
    _, grid = _export(tmp_path)
    path = _card(f"{bucket}/run", grid, base_model=f"{bucket}/base")
    assert path == f"{bucket}/run/README.md"
    text = fsio.read_bytes(path).decode()
    assert text.startswith("---\nlicense: creativeml-openrail-m\n") and "base_model" not in text
    with open(grid, "rb") as f:
        assert fsio.read_bytes(f"{bucket}/run/validation_grid.png") == f.read()
    _assert_no_token(text)
