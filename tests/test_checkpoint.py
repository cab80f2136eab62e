"""The checkpoint store on the real 4-device CPU mesh: a training state (MLP with one weight split over the
mesh, the trainer's AdamW with capturable step and device lr, EMA shadows) saved asynchronously while
training goes on, restored bitwise into fresh tensors and trained on bitwise like the uninterrupted run;
damaged newest checkpoints skipped; retention; one-line errors; a 4-device checkpoint restored on 1 device
and through gs://; two processes writing one checkpoint.

Compilations: the reference run compiles its step graphs once (3 graphs: first step, second step with
propagated shardings, and at most one more for a restored run's first step); saves, restores and priming
compile nothing, and the tests assert it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.checkpoint_worker import FINGERPRINT, build, host_snapshot, state, train_step
from xla_diffusion import checkpoint, fsio, runtime
from xla_diffusion.checkpoint import CheckpointError
from xla_diffusion.checkpointer import Checkpointer
from xla_diffusion.optim import prime_optimizer
from xla_diffusion.resume import FINGERPRINT_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _host_state(step: int, g: torch.Generator) -> dict:
    return {"global_step": step, "lr_step": step, "data": {"shard": 3, "batches_consumed": step},
            "noise_rng": checkpoint.generator_state(g)}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Reference run A: 2 updates, an asynchronous save of step 2 while updates 3 and 4 run, then a save of
    step 4. Keeps host snapshots of the state at steps 2 and 4."""
    rt = runtime.init_runtime()
    out = str(tmp_path_factory.mktemp("ref"))
    model, opt, ema = build(rt, seed=0)
    g = torch.Generator().manual_seed(42)
    for update in (1, 2):
        train_step(rt, model, opt, ema, update)
    torch.randn(5, generator=g)
    snap2, host2 = host_snapshot(model, opt, ema), _host_state(2, g)
    ckpt = Checkpointer(out, mesh=rt.mesh)
    before = runtime.compile_count()
    t0 = time.perf_counter()
    path2 = ckpt.save(2, state(model, opt, ema), host2, FINGERPRINT)
    stall = time.perf_counter() - t0
    busy_after_save = ckpt.busy
    save_compiles = runtime.compile_count() - before
    for update in (3, 4):  # training goes on while step 2 is written
        train_step(rt, model, opt, ema, update)
    assert ckpt.wait() == path2
    snap4 = host_snapshot(model, opt, ema)
    ckpt.save(4, state(model, opt, ema), _host_state(4, g), FINGERPRINT)
    ckpt.close()
    return SimpleNamespace(rt=rt, out=out, model=model, opt=opt, ema=ema, snap2=snap2, snap4=snap4, host2=host2,
                           stall=stall, busy_after_save=busy_after_save, save_compiles=save_compiles)


def _assert_bitwise(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(actual)
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, different


def test_layout_and_marker(ref):
    path = checkpoint.step_dir(ref.out, 2)
    assert path == os.path.join(ref.out, "checkpoints", "step_00000002")
    assert sorted(os.listdir(path)) == [".metadata", "COMPLETE", "__0_0.distcp", "host_state_00000.json"]
    marker = fsio.read_json(os.path.join(path, "COMPLETE"))
    assert marker["step"] == 2 and marker["process_count"] == 1 and marker["fingerprint"] == FINGERPRINT
    assert marker["files"] == {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n != "COMPLETE"}
    # the split weight is recorded with its 4-way sharding, so a restore on 4 devices puts it back that way
    assert marker["layout"]["shardings"]["module.0.weight"] == "{devices=[4,1]0,1,2,3}"
    assert [c.step for c in checkpoint.list_checkpoints(ref.out)] == [2, 4]
    assert checkpoint.latest_complete(ref.out).step == 4


def test_async_save_stalls_only_for_the_host_copy(ref):
    assert ref.save_compiles == 0
    assert ref.busy_after_save  # save() returned while the files were still being written
    assert ref.stall < 5.0, ref.stall


def test_restore_is_bitwise_and_training_continues_bitwise(ref):
    """Fresh tensors (another seed), primed optimizer, restore of step 2 (written while A trained on):
    equal to A's step-2 state bit for bit; two more updates equal A's step 4 bit for bit."""
    model, opt, ema = build(ref.rt, seed=99)
    before = runtime.compile_count()
    prime_optimizer(opt)
    host = Checkpointer(ref.out, mesh=ref.rt.mesh).restore(checkpoint.step_dir(ref.out, 2), state(model, opt, ema),
                                                           FINGERPRINT)
    assert runtime.compile_count() == before, "priming or restoring compiled a graph"
    _assert_bitwise(ref.snap2, host_snapshot(model, opt, ema))
    assert host == ref.host2
    g = checkpoint.set_generator_state(torch.Generator(), host["noise_rng"])
    expected = torch.Generator().manual_seed(42)
    torch.randn(5, generator=expected)
    assert torch.equal(torch.randn(7, generator=g), torch.randn(7, generator=expected))
    # the tensors were restored with the shardings they had when saved (GSPMD re-sharded some in step 1)
    for key, t in checkpoint.flat_tensors(state(model, opt, ema)).items():
        assert runtime.sharding_spec_string(t) == runtime.sharding_spec_string(
            checkpoint.flat_tensors(state(ref.model, ref.opt, ref.ema))[key]), key
    before = runtime.compile_count()
    for update in (3, 4):
        train_step(ref.rt, model, opt, ema, update)
    # At most one new graph: the lr and EMA-decay scalars of a fresh optimizer/EMA are not yet annotated
    # the way a step leaves them; the checkpointed state itself matches the uninterrupted run's graph.
    assert runtime.compile_count() - before <= 1
    _assert_bitwise(ref.snap4, host_snapshot(model, opt, ema))


def test_primed_state_matches_adamw(ref):
    model, opt, _ = build(ref.rt, seed=1)
    before = runtime.compile_count()
    prime_optimizer(opt)
    assert runtime.compile_count() == before
    for (name, p), q in zip(model.named_parameters(), ref.model.parameters()):
        primed, real = opt.state[p], ref.opt.state[q]
        assert sorted(primed) == sorted(real), name
        for key in real:
            assert (primed[key].dtype, primed[key].shape, primed[key].device) == (
                real[key].dtype, real[key].shape, real[key].device), (name, key)
        assert runtime.sharding_spec_string(primed["exp_avg"]) == runtime.sharding_spec_string(p)
        assert float(primed["step"].cpu()) == 0.0 and not primed["exp_avg"].cpu().any()


def _damage(path: str, how: str) -> None:
    if how == "no_marker":
        os.remove(os.path.join(path, "COMPLETE"))
    elif how == "truncated_shard":
        with open(os.path.join(path, "__0_0.distcp"), "r+b") as f:
            f.truncate(1000)
    elif how == "missing_shard":
        os.remove(os.path.join(path, "__0_0.distcp"))
    elif how == "truncated_metadata":
        size = os.path.getsize(os.path.join(path, ".metadata"))
        with open(os.path.join(path, ".metadata"), "r+b") as f:  # same size, garbage: only unpickling tells
            f.write(b"\0" * size)
    elif how == "missing_host_state":
        os.remove(os.path.join(path, "host_state_00000.json"))
    elif how == "garbled_marker":
        with open(os.path.join(path, "COMPLETE"), "w") as f:
            f.write("{not json")


@pytest.mark.parametrize("how", ["no_marker", "truncated_shard", "missing_shard", "truncated_metadata",
                                 "missing_host_state", "garbled_marker"])
def test_damaged_newest_is_skipped_with_one_warning(ref, tmp_path, caplog, how):
    out = str(tmp_path / "run")
    shutil.copytree(ref.out, out)
    _damage(checkpoint.step_dir(out, 4), how)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.checkpoint"):
        found = checkpoint.latest_complete(out)
    assert found is not None and found.step == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "\n" not in warnings[0], warnings
    with pytest.raises(CheckpointError) as e:
        checkpoint.find_resume_checkpoint(out, checkpoint.step_dir(out, 4))
    assert "incomplete checkpoint" in str(e.value) and "\n" not in str(e.value)
    # the fallback restores fine
    model, opt, ema = build(ref.rt, seed=5)
    prime_optimizer(opt)
    Checkpointer(out, mesh=ref.rt.mesh).restore(found, state(model, opt, ema), FINGERPRINT)
    _assert_bitwise(ref.snap2, host_snapshot(model, opt, ema))


def _steps(out: str) -> list[int]:
    return [c.step for c in checkpoint.list_checkpoints(out)]


def test_retention(ref, tmp_path, caplog, monkeypatch):
    out = str(tmp_path / "run")
    st = state(ref.model, ref.opt, ref.ema)
    ckpt = Checkpointer(out, total_limit=2, asynchronous=False)
    for step in (10, 20, 30):
        ckpt.save(step, st, {}, FINGERPRINT)
    assert _steps(out) == [20, 30]
    os.makedirs(checkpoint.step_dir(out, 40))  # a save killed mid-write
    open(os.path.join(checkpoint.step_dir(out, 40), "__0_0.distcp"), "wb").close()
    ckpt.save(50, st, {}, FINGERPRINT)
    assert _steps(out) == [30, 50]  # incomplete 40 and the third-newest complete (20) are gone
    # A run resumed from step 30 saves step 45: step 50 belongs to the run it replaced, and `latest` must
    # not pick it after the next crash.
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.checkpoint"):
        ckpt.save(45, st, {}, FINGERPRINT)
    assert _steps(out) == [30, 45]
    assert any("step_00000050" in r.getMessage() for r in caplog.records)
    # A save that fails (disk full while writing the marker) is one error line and leaves the
    # previous checkpoints alone, even with a limit of 1.
    ckpt1 = Checkpointer(out, total_limit=1, asynchronous=True)

    def disk_full(dest, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsio, "write_json_atomic", disk_full)
    ckpt1.save(60, st, {}, FINGERPRINT)
    with pytest.raises(CheckpointError) as e:
        ckpt1.wait()
    msg = str(e.value)
    assert "\n" not in msg and "step_00000060" in msg and "No space left on device" in msg, msg
    monkeypatch.undo()
    assert checkpoint.latest_complete(out).step == 45
    assert _steps(out) == [30, 45, 60]
    ckpt1.save(70, st, {}, FINGERPRINT)
    ckpt1.close()
    assert _steps(out) == [70]  # limit 1: only the new, complete one is left


def test_fingerprint_mismatch_is_one_line(ref):
    model, opt, ema = build(ref.rt, seed=5)
    prime_optimizer(opt)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(ref.out).restore(checkpoint.latest_complete(ref.out), state(model, opt, ema),
                                      {**FINGERPRINT, "train_batch_size": 64})
    msg = str(e.value)
    assert "\n" not in msg
    assert "train_batch_size=32" in msg and "train_batch_size=64" in msg and "must not change" in msg, msg
    fp = checkpoint.config_fingerprint(SimpleNamespace(model="m", resolution=(8,), seed=0), ["model", "resolution"])
    assert fp == {"model": "m", "resolution": [8]}
    checkpoint.check_fingerprint("p", fp, {"model": "m", "resolution": (8,)})  # tuples compare as lists
    with pytest.raises(CheckpointError, match="unset but this run has seed=0"):
        checkpoint.check_fingerprint("p", fp, {**fp, "seed": 0})


def test_checkpoint_of_another_model_is_one_line(ref):
    model, opt, ema = build(ref.rt, seed=5, hidden=32)
    prime_optimizer(opt)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(ref.out).restore(checkpoint.latest_complete(ref.out), state(model, opt, ema), FINGERPRINT)
    msg = str(e.value)
    assert "\n" not in msg and "another model" in msg and "(16, 8) there and (32, 8) here" in msg, msg
    # without the optimizer and EMA, the checkpoint has tensors this run lacks
    model, _, _ = build(ref.rt, seed=5)
    with pytest.raises(CheckpointError, match="another model: it has optimizer"):
        Checkpointer(ref.out).restore(checkpoint.latest_complete(ref.out), checkpoint.training_state(model),
                                      FINGERPRINT)


def test_resume_resolution_and_bad_paths(ref, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="xla_diffusion.checkpoint"):
        assert checkpoint.find_resume_checkpoint(str(tmp_path / "new"), "latest") is None
    assert any("starting a new run" in r.getMessage() for r in caplog.records)
    assert checkpoint.find_resume_checkpoint(ref.out, None) is None
    assert checkpoint.find_resume_checkpoint(ref.out, "latest").step == 4
    assert checkpoint.find_resume_checkpoint(ref.out, "step_00000002").step == 2  # name under OUTPUT_DIR
    with pytest.raises(CheckpointError, match=r"^--resume_from_checkpoint /nonexistent/x: no such checkpoint$"):
        checkpoint.find_resume_checkpoint(ref.out, "/nonexistent/x")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as e:
        Checkpointer(str(blocker / "run"))  # the output dir's parent is a file
    assert str(e.value).startswith(f"cannot write checkpoints under {blocker}/run/checkpoints: ")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="host state of step 3 is not JSON"):
        Checkpointer(str(tmp_path / "run")).save(3, state(ref.model, ref.opt, ref.ema), {"g": torch.Generator()},
                                                 FINGERPRINT)
    prime = SimpleNamespace()
    with pytest.raises(TypeError):
        prime_optimizer(prime)


def test_same_devices_other_mesh_layout_reshards(ref):
    """The 4-device checkpoint restored on a (data 2, fsdp 2) mesh: the tensors keep the new run's shardings
    (not the saved ones) and hold the saved values."""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    mesh = xs.Mesh(np.arange(4), (2, 2), ("data", "fsdp"))
    model, opt, ema = build(SimpleNamespace(device=ref.rt.device, mesh=mesh, num_devices=4), seed=5)
    prime_optimizer(opt)
    specs = {k: runtime.sharding_spec_string(t) for k, t in checkpoint.flat_tensors(state(model, opt, ema)).items()}
    assert specs["module.0.weight"] == "{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}"
    before = runtime.compile_count()
    Checkpointer(ref.out, mesh=mesh).restore(checkpoint.step_dir(ref.out, 4), state(model, opt, ema), FINGERPRINT)
    assert runtime.compile_count() == before
    after = {k: runtime.sharding_spec_string(t) for k, t in checkpoint.flat_tensors(state(model, opt, ema)).items()}
    assert after == specs
    _assert_bitwise(ref.snap4, host_snapshot(model, opt, ema))


def test_partly_replicated_tensors_are_saved_and_restore_on_another_layout(ref, tmp_path):
    """Saved from the (data 2, fsdp 2) mesh, where the split weight and its moments are tiled over fsdp and
    replicated over data (each tile held twice), then restored on the 4-way layout: every tensor is in the
    checkpoint and equals A's step 4 bit for bit. (torch_xla hands each tile over once per replica, and torch's
    planner then dropped the tensor from the checkpoint without an error.)"""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    mesh = xs.Mesh(np.arange(4), (2, 2), ("data", "fsdp"))
    model, opt, ema = build(SimpleNamespace(device=ref.rt.device, mesh=mesh, num_devices=4), seed=5)
    prime_optimizer(opt)
    Checkpointer(ref.out, mesh=mesh).restore(checkpoint.step_dir(ref.out, 4), state(model, opt, ema), FINGERPRINT)
    out = str(tmp_path / "from_2x2")
    ckpt = Checkpointer(out, mesh=mesh)
    ckpt.save(4, state(model, opt, ema), {"global_step": 4}, FINGERPRINT)
    ckpt.close()
    marker = fsio.read_json(os.path.join(checkpoint.step_dir(out, 4), "COMPLETE"))
    assert "last_tile_dim_replicate" in marker["layout"]["shardings"]["module.0.weight"]

    model, opt, ema = build(ref.rt, seed=7)
    prime_optimizer(opt)
    Checkpointer(out, mesh=ref.rt.mesh).restore(checkpoint.step_dir(out, 4), state(model, opt, ema), FINGERPRINT)
    _assert_bitwise(ref.snap4, host_snapshot(model, opt, ema))


def test_four_device_checkpoint_restores_on_one_device(ref, tmp_path):
    """A separate process with CPU_NUM_DEVICES=1 restores the 4-device step-4 checkpoint: the shards of the
    split weight are read back into one unsharded tensor; every tensor equals A's bit for bit."""
    out = str(tmp_path / "restored.pt")
    env = {**os.environ, "CPU_NUM_DEVICES": "1", "PJRT_DEVICE": "CPU"}
    proc = subprocess.run([sys.executable, "-m", "tests.checkpoint_worker", "restore", ref.out, out], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got["num_devices"] == 1 and got["restore_compiles"] == 0
    _assert_bitwise(ref.snap4, got["tensors"])
    assert got["host"]["global_step"] == 4


def test_gcs_save_restore_and_damage(ref, gcs_emulator, caplog):
    from tests.gcs_emulator import make_bucket

    out = make_bucket("ckpt-test") + "/run"
    ckpt = Checkpointer(out, total_limit=2)
    st = state(ref.model, ref.opt, ref.ema)
    for step in (4, 8):
        ckpt.save(step, st, {"global_step": step}, FINGERPRINT)
    ckpt.close()
    assert _steps(out) == [4, 8] and checkpoint.latest_complete(out).step == 8
    model, opt, ema = build(ref.rt, seed=5)
    prime_optimizer(opt)
    host = Checkpointer(out).restore(checkpoint.latest_complete(out), state(model, opt, ema), FINGERPRINT)
    assert host == {"global_step": 8}
    _assert_bitwise(ref.snap4, host_snapshot(model, opt, ema))
    fs, p = fsio.url_to_fs(checkpoint.step_dir(out, 8) + "/__0_0.distcp")
    fs.rm(p)
    with caplog.at_level(logging.WARNING, logger="xla_diffusion.checkpoint"):
        assert checkpoint.latest_complete(out).step == 4
    assert any("__0_0.distcp is missing" in r.getMessage() for r in caplog.records)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        Checkpointer("gs://no-such-bucket/run")
    assert "\n" not in str(e.value) and str(e.value).startswith("cannot write checkpoints under gs://no-such-bucket")
    assert time.perf_counter() - t0 < 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_one_checkpoint(ref, tmp_path):
    """Two processes, each its own 2-device SPMD job (torch_xla 2.9 cannot make CPU processes one job),
    joined by a gloo group: one collective save (each process its own host state, process 0 the marker
    after both), then a collective restore into fresh tensors, bitwise, on both. Then the host side of the
    data: each process reads its own latent shards, saves its consumed position in its own host state, and
    after a restore continues with exactly the batches it would have read."""
    from tests.checkpoint_worker import toy_latents

    out, port = str(tmp_path / "run"), _free_port()
    latents = str(tmp_path / "latents")
    os.makedirs(latents)
    toy_latents(latents)
    env = {**os.environ, "CPU_NUM_DEVICES": "2", "PJRT_DEVICE": "CPU"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.checkpoint_worker", "twoproc", str(rank), str(port), out,
                               str(tmp_path / f"r{rank}.json"), latents], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in (0, 1)]
    for rank, r in enumerate(results):
        assert (r["process_index"], r["process_count"]) == (rank, 2)
        assert r["equal"] == r["keys"]  # every tensor restored bitwise
        assert r["host"] == {"process": rank, "data_position": 10 * (rank + 1)}
    path = checkpoint.step_dir(out, 2)
    names = set(os.listdir(path))
    assert {".metadata", "COMPLETE", "host_state_00000.json", "host_state_00001.json", "__0_0.distcp"} <= names
    marker = fsio.read_json(os.path.join(path, "COMPLETE"))
    assert marker["process_count"] == 2 and set(marker["files"]) == names - {"COMPLETE"}
    # Each process wrote its own data file. On CPU both processes hold identical full copies, so the planner's
    # de-duplication gives every chunk to process 0 and process 1's file is empty; on a pod each process
    # holds (and writes) only its own devices' shards, which this machine cannot show.
    assert "__1_0.distcp" in names
    chunk_files = {info.relative_path for info in checkpoint.read_dcp_metadata(path).storage_data.values()}
    assert chunk_files == {"__0_0.distcp"}
    # the data: each host its own shards (shards 0, 2 and 1, 3 of 13 samples: numbers 0-12, 26-38 and 13-25,
    # 39-51), its own position in its own host state, resumed without replaying
    seen = [{i for b in r["data"]["before"] + r["data"]["after"] for i in b} for r in results]
    assert not seen[0] & seen[1]
    assert seen[0] <= set(range(0, 13)) | set(range(26, 39)) and seen[1] <= set(range(13, 26)) | set(range(39, 52))
    # a run with another process count cannot take over the hosts' data positions and random streams
    model, opt, ema = build(ref.rt, seed=5)
    prime_optimizer(opt)
    with pytest.raises(CheckpointError, match="written by 2 processes and this run has 1"):
        Checkpointer(str(tmp_path / "other")).restore(path, state(model, opt, ema), FINGERPRINT)
    for rank, r in enumerate(results):
        assert r["data"]["resumed"] == r["data"]["after"]
        saved = fsio.read_json(os.path.join(checkpoint.step_dir(out + "_data", 5), f"host_state_0000{rank}.json"))
        assert saved["state"]["data"] == r["data"]["position"] and saved["process_index"] == rank
        assert r["data"]["position"]["batches"] == 5


@pytest.mark.parametrize("error", [
    ConnectionError("Cannot connect to host storage.googleapis.com:443"),
    OSError(28, "No space left on device"),
    PermissionError(13, "Forbidden: the service account may not write this bucket"),
], ids=["unreachable", "no_space", "permission"])
def test_gcs_save_failure_is_one_line_and_keeps_the_last_checkpoint(ref, gcs_emulator, monkeypatch, error):
    """A save to gs:// whose shard writes fail (simulated: the storage writer raises what gcsfs raises for a lost
    connection, a full quota, a refused write) stops with one line; the last complete checkpoint, the only one
    kept with a limit of 1, is still complete and restores bitwise."""
    from torch.distributed.checkpoint import _fsspec_filesystem

    from tests.gcs_emulator import make_bucket

    out = make_bucket(f"ckpt-fail-{type(error).__name__.lower()}-{getattr(error, 'errno', 0) or 0}") + "/run"
    ckpt = Checkpointer(out, total_limit=1, mesh=ref.rt.mesh)
    st = state(ref.model, ref.opt, ref.ema)
    ckpt.save(4, st, {"global_step": 4}, FINGERPRINT)
    ckpt.wait()

    def broken(self, path, mode):
        raise error

    monkeypatch.setattr(_fsspec_filesystem.FileSystem, "create_stream", broken)
    ckpt.save(8, st, {"global_step": 8}, FINGERPRINT)
    with pytest.raises(CheckpointError) as e:
        ckpt.wait()
    monkeypatch.undo()
    ckpt.close()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {checkpoint.step_dir(out, 8)} was not written: "), msg
    assert str(error).split(":")[0].split("] ")[-1] in msg, msg
    assert checkpoint.latest_complete(out).step == 4
    model, opt, ema = build(ref.rt, seed=5)
    prime_optimizer(opt)
    Checkpointer(out, mesh=ref.rt.mesh).restore(checkpoint.latest_complete(out), state(model, opt, ema), FINGERPRINT)
    _assert_bitwise(ref.snap4, host_snapshot(model, opt, ema))


def test_unreachable_store_is_one_line_in_seconds(monkeypatch):
    """Nothing listens at the store's address: the checkpoint root, `latest` and a latent dataset there each fail
    with one line at once (gcsfs alone retries 6 times with back-off, ~40 s, logging a traceback)."""
    from xla_diffusion.data.latents import read_manifest
    from xla_diffusion.errors import ConfigError

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        Checkpointer("gs://bucket/run")
    assert str(e.value) == ("cannot write checkpoints under gs://bucket/run/checkpoints: StoreUnreachable: cannot "
                            "reach the object store at 127.0.0.1:1: Connection refused")
    with pytest.raises(CheckpointError, match=r"^cannot list checkpoints under gs://bucket/run/checkpoints: "):
        checkpoint.find_resume_checkpoint("gs://bucket/run", "latest")
    with pytest.raises(ConfigError, match=r"^cannot read gs://bucket/latents/manifest.json: cannot reach the object"):
        read_manifest("gs://bucket/latents")
    assert time.perf_counter() - t0 < 10


def test_a_second_sigterm_exits_at_once_and_keeps_the_previous_checkpoint(ref, tmp_path):
    """The trainer's SIGTERM handling (resume.RunCheckpoints) in a subprocess training the toy state with a
    checkpoint every 3 steps: the first SIGTERM is acknowledged and starts the preemption checkpoint; a second
    one while it is being written ends the process at once (default action). The half-written checkpoint has
    no marker and is skipped; the step-3 checkpoint is complete and restores bitwise."""
    out, snapshot = str(tmp_path / "run"), str(tmp_path / "step3.pt")
    env = {**os.environ, "CPU_NUM_DEVICES": "4", "PJRT_DEVICE": "CPU"}
    with open(tmp_path / "out.txt", "w") as so, open(tmp_path / "err.txt", "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "tests.checkpoint_worker", "preempted", out, snapshot],
                                cwd=ROOT, env=env, stdout=so, stderr=se)

    def wait_for(path, text):
        t0 = time.monotonic()
        while text not in (tmp_path / path).read_text():
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
            assert time.monotonic() - t0 < 1200, f"no {text!r}"
            time.sleep(0.05)

    wait_for("out.txt", "step 4")
    proc.send_signal(signal.SIGTERM)
    wait_for("err.txt", "SIGTERM: the run stops after this step")
    wait_for("out.txt", "writing the preemption checkpoint")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert time.monotonic() - t0 < 10  # at once, not after the 120 s marker write
    steps = [c.step for c in checkpoint.list_checkpoints(out)]
    assert steps[0] == 3 and len(steps) == 2 and steps[1] >= 4, steps
    assert not os.path.exists(os.path.join(checkpoint.step_dir(out, steps[1]), "COMPLETE"))
    assert checkpoint.latest_complete(out).step == 3
    model, opt, ema = build(ref.rt, seed=5)
    prime_optimizer(opt)
    host = Checkpointer(out, mesh=ref.rt.mesh).restore(checkpoint.latest_complete(out), state(model, opt, ema), {
        f: None for f in FINGERPRINT_FIELDS})
    assert host == {"global_step": 3, "data": {"batches": 3}}
    _assert_bitwise(torch.load(snapshot), host_snapshot(model, opt, ema))
