"""Checkpoint and resume through the real trainer CLI on the 4-device CPU mesh (slow: every launch compiles).

All runs start together in one module fixture, and the interrupted runs are chains of launches of one
command (`--resume_from_checkpoint latest` every time, so the first launch starts fresh with one info line):

- `lat_ref`: latent shards (one damaged sample), 60 fp32 steps, EMA, caption dropout, warm-up + cosine lr,
  2 loader workers, logging every 5 steps, a checkpoint every 20 (keep 2), `--max_compilations 2`;
- `lat_kill`: the same command, SIGKILLed while a checkpoint is being written, then SIGKILLed at a random
  moment after the next checkpoint, then run to the end (a second SIGTERM during a preemption checkpoint is
  tested on the toy state: test_checkpoint.py);
- `img_ref`: raw images (3 broken files), 12 fp32 steps, random crop and flip, EMA, caption dropout, warm-up +
  cosine, 2 workers, logging every step, a checkpoint every 4;
- `img_sig`: the same command, sent SIGTERM after step 3 (it checkpoints, exits 0 and says how to resume),
  then resumed to the end;
- `one_dev`: `lat_ref`'s step-40 checkpoint (4 devices) resumed on 1 device;
- bad input that must stop with one line: images none of which decode (the loader workers fail), a
  checkpoint of another model, an unreachable gs:// data path (the cases that fail before any device work
  are in-process tests: test_resume_errors.py).

The interrupted chains must end bitwise equal to their reference: UNet, AdamW moments and step, EMA (the
final checkpoints compared tensor by tensor, the exported pipelines byte by byte), and the same logged losses.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
import traceback
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import checkpoint_tensors, finish, read_metrics, start_cli
from xla_diffusion import checkpoint, fsio

pytestmark = pytest.mark.slow

WAIT = 2400  # s: every wait is bounded (a launch compiles twice, ~25 s each on an idle 2-core machine)


def _common(pipeline: str, data: str, out: str, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "64",
            "--train_batch_size", "8", "--max_train_steps", str(steps), "--seed", "11", "--mixed_precision", "no",
            "--use_ema", "--proportion_empty_prompts", "0.2", "--lr_scheduler", "cosine", "--learning_rate", "1e-3",
            "--dataloader_num_workers", "2", "--max_compilations", "2", "--resume_from_checkpoint", "latest",
            "--output_dir", out]


def lat_args(r: SimpleNamespace, name: str) -> list[str]:
    return _common(r.pipeline, r.latents, r.out(name), 60) + [
        "--lr_warmup_steps", "5", "--logging_steps", "5", "--checkpointing_steps", "20",
        "--checkpoints_total_limit", "2", "--shuffle_buffer_size", "8"]


def img_args(r: SimpleNamespace, name: str) -> list[str]:
    return _common(r.pipeline, r.images, r.out(name), 12) + [
        "--lr_warmup_steps", "3", "--logging_steps", "1", "--checkpointing_steps", "4", "--random_flip"]


def _stopped(proc) -> bool:
    """True while the process is stopped (SIGSTOP: a shared machine's scheduler may pause test jobs)."""
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


def _wait_for(what: str, predicate, proc=None, timeout: float = WAIT, poll: float = 0.02, watch=None):
    """Poll `predicate` until it is true; fail if `proc` ends first. The time budget counts only time in which
    `watch` (default: `proc`) runs: not while it is stopped, nor while this process was (a poll adds <= 1 s)."""
    watch = watch or proc
    spent, last = 0.0, time.monotonic()
    while spent < timeout:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}; see {proc.log_prefix}.err")
        time.sleep(poll)
        now = time.monotonic()
        if watch is None or not _stopped(watch):
            spent += min(now - last, 1.0)
        last = now
    raise AssertionError(f"timed out waiting for {what}")


def _finish(proc):
    _wait_for(f"the end of {proc.log_prefix}", lambda: proc.poll() is not None, watch=proc, poll=0.2)
    return finish(proc, timeout=60)


def _err(proc) -> str:
    with open(proc.log_prefix + ".err") as f:
        return f.read()


def _logged_steps(out: str) -> list[int]:
    try:
        return [m["step"] for m in read_metrics(out)]
    except (OSError, ValueError):
        return []


def _writing(out: str) -> str | None:
    """A checkpoint directory being written (no COMPLETE marker yet), if any."""
    root = os.path.join(out, "checkpoints")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if name.startswith("step_") and os.path.isdir(path) and not os.path.exists(os.path.join(path, "COMPLETE")):
            return path
    return None


class Runs(SimpleNamespace):
    def out(self, name: str) -> str:
        return os.path.join(self.root, name)

    def log(self, name: str) -> str:
        return os.path.join(self.root, "logs", name)

    def start(self, name: str, fn, *args) -> None:
        def run():
            try:
                self.results[name] = fn(*args)
            except BaseException as e:  # noqa: BLE001 (re-raised in the test that waits for it)
                self.errors[name] = "".join(traceback.format_exception(e))
        self.threads[name] = threading.Thread(target=run, name=name, daemon=True)
        self.threads[name].start()

    def wait(self, name: str):
        self.threads[name].join(WAIT * 3)
        assert not self.threads[name].is_alive(), f"{name} is still running"
        assert name not in self.errors, self.errors[name]
        return self.results[name]

    def launch(self, name: str, args: list[str], tag: str, num_devices: int = 4, env: dict | None = None):
        proc = start_cli(args, self.log(f"{name}.{tag}"), num_devices, env=env)
        self.procs.append(proc)
        return proc


def _plain(r: Runs, name: str, args: list[str], num_devices: int = 4):
    return _finish(r.launch(name, args, "1", num_devices))


def _img_sigterm_chain(r: Runs) -> dict:
    out = r.out("img_sig")
    p = r.launch("img_sig", img_args(r, "img_sig"), "1")
    _wait_for("step 3", lambda: max(_logged_steps(out), default=0) >= 3, p)
    p.send_signal(signal.SIGTERM)
    first = _finish(p)
    exported = os.path.exists(os.path.join(out, "model_index.json"))  # a preempted run must not export
    second = _finish(r.launch("img_sig", img_args(r, "img_sig"), "2"))
    return {"first": first, "second": second, "exported_when_preempted": exported}


def _lat_kill_chain(r: Runs) -> dict:
    """SIGKILL during a checkpoint write, SIGKILL at a random moment after the next checkpoint, then the same
    command to the end."""
    out, events, rng = r.out("lat_kill"), [], random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    events.append(f"random seed {seed}")
    # 1. killed while a checkpoint (the first: step 20) is being written
    p = r.launch("lat_kill", lat_args(r, "lat_kill"), "1")
    writing = _wait_for("a checkpoint write", lambda: _writing(out), p, poll=0.005)
    p.kill()
    events.append(f"1: SIGKILL while writing {os.path.basename(writing)} ({sorted(os.listdir(writing))})")
    r1 = _finish(p)
    # 2. killed at a random moment of the 6 s after the next checkpoint is complete
    p = r.launch("lat_kill", lat_args(r, "lat_kill"), "2")
    _wait_for("checkpoint 20", lambda: checkpoint.latest_complete(out), p, poll=0.2)
    delay = rng.uniform(0.0, 6.0)
    time.sleep(delay)
    p.kill()
    events.append(f"2: SIGKILL {delay:.2f} s after checkpoint 20 was complete, last logged step "
                  f"{max(_logged_steps(out), default=0)}, checkpoint being written: {_writing(out)}")
    r2 = _finish(p)
    # 3. to the end
    r3 = _finish(r.launch("lat_kill", lat_args(r, "lat_kill"), "3"))
    return {"launches": [r1, r2, r3], "events": events}


def _one_device(r: Runs) -> object:
    """lat_ref's 4-device checkpoint of step 40, resumed on a 1-device mesh."""
    done = r.wait("lat_ref")
    assert done.returncode == 0, done.stderr[-3000:]
    out = r.out("one_dev")
    os.makedirs(os.path.join(out, "checkpoints"))
    shutil.copytree(os.path.join(r.out("lat_ref"), "checkpoints", "step_00000040"),
                    os.path.join(out, "checkpoints", "step_00000040"))
    return _finish(r.launch("one_dev", lat_args(r, "one_dev"), "1", num_devices=1))


def _other_model(r: Runs) -> object:
    """lat_ref's step-40 checkpoint under another model's pipeline: its marker is made to name that pipeline
    (as if the model files at the same path had been replaced), so only the tensor check can catch it."""
    from xla_diffusion.tiny import build_tiny_pipeline

    other = build_tiny_pipeline(os.path.join(r.root, "demo_pipeline"), seed=0, unet="demo")
    done = r.wait("lat_ref")
    assert done.returncode == 0, done.stderr[-3000:]
    dst = os.path.join(r.out("other_model"), "checkpoints", "step_00000040")
    shutil.copytree(os.path.join(r.out("lat_ref"), "checkpoints", "step_00000040"), dst)
    marker = fsio.read_json(os.path.join(dst, "COMPLETE"))
    marker["fingerprint"]["pretrained_model_name_or_path"] = other
    fsio.write_json_atomic(os.path.join(dst, "COMPLETE"), marker)
    args = lat_args(r, "other_model")
    args[args.index("--pretrained_model_name_or_path") + 1] = other
    return _finish(r.launch("other_model", args, "1"))


def _bad_inputs(r: Runs) -> dict:
    """Runs that must stop with one line after the device loader started, or whose stderr must hold no
    traceback of a third-party library (one after another; no step compiles)."""
    junk = os.path.join(r.root, "junk_images")
    shutil.copytree(r.images, junk)
    for name in os.listdir(junk):
        if name.endswith(".png"):
            with open(os.path.join(junk, name), "wb") as f:
                f.write(b"junk")
    cases = {"junk_images": ["--train_data_dir", junk], "gcs_unreachable": ["--train_data_dir", "gs://no-bucket/data"]}
    results = {}
    for name, change in cases.items():
        args = img_args(r, name)
        args[args.index(change[0]) + 1] = change[1]
        # nothing listens on port 1: the gs:// data path is unreachable
        env = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"} if name == "gcs_unreachable" else None
        results[name] = _finish(r.launch(name, args, "1", env=env))
    return results


def _latent_dataset(r: Runs, shapes_dir: str, pipeline: str) -> str:
    from data_prep.encode import EncodeConfig, encode
    from data_prep.shards import imagefolder_to_shards
    from xla_diffusion.data.tar_stream import iter_tar_samples, tar_bytes

    shards, out = os.path.join(r.root, "image_shards"), os.path.join(r.root, "latents")
    imagefolder_to_shards(os.path.join(shapes_dir, "train"), shards, samples_per_shard=16)
    encode(EncodeConfig(input_shards=shards, output_dir=out, resolution=64, batch_size=8,
                        pretrained_model_name_or_path=pipeline, device="cpu"))
    path = os.path.join(out, "00002.tar")
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f, __import__("collections").Counter()))
    samples[3]["safetensors"] = b"damaged"  # skipped and counted as bad_sample, in every pass
    with open(path, "wb") as f:
        f.write(tar_bytes(samples))
    return out


@pytest.fixture(scope="module")
def runs(tiny_pipeline, shapes_dir, tmp_path_factory, single_thread_torch) -> Runs:
    root = str(tmp_path_factory.mktemp("resume"))
    r = Runs(root=root, pipeline=tiny_pipeline, threads={}, results={}, errors={}, procs=[])
    r.images = os.path.join(root, "images", "train")
    shutil.copytree(os.path.join(shapes_dir, "train"), r.images)
    names = sorted(n for n in os.listdir(r.images) if n.endswith(".png"))
    with open(os.path.join(r.images, names[7]), "wb") as f:
        f.write(b"not an image")
    path = os.path.join(r.images, names[30])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    open(os.path.join(r.images, names[50]), "wb").close()
    # image runs first: they need no encoding
    r.start("img_ref", _plain, r, "img_ref", img_args(r, "img_ref"))
    r.start("img_sig", _img_sigterm_chain, r)
    r.latents = _latent_dataset(r, shapes_dir, tiny_pipeline)
    r.start("lat_ref", _plain, r, "lat_ref", lat_args(r, "lat_ref"))
    r.start("lat_kill", _lat_kill_chain, r)
    r.start("one_dev", _one_device, r)
    r.start("other_model", _other_model, r)
    r.start("bad_inputs", _bad_inputs, r)
    yield r
    for p in r.procs:
        if p.poll() is None:
            p.kill()


def _assert_bitwise(a: str, b: str, step: int) -> None:
    ta, tb = checkpoint_tensors(a, step), checkpoint_tensors(b, step)
    assert sorted(ta) == sorted(tb)
    groups = {k.split(".")[0] for k in ta}
    assert groups == {"module", "optimizer", "ema"}
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    with open(os.path.join(a, "unet", "diffusion_pytorch_model.safetensors"), "rb") as fa, \
            open(os.path.join(b, "unet", "diffusion_pytorch_model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()  # the exported (EMA) UNet, byte for byte


def _losses(out: str) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(out)]


def _summary(out: str) -> dict:
    return fsio.read_json(os.path.join(out, "train_summary.json"))


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_sigterm_checkpoints_exits_0_and_resumes_exactly_on_images(runs):
    ref, chain = runs.wait("img_ref"), runs.wait("img_sig")
    _ok(ref)
    first, second = chain["first"], chain["second"]
    _ok(first)
    lines = [ln for ln in first.stderr.splitlines() if "preempted at step" in ln]
    assert len(lines) == 1, first.stderr[-3000:]
    step = int(lines[0].split("preempted at step ")[1].split(":")[0])
    assert 3 <= step < 12
    assert checkpoint.step_dir(runs.out("img_sig"), step) in lines[0]
    assert "--resume_from_checkpoint latest" in lines[0]
    assert not chain["exported_when_preempted"]
    assert "no complete checkpoint under" in first.stderr  # `latest` with nothing yet: a fresh start
    _ok(second)
    assert f"at step {step} in" in second.stderr
    # identical per-step losses, and bitwise identical UNet, AdamW state and EMA at the end
    assert _losses(runs.out("img_sig")) == _losses(runs.out("img_ref"))
    assert [s for s, _ in _losses(runs.out("img_ref"))] == list(range(1, 13))
    _assert_bitwise(runs.out("img_ref"), runs.out("img_sig"), 12)
    # corrupt images: skipped, counted per reason, in the metrics and the summary, the same after a resume
    summary = _summary(runs.out("img_ref"))
    assert set(summary["data_skipped"]) == {"unreadable_image", "damaged_image"}
    assert summary["data_skipped"] == _summary(runs.out("img_sig"))["data_skipped"]
    assert read_metrics(runs.out("img_ref"))[-1]["data_skipped"] == summary["data_skipped"]
    assert summary["compilations"] <= 2 and _summary(runs.out("img_sig"))["compilations"] <= 2


def test_kill_9_anywhere_then_resume_ends_bitwise_equal_on_latents(runs):
    ref, chain = runs.wait("lat_ref"), runs.wait("lat_kill")
    _ok(ref)
    events = "; ".join(chain["events"])
    r1, r2, r3 = chain["launches"]
    assert r1.returncode == -signal.SIGKILL and r2.returncode == -signal.SIGKILL, events
    # launch 2 found only the killed, incomplete checkpoint: one warning, then a fresh start
    assert "skipping incomplete checkpoint" in r2.stderr and "no complete checkpoint under" in r2.stderr, events
    assert "resumed from" in r3.stderr, events
    _ok(r3)
    assert _losses(runs.out("lat_kill")) == _losses(runs.out("lat_ref")), events
    _assert_bitwise(runs.out("lat_ref"), runs.out("lat_kill"), 60)
    # retention kept the last 2 complete checkpoints, and no incomplete one
    assert [c.step for c in checkpoint.list_checkpoints(runs.out("lat_kill"))] == [40, 60]
    assert [c.step for c in checkpoint.list_checkpoints(runs.out("lat_ref"))] == [40, 60]


def test_sixty_steps_with_checkpoints_ema_and_logging_compile_one_graph(runs):
    """Logging every 5 steps, a checkpoint every 20, EMA: the step compiles 1 graph, like the plain run (the
    optimizer state is primed before step 1; --max_compilations 2 bounds it); saves stall only for the host
    copy."""
    _ok(runs.wait("lat_ref"))
    summary = _summary(runs.out("lat_ref"))
    assert summary["steps"] == 60 and summary["compilations"] == 1 and summary["checkpoints_saved"] == 3
    assert [m["compilations"] for m in read_metrics(runs.out("lat_ref"))] == [1] * 12
    assert summary["checkpoint_stall_s"] < 10
    # the damaged latent sample: skipped and counted, in the metrics and the summary
    assert summary["data_skipped"].get("bad_sample", 0) >= 1
    assert read_metrics(runs.out("lat_ref"))[-1]["data_skipped"] == summary["data_skipped"]


def test_four_device_checkpoint_resumes_on_one_device(runs):
    result = runs.wait("one_dev")
    _ok(result)
    assert "resumed from" in result.stderr and "at step 40 in" in result.stderr
    assert _summary(runs.out("one_dev"))["num_devices"] == 1
    ref = dict(_losses(runs.out("lat_ref")))
    got = dict(_losses(runs.out("one_dev")))
    assert sorted(got) == [45, 50, 55, 60]
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), step
    a, b = checkpoint_tensors(runs.out("lat_ref"), 60), checkpoint_tensors(runs.out("one_dev"), 60)
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a if k.startswith("module."))
    den = sum((a[k].double() ** 2).sum() for k in a if k.startswith("module."))
    assert (num / den) ** 0.5 < 1e-4


def test_a_checkpoint_of_another_model_is_one_line(runs):
    result = runs.wait("other_model")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "is of another model: " in last, last


@pytest.mark.parametrize("case, code, message", [
    ("junk_images", 1, "error: the data loader stopped: DataError: none of the 64 samples of this host's dataset "
                       "can be used ({{'unreadable_image': 64}})"),
    ("gcs_unreachable", 2, "error: cannot read gs://no-bucket/data/manifest.json: cannot reach the object store "
                           "at 127.0.0.1:1: Connection refused"),
])
def test_bad_input_is_one_line(runs, case, code, message):
    """No image decodes: the loader workers fail, the run stops with the cause (the device loader's thread
    used to die, leaving the loop to a bare StopIteration). An unreachable gs:// data path: one line, no
    aiohttp traceback."""
    result = runs.wait("bad_inputs")[case]
    assert "Traceback" not in result.stderr and "aiohttp" not in result.stderr, result.stderr[-3000:]
    # one error line (loader workers may still log a skipped sample around it while the process ends)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [message.format(root=runs.root)], result.stderr[-2000:]
    assert result.returncode == code
