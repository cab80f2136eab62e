"""FSDP, gradient accumulation and gradient checkpointing all on, through the real trainer CLI on the 4-device CPU
mesh, saved and resumed (slow: three launches, each compiles its step once).

- `ref`: raw images, fp32, EMA, mesh data=2 × fsdp=2 (UNet weights, gradients, AdamW moments and EMA shadows
  split over `fsdp`), 2 micro-batches of 4 per update, `--gradient_checkpointing`, 6 updates, a checkpoint every
  3, `--max_compilations 2`;
- `same`: `ref`'s step-3 checkpoint resumed with the same command: it must end bitwise equal to `ref`;
- `dp`: `ref`'s step-3 checkpoint resumed on data=4 × fsdp=1 (replicated weights): the sharded tensors are
  read into the other layout, and the run must end where `ref` ends (fp32, ≤ 1e-5 relative: the reductions
  run in another order).
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import checkpoint_tensors, finish, read_metrics, start_cli
from xla_diffusion import checkpoint, fsio

pytestmark = pytest.mark.slow

STEPS, SAVED = 6, 3


def _args(r: SimpleNamespace, name: str, fsdp: int) -> list[str]:
    return ["--pretrained_model_name_or_path", r.pipeline, "--train_data_dir", r.images, "--resolution", "64",
            "--center_crop", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--gradient_checkpointing", "--fsdp_size", str(fsdp), "--max_train_steps", str(STEPS), "--seed", "5",
            "--mixed_precision", "no", "--use_ema", "--ema_decay", "0.9", "--learning_rate", "1e-3",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--logging_steps", "1",
            "--checkpointing_steps", str(SAVED), "--max_compilations", "2", "--resume_from_checkpoint", "latest",
            "--output_dir", r.out(name)]


def _resume_from_ref(r: SimpleNamespace, name: str, fsdp: int):
    """A fresh output dir holding only `ref`'s step-3 checkpoint, resumed with `--fsdp_size fsdp`."""
    src = checkpoint.step_dir(r.out("ref"), SAVED)
    shutil.copytree(src, checkpoint.step_dir(r.out(name), SAVED))
    return start_cli(_args(r, name, fsdp), os.path.join(r.root, "logs", name), 4)


@pytest.fixture(scope="module")
def runs(tiny_pipeline, shapes_dir, tmp_path_factory) -> SimpleNamespace:
    root = str(tmp_path_factory.mktemp("fsdp_resume"))
    r = SimpleNamespace(root=root, pipeline=tiny_pipeline, images=os.path.join(shapes_dir, "train"), results={},
                        out=lambda name: os.path.join(root, name))
    r.results["ref"] = finish(start_cli(_args(r, "ref", 2), os.path.join(root, "logs", "ref"), 4))
    if r.results["ref"].returncode == 0:
        # both resumes share the two cores: each compiles once
        procs = {"same": _resume_from_ref(r, "same", 2), "dp": _resume_from_ref(r, "dp", 1)}
        r.results.update({name: finish(p) for name, p in procs.items()})
    return r


def _ok(r: SimpleNamespace, name: str) -> str:
    result = r.results.get(name)
    assert result is not None, "the reference run failed: " + r.results["ref"].stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return r.out(name)


def test_fsdp_accumulation_and_checkpointing_compile_one_step_graph_within_the_bound(runs):
    out = _ok(runs, "ref")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["compilations"] for m in metrics] == [1] * STEPS  # --max_compilations 2 would stop a third
    summary = fsio.read_json(os.path.join(out, "train_summary.json"))
    assert summary["mesh"] == {"data": 2, "fsdp": 2}
    assert summary["global_batch_size"] == 8  # 2 micro-batches of 4
    marker = fsio.read_json(os.path.join(checkpoint.step_dir(out, SAVED), "COMPLETE"))
    shardings = marker["layout"]["shardings"]
    # the checkpoint holds weights, AdamW moments and EMA shadows split over fsdp, each saved shard by shard
    for group in ("module.", "optimizer.", "ema."):
        split = [k for k, spec in shardings.items() if k.startswith(group) and "devices=[" in spec]
        assert split, f"no {group} tensor is sharded: {list(shardings.items())[:4]}"


def test_sharded_run_resumes_bitwise_on_the_same_layout(runs):
    out = _ok(runs, "same")
    assert f"at step {SAVED} in" in runs.results["same"].stderr
    assert [m["compilations"] for m in read_metrics(out)] == [1] * (STEPS - SAVED)
    ref = {m["step"]: m["loss"] for m in read_metrics(runs.out("ref"))}
    assert {m["step"]: m["loss"] for m in read_metrics(out)} == {s: ref[s] for s in range(SAVED + 1, STEPS + 1)}
    a, b = checkpoint_tensors(runs.out("ref"), STEPS), checkpoint_tensors(out, STEPS)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_fsdp_2x2_checkpoint_resumes_on_data_parallel_4x1(runs):
    out = _ok(runs, "dp")
    assert f"at step {SAVED} in" in runs.results["dp"].stderr
    assert fsio.read_json(os.path.join(out, "train_summary.json"))["mesh"] == {"data": 4, "fsdp": 1}
    ref = {m["step"]: m["loss"] for m in read_metrics(runs.out("ref"))}
    got = {m["step"]: m["loss"] for m in read_metrics(out)}
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5), step
    a, b = checkpoint_tensors(runs.out("ref"), STEPS), checkpoint_tensors(out, STEPS)
    assert sorted(a) == sorted(b)
    for group in ("module.", "optimizer.", "ema."):
        keys = [k for k in a if k.startswith(group) and a[k].is_floating_point()]
        num = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys)
        den = sum((a[k].double() ** 2).sum() for k in keys)
        assert (num / den) ** 0.5 <= 1e-5, group
    # the data-parallel run holds and saves the weights whole (replicated on every device)
    marker = fsio.read_json(os.path.join(checkpoint.step_dir(out, STEPS), "COMPLETE"))
    split = [k for k, spec in marker["layout"]["shardings"].items() if k.startswith("module.") and "devices=[" in spec]
    assert not split, split[:3]
