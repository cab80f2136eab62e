"""Pre-encoded latent shards: encode (XLA mesh and CPU), resume, bad data, the reader (hosts, workers,
damage), raw-vs-latent loss equality on the mesh, and the trainer CLI reading latents from the GCS emulator.

The module's fixtures encode the 64 synthetic images once on the 4-device mesh; the two trainer CLI runs
start right after that and run in the background while the other tests use the cores too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.encode import EncodeConfig, encode
from data_prep.shards import imagefolder_to_shards
from tests.gcs_emulator import make_bucket
from tests.helpers import finish, read_metrics, start_cli
from xla_diffusion import fsio
from xla_diffusion.config import ConfigError
from xla_diffusion.data.latents import LatentShardBatches, check_matches_model, decode_sample, read_manifest
from xla_diffusion.data.tar_stream import iter_tar_members, iter_tar_samples, tar_bytes

SHARD_SIZE = 16  # 64 images → 4 shards
# Eager CPU encodes here share the cores with this module's background trainer run.
pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _samples(path: str) -> tuple[list[dict], Counter]:
    errors: Counter = Counter()
    fs, p = fsio.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return list(iter_tar_samples(f, errors)), errors


def _json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _png(size=(64, 64), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 1000).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_shards(shapes_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("image_shards"))
    imagefolder_to_shards(os.path.join(shapes_dir, "train"), out, samples_per_shard=SHARD_SIZE)
    return out


@pytest.fixture(scope="module")
def encoded(image_shards, tiny_pipeline, tmp_path_factory) -> dict:
    """The synthetic shards encoded on the 4-device CPU mesh (in this process), batch 8 sharded 4 ways."""
    out = str(tmp_path_factory.mktemp("latents"))
    summary = encode(EncodeConfig(input_shards=image_shards, output_dir=out, resolution=64, batch_size=8,
                                  pretrained_model_name_or_path=tiny_pipeline, device="xla"))
    return {"dir": out, "summary": summary}


@pytest.fixture(scope="module")
def cli_runs(encoded, tiny_pipeline, gcs_emulator, tmp_path_factory, request):
    """Started once the latents exist: (1) 3 training steps reading the latents from gs:// with 2 loader
    workers (only when its slow test is selected); (2) a latent dataset whose manifest claims 8 channels,
    which must stop at start."""
    root = tmp_path_factory.mktemp("latent_cli")
    remote = make_bucket("latents") + "/shapes64"
    fs, path = fsio.url_to_fs(remote)
    fs.put(encoded["dir"].rstrip("/") + "/", path, recursive=True)

    bad = str(root / "bad_latents")
    shutil.copytree(encoded["dir"], bad)
    manifest = _json(os.path.join(bad, "manifest.json"))
    manifest["latent_shape"] = [8, 16, 16]
    with open(os.path.join(bad, "manifest.json"), "w") as f:
        json.dump(manifest, f)

    def args(data: str, name: str, steps: int) -> list[str]:
        return ["--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir", data, "--resolution", "64",
                "--train_batch_size", "8", "--max_train_steps", str(steps), "--logging_steps", "1",
                "--mixed_precision", "bf16", "--output_dir", str(root / name)]

    procs = {"mismatch": start_cli(args(bad, "mismatch", 2), str(root / "logs" / "mismatch"))}
    if any(item.name == test_trainer_trains_on_gcs_latent_shards_without_encoders.__name__
           for item in request.session.items):
        procs["gcs"] = start_cli(
            args(remote, "gcs", 3) + ["--dataloader_num_workers", "2", "--shuffle_buffer_size", "8"],
            str(root / "logs" / "gcs"),
        )
    yield SimpleNamespace(procs=procs, root=root, remote=remote)
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def test_tar_reader_counts_corrupt_members_and_truncation():
    samples = [{"__key__": f"{i:03d}", "txt": f"caption {i}", "bin": bytes([i]) * 700} for i in range(4)]
    raw = tar_bytes(samples)
    errors: Counter = Counter()
    assert [s["__key__"] for s in iter_tar_samples(io.BytesIO(raw), errors)] == ["000", "001", "002", "003"]
    assert not errors
    # A broken header (checksum) on sample 1's .bin member: that member is lost and counted, the rest is read.
    damaged = bytearray(raw)
    damaged[raw.find(b"001.bin") + 150] ^= 0xFF
    errors = Counter()
    got = list(iter_tar_samples(io.BytesIO(bytes(damaged)), errors))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in got] == [
        ("000", ["bin", "txt"]), ("001", ["txt"]), ("002", ["bin", "txt"]), ("003", ["bin", "txt"])]
    assert errors == Counter(corrupt_member=1)
    # Cut inside the last member: counted, everything before it kept.
    errors = Counter()
    names = [n for n, _ in iter_tar_members(io.BytesIO(raw[: raw.find(b"003.bin") + 900]), errors)]
    assert names == ["000.bin", "000.txt", "001.bin", "001.txt", "002.bin", "002.txt"]
    assert errors == Counter(truncated_shard=1)


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
def test_encode_writes_manifest_and_complete_shards(encoded, cli_runs, shapes_dir):
    out, summary = encoded["dir"], encoded["summary"]
    assert summary["samples_written"] == 64 and summary["shards_written"] == 4 and summary["device"] == "xla"
    manifest = _json(os.path.join(out, "manifest.json"))
    assert manifest["latent_shape"] == [4, 16, 16] and manifest["text_shape"] == [16, 32]
    assert manifest["vae"]["scaling_factor"] == pytest.approx(0.18215) and manifest["resolution"] == 64
    assert manifest["text_states"] is True and manifest["counts"]["samples"] == 64
    assert manifest["counts"]["shards"] == 4 and manifest["counts"]["skipped"] == {}
    shard_files = [f"0000{i}.{e}" for i in range(4) for e in ("tar", "stats.json")]
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "empty_prompt.safetensors", *shard_files])
    with open(os.path.join(shapes_dir, "train", "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    samples, errors = _samples(os.path.join(out, "00001.tar"))
    assert not errors and [s["__key__"] for s in samples] == [r["file_name"][:-4] for r in rows[16:32]]
    m = read_manifest(out)
    for s in samples:
        t = decode_sample(s, m)
        assert t["latent_mean"].dtype == torch.bfloat16 and t["encoder_hidden_states"].shape == (16, 32)
        assert t["input_ids"].dtype == torch.int32 and (t["latent_std"] > 0).all()
    assert samples[3]["txt"].decode() == rows[19]["text"]


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
def test_stored_latents_decode_like_on_the_fly(encoded, tiny_pipeline, shapes_dir):
    """Decoding the stored (bf16) posterior mean gives the image that decoding the on-the-fly fp32 mean gives."""
    from diffusers import AutoencoderKL

    from xla_diffusion.data.images import image_transform

    vae = AutoencoderKL.from_pretrained(tiny_pipeline, subfolder="vae").eval()
    m = read_manifest(encoded["dir"])
    samples, _ = _samples(os.path.join(encoded["dir"], "00002.tar"))
    transform = image_transform(64, center_crop=True, random_flip=False)
    pixels = torch.stack([transform(Image.open(os.path.join(shapes_dir, "train", s["__key__"] + ".png")).convert("RGB"))
                          for s in samples[:8]])
    stored = torch.stack([decode_sample(s, m)["latent_mean"] for s in samples[:8]]).float()
    stored_std = torch.stack([decode_sample(s, m)["latent_std"] for s in samples[:8]]).float()
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        torch.testing.assert_close(stored, posterior.mean, rtol=2**-7, atol=2e-3)
        torch.testing.assert_close(stored_std, posterior.std, rtol=2**-7, atol=1e-4)
        from_stored = vae.decode(stored).sample
        on_the_fly = vae.decode(posterior.mean).sample
    err = (from_stored - on_the_fly).abs()
    assert err.max() < 0.02 and err.mean() < 2e-3, (err.max(), err.mean())


def test_bad_samples_are_skipped_and_counted(tiny_pipeline, tmp_path):
    good = [{"__key__": f"good{i}", "png": _png(colour=(40 * i, 90, 10)), "txt": f"a red circle {i}"} for i in range(3)]
    bad = [
        {"__key__": "badimage", "png": b"\x89PNG but not really", "txt": "x"},
        {"__key__": "emptycap", "png": _png(), "txt": "   "},
        {"__key__": "nocap", "png": _png()},
        {"__key__": "mode16", "png": _png(mode="I;16"), "txt": "sixteen bit"},
        {"__key__": "small", "png": _png(size=(32, 32)), "txt": "too small"},
        {"__key__": "corrupt", "png": _png(), "txt": "its image member is damaged"},
        {"__key__": "zlast", "json": "{}", "png": _png(), "txt": "cut off"},
    ]
    raw = bytearray(tar_bytes([good[0], bad[0], good[1], *bad[1:6], good[2], bad[6]]))
    raw[raw.find(b"corrupt.png") + 140] ^= 0xFF  # header checksum no longer matches
    raw = bytes(raw[: raw.find(b"zlast.png") + 530])  # cut inside the last sample's image
    src = tmp_path / "in"
    src.mkdir()
    (src / "00000.tar").write_bytes(raw)
    (src / "00001.tar").write_bytes(os.urandom(3000))  # not a tar at all
    out = str(tmp_path / "out")
    summary = encode(EncodeConfig(input_shards=str(src), output_dir=out, pretrained_model_name_or_path=tiny_pipeline,
                                  resolution=64, batch_size=4, device="cpu"))
    stats = _json(os.path.join(out, "00000.stats.json"))
    assert stats["samples_written"] == 3 and stats["samples_seen"] == 10
    assert stats["skipped"] == {
        "bad_image": 1, "bad_mode": 1, "corrupt_member": 1, "empty_caption": 1, "missing_caption": 2,
        "missing_image": 1, "too_small": 1, "truncated_shard": 1,
    }
    samples, errors = _samples(os.path.join(out, "00000.tar"))
    assert [s["__key__"] for s in samples] == ["good0", "good1", "good2"] and not errors
    junk = _json(os.path.join(out, "00001.stats.json"))
    assert junk["samples_written"] == 0 and junk["skipped"] == {"corrupt_member": 1, "truncated_shard": 1}
    assert summary["samples_written"] == 3 and summary["shards_written"] == 2
    assert read_manifest(out).raw["counts"]["skipped"]["corrupt_member"] == 2


def test_resume_after_partial_run_matches_clean_run(gcs_emulator, image_shards, tiny_pipeline):
    """On the GCS emulator: half the shards, plus a shard published without its stats (a crash between the
    two writes), then a full run: the result is byte for byte the clean run's."""
    bucket = make_bucket("encode-resume")
    images = bucket + "/images"
    for name in sorted(os.listdir(image_shards)):
        fs, path = fsio.url_to_fs(images + "/" + name)
        fs.put_file(os.path.join(image_shards, name), path)

    def run(out: str, **kw) -> dict:
        return encode(EncodeConfig(input_shards=images, output_dir=out, pretrained_model_name_or_path=tiny_pipeline,
                                   resolution=64, batch_size=4, device="cpu", **kw))

    clean = run(bucket + "/clean")
    assert clean["shards_written"] == 4
    part = run(bucket + "/resumed", num_shards=2, shard_index=0)
    assert part["shards_written"] == 2 and part["samples_written"] == 32
    fsio.write_bytes_atomic(bucket + "/resumed/00001.tar", b"half a shard")  # no 00001.stats.json
    rest = run(bucket + "/resumed")
    assert rest["shards_skipped_done"] == 2 and rest["shards_written"] == 2 and rest["samples_written"] == 32
    assert run(bucket + "/resumed")["shards_written"] == 0

    fs, root = fsio.url_to_fs(bucket)
    fs.invalidate_cache()
    names = sorted(os.path.basename(p) for p in fs.ls(root + "/clean"))
    assert names == sorted(os.path.basename(p) for p in fs.ls(root + "/resumed"))
    assert len(names) == 10
    for n in names:
        assert fs.cat_file(f"{root}/clean/{n}") == fs.cat_file(f"{root}/resumed/{n}"), n


def _row_owner(latent_dir: str) -> dict[bytes, str]:
    """latent_mean bytes → shard name, for every sample of the dataset."""
    owner = {}
    m = read_manifest(latent_dir)
    for i in range(4):
        for s in _samples(os.path.join(latent_dir, f"0000{i}.tar"))[0]:
            owner[decode_sample(s, m)["latent_mean"].view(torch.int16).numpy().tobytes()] = f"0000{i}.tar"
    assert len(owner) == 64
    return owner


def _rows_read(batches: LatentShardBatches, n_batches: int) -> list[bytes]:
    rows = []
    for _, batch in zip(range(n_batches), batches):
        assert batch["latent_mean"].shape == (4, 4, 16, 16) and batch["encoder_hidden_states"].shape == (4, 16, 32)
        rows += [r.view(torch.int16).numpy().tobytes() for r in batch["latent_mean"]]
    return rows


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
def test_two_hosts_read_disjoint_shards_covering_the_dataset(encoded):
    owner = _row_owner(encoded["dir"])
    m = read_manifest(encoded["dir"])
    seen = {}
    for host in (0, 1):
        # One pass over this host's two shards, unshuffled.
        batches = LatentShardBatches(m, 4, process_index=host, process_count=2, shuffle_buffer=1, seed=3)
        rows = _rows_read(batches, 8)
        assert len(set(rows)) == 32
        seen[host] = set(rows)
        assert {owner[r] for r in rows} == ({"00000.tar", "00002.tar"} if host == 0 else {"00001.tar", "00003.tar"})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 64

    # Two loader workers of host 0 (one shard each), shuffled, for three passes: the stream goes on, and
    # only host 0's samples come out, every one of them.
    workers = LatentShardBatches(m, 4, process_index=0, process_count=2, num_workers=2, shuffle_buffer=8, seed=3)
    rows = _rows_read(workers, 24)
    assert set(rows) == seen[0] and Counter(rows).most_common(1)[0][1] <= 6


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
def test_reader_skips_and_counts_damaged_latent_samples(encoded, tmp_path):
    data = str(tmp_path / "latents")
    shutil.copytree(encoded["dir"], data)
    samples, _ = _samples(os.path.join(data, "00001.tar"))
    samples[2]["safetensors"] = b"not a safetensors file"
    raw = bytearray(tar_bytes(samples))
    raw[raw.find(samples[5]["__key__"].encode() + b".safetensors") + 140] ^= 0xFF
    with open(os.path.join(data, "00001.tar"), "wb") as f:
        f.write(bytes(raw))
    m = read_manifest(data)
    batches = LatentShardBatches(m, 2, shuffle_buffer=1, shards=[os.path.join(data, "00001.tar")])
    rows, skipped = [], Counter()
    for _, (batch, meta) in zip(range(7), batches.iter_from(None)):
        rows += [r.view(torch.int16).numpy().tobytes() for r in batch["latent_mean"]]
        skipped.update(meta["skipped"])  # the damage travels with the batches (the trainer counts consumed ones)
    assert len(set(rows)) == 14  # 16 minus the two damaged samples
    assert skipped == Counter(bad_sample=2, corrupt_member=1)


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
def test_manifest_must_match_the_model(encoded):
    m = read_manifest(encoded["dir"])
    unet = SimpleNamespace(in_channels=4, cross_attention_dim=32)
    check_matches_model(m, unet, 64)
    with pytest.raises(ConfigError, match="have 4 latent channels but the UNet takes 8"):
        check_matches_model(m, SimpleNamespace(in_channels=8, cross_attention_dim=32), 64)
    with pytest.raises(ConfigError, match="text states of width 32 but the UNet cross-attends to width 768"):
        check_matches_model(m, SimpleNamespace(in_channels=4, cross_attention_dim=768), 64)
    with pytest.raises(ConfigError, match="--resolution 512 but the latent shards .* were encoded at 64 px"):
        check_matches_model(m, unet, 512)


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
def test_trainer_source_for_latent_shards(encoded, tiny_pipeline):
    """build_data_source on a latent dataset: the batch keys the step needs, text states in the frozen dtype,
    the empty prompt for caption dropout, and no encoder loaded."""
    from xla_diffusion.config import parse_args
    from xla_diffusion.data.config import DataConfig
    from xla_diffusion.data.source import build_data_source, empty_prompt
    from xla_diffusion.models import frozen_dtype, load_models

    def cfg(*extra: str):
        c = parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir", encoded["dir"],
                        "--resolution", "64", "--train_batch_size", "8", *extra])
        return DataConfig.from_train_config(c, frozen_dtype(c.mixed_precision))

    models = load_models(tiny_pipeline, load_vae=False, load_text_encoder=False)
    assert models.vae is None and models.text_encoder is None and models.latent_shape(64) == (4, 16, 16)
    rt = SimpleNamespace(process_index=0, process_count=1)
    manifest = read_manifest(encoded["dir"])
    source = build_data_source(cfg(), models, rt, manifest)
    assert source.ndims == {"latent_mean": 4, "latent_std": 4, "encoder_hidden_states": 3, "noise": 4,
                            "timesteps": 1, "latent_eps": 4}
    batch = next(iter(source))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "latent_mean": ((8, 4, 16, 16), torch.bfloat16), "latent_std": ((8, 4, 16, 16), torch.bfloat16),
        "encoder_hidden_states": ((8, 16, 32), torch.float32), "noise": ((8, 4, 16, 16), torch.float32),
        "timesteps": ((8,), torch.int64), "latent_eps": ((8, 4, 16, 16), torch.float32)}
    empty = empty_prompt(source, models)["encoder_hidden_states"]
    assert empty.shape == (16, 32) and empty.dtype == torch.float32
    bf16 = build_data_source(cfg("--mixed_precision", "bf16"), models, rt, manifest)
    assert next(iter(bf16))["encoder_hidden_states"].dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="--random_flip cannot apply to pre-encoded latents"):
        build_data_source(cfg("--random_flip"), models, rt, manifest)


def _to_mesh(batch: dict[str, torch.Tensor], rt) -> dict[str, torch.Tensor]:
    from xla_diffusion import runtime

    return runtime.to_mesh(batch, rt.mesh)


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
@pytest.mark.filterwarnings("ignore:XLA_USE_SPMD is being deprecated")  # the runtime was set up by `encoded`
def test_latent_and_raw_batches_give_the_same_loss(encoded, tiny_pipeline, shapes_dir):
    """Same samples, noise, timesteps and posterior eps on the 4-device mesh: the loss from latent shards
    (no VAE, no text encoder in the graph) equals the loss with on-the-fly encoding, to bf16 storage precision."""
    from xla_diffusion import runtime
    from xla_diffusion.data.images import image_transform, tokenize
    from xla_diffusion.models import load_models
    from xla_diffusion.train_step import StepConfig, compute_loss

    rt = runtime.init_runtime()
    models = load_models(tiny_pipeline)
    m = read_manifest(encoded["dir"])
    samples = _samples(os.path.join(encoded["dir"], "00003.tar"))[0][:8]
    stored = [decode_sample(s, m) for s in samples]
    transform = image_transform(64, center_crop=True, random_flip=False)
    images = [Image.open(os.path.join(shapes_dir, "train", s["__key__"] + ".png")).convert("RGB") for s in samples]
    g = torch.Generator().manual_seed(11)
    # Late timesteps: the v target leans on the latents there, so the comparison is sensitive to them.
    shared = {"noise": torch.randn(8, 4, 16, 16, generator=g), "timesteps": torch.randint(500, 1000, (8,), generator=g),
              "latent_eps": torch.randn(8, 4, 16, 16, generator=g)}
    raw = {"pixel_values": torch.stack([transform(im) for im in images]),
           "input_ids": tokenize(models.tokenizer, [s["txt"].decode() for s in samples]), **shared}
    latent = {"latent_mean": torch.stack([t["latent_mean"] for t in stored]),
              "latent_std": torch.stack([t["latent_std"] for t in stored]),
              "encoder_hidden_states": torch.stack([t["encoder_hidden_states"] for t in stored]).float(), **shared}
    # v-prediction: the target itself depends on the latents, so a latent mismatch cannot hide.
    cfg = StepConfig(prediction_type="v_prediction", snr_gamma=None, max_grad_norm=1.0, bf16=False,
                     scaling_factor=m.scaling_factor)
    unet = models.unet.to(rt.device)
    vae, text_encoder = models.vae.to(rt.device), models.text_encoder.to(rt.device)
    ac = models.noise_scheduler.alphas_cumprod.float().to(rt.device)
    with torch.no_grad():
        loss_raw = compute_loss(unet, vae, text_encoder, _to_mesh(raw, rt), ac, cfg)
        loss_latent = compute_loss(unet, None, None, _to_mesh(latent, rt), ac, cfg)
        shuffled = {**latent, "latent_mean": latent["latent_mean"].roll(1, 0),
                    "latent_std": latent["latent_std"].roll(1, 0)}
        loss_wrong = compute_loss(unet, None, None, _to_mesh(shuffled, rt), ac, cfg)
        runtime.sync()
    raw_v, latent_v, wrong_v = float(loss_raw.cpu()), float(loss_latent.cpu()), float(loss_wrong.cpu())
    # Measured: 1.3e-5 relative from bf16 storage; pairing each sample with its neighbour's latents: 1.4e-3.
    assert abs(latent_v - raw_v) <= 1e-4 * raw_v, (raw_v, latent_v)
    assert abs(wrong_v - raw_v) > 1e-4 * raw_v and abs(wrong_v - raw_v) > 20 * abs(latent_v - raw_v), (
        raw_v, latent_v, wrong_v)


@pytest.mark.slow  # needs the latents encoded on the mesh (an XLA compilation)
def test_manifest_mismatch_stops_the_trainer_with_one_error_line(cli_runs):
    r = finish(cli_runs.procs["mismatch"], timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the latent shards at") and "have 8 latent channels but the UNet takes 4" in last


@pytest.mark.slow
def test_trainer_trains_on_gcs_latent_shards_without_encoders(cli_runs, tiny_pipeline):
    r = finish(cli_runs.procs["gcs"], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = str(cli_runs.root / "gcs")
    summary = _json(os.path.join(out, "train_summary.json"))
    assert summary["data"] == "latent_shards" and summary["encoders_loaded"] == []
    assert summary["compilations"] == 1 and summary["steps"] == 3
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert "training on pre-encoded latents at gs://latents/shapes64: 4 of 4 shards" in r.stderr
    # The export takes the frozen parts from the source pipeline, untouched.
    from safetensors.torch import load_file

    vae = load_file(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    vae0 = load_file(os.path.join(tiny_pipeline, "vae", "diffusion_pytorch_model.safetensors"))
    assert vae.keys() == vae0.keys() and all(torch.equal(vae[k], vae0[k]) for k in vae0)
