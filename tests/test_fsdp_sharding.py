"""FSDP over the (data, fsdp) mesh, on the real 4-device CPU mesh: rules → specs, the annotations on the
devices, per-device bytes read back from the device buffers, collectives read from compiled HLO, and one
fp32 AdamW step (with EMA) that is the same sharded, replicated and with gradient checkpointing.

The device tests share three runs of the tiny UNet (one step graph each): replicated on (data=4, fsdp=1),
sharded on (data=1, fsdp=4), and replicated with gradient checkpointing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import with_xla_flags
from xla_diffusion import hlo, sharding
from xla_diffusion.sharding import REPLICATED, ShardingRuleError, default_spec, resolve_specs
from xla_diffusion.tiny import build_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cpu_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny")


# --- rules → specs (no device) ----------------------------------------------------------------------------


@pytest.mark.parametrize("fsdp", [2, 4])
def test_default_specs_of_the_tiny_unet(cpu_unet, fsdp):
    specs = resolve_specs(cpu_unet, {"data": 4 // fsdp, "fsdp": fsdp})
    expected = {
        "conv_in.weight": (None, None, None, None),  # (32, 4, 3, 3): 1152 elements, under the threshold
        "conv_in.bias": (None,),
        "time_embedding.linear_1.weight": ("fsdp", None),  # (128, 32)
        "time_embedding.linear_2.weight": ("fsdp", None),  # (128, 128): a tie goes to the first dim
        "down_blocks.0.resnets.0.conv1.weight": ("fsdp", None, None, None),  # (32, 32, 3, 3)
        "down_blocks.1.resnets.0.conv1.weight": ("fsdp", None, None, None),  # (64, 32, 3, 3)
        "up_blocks.0.resnets.0.conv1.weight": (None, "fsdp", None, None),  # (64, 128, 3, 3)
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight": (None, "fsdp"),  # (64, 256)
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": ("fsdp", None),  # (512, 64)
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.bias": (None,),  # (512,)
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (None, None),  # (64, 32): 2048
        "down_blocks.1.attentions.0.norm.weight": (None,),
        "conv_out.weight": (None, None, None, None),  # (4, 32, 3, 3)
    }
    for name, spec in expected.items():
        assert specs[name] == spec, name
    params = dict(cpu_unet.named_parameters())
    assert list(specs) == list(params)
    for name, spec in specs.items():
        shape = params[name].shape
        if shape.numel() < sharding.DEFAULT_MIN_SHARD_NUMEL:
            assert spec == (None,) * len(shape), name
            continue
        # every tiny-UNet tensor that large has a power-of-two dim ≥ 4, so it is split, on its largest one
        assert spec.count("fsdp") == 1 and set(spec) <= {"fsdp", None}, name
        dim = spec.index("fsdp")
        assert shape[dim] % fsdp == 0 and shape[dim] == max(n for n in shape if n % fsdp == 0), name


def test_fsdp_size_one_replicates_everything(cpu_unet):
    specs = resolve_specs(cpu_unet, {"data": 4, "fsdp": 1})
    assert all(set(s) == {None} for s in specs.values())


def test_default_rule_picks_the_largest_divisible_dim():
    sizes = {"data": 1, "fsdp": 4}
    assert default_spec((4098, 64), sizes) == (None, "fsdp")  # 4098 is the largest, but not divisible by 4
    assert default_spec((4099, 3), sizes) == (None, None)  # no divisible dim: replicated
    assert default_spec((64, 64, 3, 3), sizes) == ("fsdp", None, None, None)
    assert default_spec((1000,), sizes) == (None,)  # small: replicated
    assert default_spec((8192,), sizes) == ("fsdp",)
    assert default_spec((8192,), sizes, min_shard_numel=10_000) == (None,)


def test_user_rules_come_first_in_order(cpu_unet):
    rules = [
        ("*.attn1.to_q.weight", (None, "fsdp")),
        ("*.attn1.*", REPLICATED),  # to_q is taken by the rule above; the rest of attn1 is replicated
        ("conv_in.weight", ("fsdp", None, None, None)),  # a small tensor sharded on request
        ("*.ff.net.2.weight", (("data", "fsdp"), None)),  # 64 rows over data×fsdp = 4 ways
    ]
    specs = resolve_specs(cpu_unet, {"data": 2, "fsdp": 2}, rules)
    prefix = "down_blocks.1.attentions.0.transformer_blocks.0."
    assert specs[prefix + "attn1.to_q.weight"] == (None, "fsdp")
    assert specs[prefix + "attn1.to_k.weight"] == (None, None)
    assert specs[prefix + "attn1.to_out.0.bias"] == (None,)
    assert specs["conv_in.weight"] == ("fsdp", None, None, None)
    assert specs[prefix + "ff.net.2.weight"] == (("data", "fsdp"), None)
    assert specs[prefix + "ff.net.0.proj.weight"] == ("fsdp", None)  # no rule: the default


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([("*.to_qkv.weight", ("fsdp", None))], "sharding rule '*.to_qkv.weight' matches no parameter"),
        ([("*.attn1.*", REPLICATED), ("*.attn1.to_q.weight", ("fsdp", None))],
         "sharding rule '*.attn1.to_q.weight' is shadowed"),
        ([("conv_out.weight", (None, None, "fsdp", None))],
         "splits dim 2 of conv_out.weight (4, 32, 3, 3) over ('fsdp',) (4 ways): 3 is not divisible by 4"),
        ([("conv_in.bias", ("fsdp", None))], "gives 2-d spec ('fsdp', None) for conv_in.bias of shape (32,)"),
        ([("conv_in.bias", ("model",))], "names mesh axis 'model' (for conv_in.bias)"),
        ([("*.ff.net.2.weight", ("fsdp", "fsdp"))], "uses mesh axis 'fsdp' twice"),
    ],
)
def test_bad_rules_are_one_line_errors(cpu_unet, rules, message):
    with pytest.raises(ShardingRuleError) as err:
        resolve_specs(cpu_unet, {"data": 1, "fsdp": 4}, rules)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


# --- HLO parsing (no device) ------------------------------------------------------------------------------


def test_count_collectives_reads_shapes_tuples_and_async_pairs():
    text = textwrap.dedent("""\
        ENTRY %main (p0: bf16[4,8], p1: f32[16]) -> f32[16] {
          %p0 = bf16[4,8]{1,0} parameter(0), sharding={devices=[4,1]0,1,2,3}
          %p1 = f32[16]{0} parameter(1)
          %ag = bf16[16,8]{1,0} all-gather(%p0), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
          %ar = (f32[16]{0}, f32[]) all-reduce(%p1, %s), channel_id=2, to_apply=%add
          %ags = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%p0), channel_id=3, dimensions={0}
          %agd = bf16[16,8]{1,0} all-gather-done(%ags)
          %rs = f32[4]{0} reduce-scatter(%p1), channel_id=4, dimensions={0}, to_apply=%add
          ROOT %r = f32[16]{0} add(%p1, %p1)
        }
        """)
    stats = hlo.count_collectives(text)
    assert (stats["all-gather"].count, stats["all-gather"].operand_bytes, stats["all-gather"].result_bytes) == (
        2, 2 * 64, 2 * 256)
    assert (stats["all-reduce"].count, stats["all-reduce"].result_bytes) == (1, 64 + 4)
    assert (stats["reduce-scatter"].count, stats["reduce-scatter"].operand_bytes,
            stats["reduce-scatter"].result_bytes) == (1, 64, 16)
    assert stats["all-to-all"].count == 0 and stats["collective-permute"].count == 0


def test_collectives_and_buffers_of_a_compiled_fsdp_step(tmp_path):
    """A new process (XLA reads XLA_FLAGS once, at start-up) runs one SGD step of a (16, 32) weight split
    over fsdp=2 on a (2, 2) mesh, batch split 4 ways, and dumps the compiled HLO."""
    code = textwrap.dedent("""
        import torch
        from xla_diffusion import runtime, sharding
        rt = runtime.init_runtime(fsdp_size=2)
        w = torch.randn(16, 32).to(rt.device)
        sharding.shard_tensor(w, rt.mesh, ("fsdp", None))
        w.requires_grad_(True)
        x = torch.randn(8, 16).to(rt.device)
        sharding.shard_tensor(x, rt.mesh, (("data", "fsdp"), None))
        loss = (x @ w).square().sum()
        loss.backward()
        with torch.no_grad():
            w -= 0.1 * w.grad
        w.grad = None
        runtime.sync()
        print(sharding.sharding_string(w))
    """)
    dump = str(tmp_path / "dump")
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", XLA_FLAGS=with_xla_flags(hlo.hlo_dump_flags(dump)),
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}"  # w stays sharded
    (module,) = hlo.read_hlo_dump(dump)
    stats = hlo.count_collectives(module.hlo_text)
    # forward: each device gathers the full weight (f32 16×32 = 2048 bytes) from its 8×32 half
    ag = stats["all-gather"]
    assert (ag.count, ag.operand_bytes, ag.result_bytes) == (1, 1024, 2048)
    # the loss (4 bytes); the weight gradient summed within each fsdp pair (2048), then each device's
    # half summed over the data axis (1024). XLA's CPU backend writes the reduce-scatter as an all-reduce
    # plus a slice.
    ar = stats["all-reduce"]
    assert (ar.count, ar.operand_bytes) == (3, 4 + 2048 + 1024)
    buffers = hlo.buffer_assignment_bytes(module.buffer_assignment)
    # inputs: the half of w (1024 bytes), the quarter of x (2×16×4 = 128) and a few f32 scalars
    assert buffers["total"] > buffers["parameter"] and 1024 + 128 <= buffers["parameter"] <= 1024 + 128 + 16


@pytest.mark.parametrize(("device", "before", "after"), [
    ("CPU", None, "--xla_disable_hlo_passes=cse_barrier_expander"),
    ("CPU", "--xla_dump_to=/d --xla_disable_hlo_passes=foo",
     "--xla_dump_to=/d --xla_disable_hlo_passes=foo,cse_barrier_expander"),
    ("CPU", "--xla_disable_hlo_passes=cse_barrier_expander", "--xla_disable_hlo_passes=cse_barrier_expander"),
    ("TPU", "--xla_dump_to=/d", "--xla_dump_to=/d"),
])
def test_cpu_keeps_optimization_barriers_and_the_users_flags(monkeypatch, device, before, after):
    from xla_diffusion import runtime

    monkeypatch.setenv("PJRT_DEVICE", device)
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    runtime.keep_optimization_barriers_on_cpu()
    assert os.environ.get("XLA_FLAGS") == after


# The tiny UNet's forward + backward on a batch of 16 split over the 4-device mesh, bf16 autocast, compiled
# in a new process (XLA reads XLA_FLAGS once, at start-up) that dumps its graphs. `{setup}` makes `unet`.
_FORWARD_BACKWARD = """
import torch
from xla_diffusion import runtime, sharding
from xla_diffusion.tiny import build_unet
from xla_diffusion.xla_ops import xla_friendly_ops
rt = runtime.init_runtime(fsdp_size={fsdp})
g = torch.Generator().manual_seed(0)
x, h = torch.randn(16, 4, 16, 16, generator=g), torch.randn(16, 16, 32, generator=g)
t = torch.randint(0, 1000, (16,), generator=g)
batch = runtime.to_mesh({{"x": x, "h": h, "t": t}}, rt.mesh)
for checkpointing in {variants}:
    torch.manual_seed(0)
    unet = build_unet("tiny").train()
{setup}
    with xla_friendly_ops(), runtime.autocast(rt.device, True):
        pred = unet(batch["x"], batch["t"], batch["h"], return_dict=False)[0]
    pred.float().square().mean().backward()
    runtime.sync()
    print(float(unet.conv_in.weight.grad.abs().sum().cpu()))
"""


def _compile_forward_backward(tmp_path, fsdp: int, variants: tuple[bool, ...], setup: str) -> tuple[list[str], str]:
    """Run `_FORWARD_BACKWARD`; returns its printed values and the dump directory."""
    code = _FORWARD_BACKWARD.format(fsdp=fsdp, variants=variants, setup=textwrap.indent(textwrap.dedent(setup), "    "))
    dump = str(tmp_path / "dump")
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", XLA_FLAGS=with_xla_flags(hlo.hlo_dump_flags(dump)),
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split(), dump


def test_gradient_checkpointing_lowers_the_compiled_temporaries(tmp_path):
    """A new process compiles the tiny UNet's forward + backward (batch 16 split over the 4-device mesh, bf16
    autocast) twice, without and with --gradient_checkpointing, and dumps both graphs. The runtime keeps the
    checkpoint's optimization barriers on CPU (runtime.keep_optimization_barriers_on_cpu); with them the
    recomputation waits for its block's gradient, and the compiled step needs fewer temporary bytes, with no
    collective but the gradients' all-reduce."""
    printed, dump = _compile_forward_backward(tmp_path, 1, (False, True), """
        if checkpointing:
            sharding.enable_gradient_checkpointing(unet)
        unet = runtime.place_trained(unet, rt.mesh)
    """)
    plain_grad, checkpointed_grad = (float(v) for v in printed)
    assert checkpointed_grad == pytest.approx(plain_grad, rel=1e-2)  # bf16: the same gradients, not bitwise
    big = [m for m in hlo.read_hlo_dump(dump) if "convolution" in m.hlo_text]
    assert len(big) == 2, [m.name for m in big]
    plain, checkpointed = big  # compilation order
    assert "opt-barrier" not in plain.hlo_text and "opt-barrier" in checkpointed.hlo_text
    temp = [hlo.buffer_assignment_bytes(m.buffer_assignment)["temp"] for m in (plain, checkpointed)]
    assert temp[1] < 0.85 * temp[0], temp
    # data-parallel: nothing is gathered, in the recomputation either (it runs under xla_friendly_ops too;
    # torch_xla's own group_norm there gathered the batch at every GroupNorm: 52 all-gathers)
    for module in (plain, checkpointed):
        assert hlo.count_collectives(module.hlo_text)["all-gather"].count == 0, module.name


# --- on the 4-device mesh ---------------------------------------------------------------------------------

BATCH = 8
LR, BETAS, WEIGHT_DECAY, EPS = 1e-3, (0.9, 0.999), 1e-2, 1e-8
EMA_UPDATE = 5


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(BATCH, 4, 16, 16, generator=g),
        "timestep": torch.randint(0, 1000, (BATCH,), generator=g),
        "encoder_hidden_states": torch.randn(BATCH, 16, 32, generator=g),
        "target": torch.randn(BATCH, 4, 16, 16, generator=g),
    }


def _run(fsdp: int, checkpointing: bool) -> dict:
    """Two fp32 AdamW steps + EMA updates of the tiny UNet on the mesh (4 // fsdp, fsdp); what the tests read."""
    from xla_diffusion import runtime
    from xla_diffusion.ema import EmaWeights
    from xla_diffusion.optim import make_optimizer
    from xla_diffusion.xla_ops import xla_friendly_ops

    rt = runtime.init_runtime(fsdp_size=fsdp)
    torch.manual_seed(0)
    unet = build_unet("tiny")
    if checkpointing:
        sharding.enable_gradient_checkpointing(unet)  # what --gradient_checkpointing does
    specs = sharding.fsdp_shard(unet, rt.mesh)  # what --fsdp_size does
    optimizer = make_optimizer(unet, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    sharding.shard_optimizer_state(optimizer, unet, rt.mesh, specs)
    ema = EmaWeights(list(unet.parameters()), max_decay=0.999)  # shadows sharded like their params; decay u / (u + 9)
    batch = {k: v.to(rt.device) for k, v in _batch().items()}
    for v in batch.values():
        sharding.shard_tensor(v, rt.mesh, (("data", "fsdp"),) + (None,) * (v.ndim - 1))

    def state() -> list[torch.Tensor]:
        return (list(unet.parameters()) + ema.shadow
                + [v for s in optimizer.state.values() for v in s.values()])

    out: dict = {"specs": specs, "bytes_before": sharding.per_device_bytes(state()), "compiles": []}
    # EMA updates 5 and 6 (decays 5/14, 6/15), not 1 and 2: update 1's decay is exactly 0.0, and a 0-d
    # device value of 0.0 made step 1 trace to another graph than step 2 even with special scalars off
    # (measured on this UNet; not a sharding matter, left to the EMA code).
    for update in (EMA_UPDATE, EMA_UPDATE + 1):
        before = runtime.compile_count()
        ema.set_update(update)
        with xla_friendly_ops():
            pred = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, batch["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        runtime.sync()
        runtime.wait_device_ops()
        out["compiles"].append(runtime.compile_count() - before)
        if update == EMA_UPDATE:  # the state after one step is what the equivalence tests compare
            params = dict(unet.named_parameters())
            out["loss"] = loss.cpu()
            out["params"] = {n: p.detach().cpu() for n, p in params.items()}
            out["exp_avg"] = {n: optimizer.state[p]["exp_avg"].cpu() for n, p in params.items()}
            out["exp_avg_sq"] = {n: optimizer.state[p]["exp_avg_sq"].cpu() for n, p in params.items()}
            out["ema"] = {n: s.cpu() for n, s in zip(params, ema.shadow)}
    params = dict(unet.named_parameters())
    spec_of = sharding.sharding_string
    out["annotations"] = {
        n: (spec_of(p), spec_of(optimizer.state[p]["exp_avg"]), spec_of(optimizer.state[p]["exp_avg_sq"]), spec_of(s))
        for (n, p), s in zip(params.items(), ema.shadow)
    }
    out["step_annotation"] = spec_of(next(iter(optimizer.state.values()))["step"])
    out["bytes_after"] = sharding.per_device_bytes(state())
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    import torch_xla

    # torch_xla makes a transferred 0-d tensor holding 0 or 1 a graph constant ("special scalars"): EMA's
    # decay tensor starts as one, and step 1 traced to another graph than step 2. With every scalar as
    # data, a step's graph depends on the state's shapes and shardings only, which is what is tested here.
    before = torch_xla._XLAC._get_xla_handle_special_scalars()
    torch_xla._XLAC._set_xla_handle_special_scalars(False)
    try:
        yield {
            "replicated": _run(fsdp=1, checkpointing=False),
            "fsdp4": _run(fsdp=4, checkpointing=False),
            "checkpointed": _run(fsdp=1, checkpointing=True),
        }
    finally:
        torch_xla._XLAC._set_xla_handle_special_scalars(before)


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| of one tensor (0 when both are 0)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def test_annotations_land_on_params_optimizer_state_and_ema(runs):
    four_ways = {
        ("fsdp", None): "{devices=[4,1]0,1,2,3}",
        (None, "fsdp"): "{devices=[1,4]0,1,2,3}",
        ("fsdp", None, None, None): "{devices=[4,1,1,1]0,1,2,3}",
        (None, "fsdp", None, None): "{devices=[1,4,1,1]0,1,2,3}",
    }
    run = runs["fsdp4"]
    sharded = 0
    for name, spec in run["specs"].items():
        expected = four_ways[spec] if "fsdp" in spec else "{replicated}"
        sharded += "fsdp" in spec
        # still so after two steps: GSPMD keeps each updated tensor's sharding
        assert run["annotations"][name] == (expected,) * 4, name
    assert sharded >= 50
    assert run["step_annotation"] == "{replicated}"
    for name, specs in runs["replicated"]["annotations"].items():
        assert set(specs) == {"{replicated}"}, name


def test_primed_state_makes_step_one_the_steady_graph(runs):
    for name, run in runs.items():
        assert run["compiles"] == [1, 0], name


@pytest.mark.parametrize("fsdp", [1, 4])
def test_fsdp_pins_block_and_norm_outputs_to_the_batch_split_while_training(fsdp):
    """At fsdp > 1 every resnet and transformer block's output, and every GroupNorm's and LayerNorm's,
    carries the batch sharding (traced only: nothing compiles); not at fsdp 1, and not under no_grad
    (sampling, evaluation)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from xla_diffusion import runtime

    rt = runtime.init_runtime(fsdp_size=fsdp)
    torch.manual_seed(0)
    unet = build_unet("tiny")
    sharding.fsdp_shard(unet, rt.mesh)
    seen: list[tuple[str, bool, str]] = []

    def record(module, _inputs, output):  # registered after fsdp_shard's hook, so it sees the pinned output
        out = output[0] if isinstance(output, tuple) else output
        seen.append((type(module).__name__, torch.is_grad_enabled(), sharding.sharding_string(out)))

    for m in unet.modules():
        if isinstance(m, ResnetBlock2D | Transformer2DModel | torch.nn.GroupNorm | torch.nn.LayerNorm):
            m.register_forward_hook(record)
    batch = {k: v.to(rt.device) for k, v in _batch().items()}
    for v in batch.values():
        sharding.shard_tensor(v, rt.mesh, (("data", "fsdp"),) + (None,) * (v.ndim - 1))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], return_dict=False)
    assert {name for name, _, _ in seen} == {"ResnetBlock2D", "Transformer2DModel", "GroupNorm", "LayerNorm"}
    pinned = {(grad, spec) for _, grad, spec in seen}
    # (B, C, H, W) and (B, tokens, C) split 4 ways on B
    batch_split = {"{devices=[4,1,1,1]0,1,2,3}", "{devices=[4,1,1]0,1,2,3}"}
    if fsdp == 1:
        assert not batch_split & {spec for _, spec in pinned}
    else:
        assert {spec for grad, spec in pinned if grad} == batch_split
        assert not batch_split & {spec for grad, spec in pinned if not grad}


def test_fsdp4_step_moves_weights_not_activations(tmp_path):
    """A new process compiles the tiny UNet's forward + backward (bf16 autocast, batch 16) sharded by
    `fsdp_shard` on (data=1, fsdp=4) and dumps the graph. FSDP-shaped traffic gathers each split weight for
    the forward and again for the backward and moves no activations: no all-to-all or collective-permute,
    and at most 2 × 4 bytes × the split weights' elements all-gathered (XLA's CPU backend gathers bf16
    values as f32). Pinning only the blocks' outputs gathered 1.9x that, plus all-to-alls and permutes."""
    printed, dump = _compile_forward_backward(tmp_path, 4, (False,), """
        specs = sharding.fsdp_shard(unet, rt.mesh)
        shapes = {n: p.numel() for n, p in unet.named_parameters()}
        print(sum(shapes[n] for n, s in specs.items() if "fsdp" in s))
    """)
    split_numel = int(printed[0])
    assert split_numel > 900_000  # the big weights are split (950,272 of 985,444 elements)
    (step,) = [m for m in hlo.read_hlo_dump(dump) if "convolution" in m.hlo_text]
    stats = hlo.count_collectives(step.hlo_text)
    assert stats["all-to-all"].count == 0 and stats["collective-permute"].count == 0, stats
    assert 0 < stats["all-gather"].result_bytes <= 2 * 4 * split_numel, (stats["all-gather"], split_numel)


def test_fsdp4_state_bytes_are_at_most_0_3_of_replicated(runs):
    """Parameters + AdamW moments and steps + EMA shadows, summed from each device's local shards."""
    replicated, sharded = runs["replicated"]["bytes_after"], runs["fsdp4"]["bytes_after"]
    assert len(replicated) == len(sharded) == 4
    assert len(set(replicated.values())) == len(set(sharded.values())) == 1  # every device holds the same
    assert runs["fsdp4"]["bytes_before"] == sharded  # the steps did not change any tensor's placement
    params = sum(p.numel() for p in runs["replicated"]["params"].values())
    # fp32 params, 2 moments, EMA; and one fp32 step count, which SharedStepAdamW's parameters share
    assert replicated["CPU:0"] == 4 * 4 * params + 4
    ratio = sharded["CPU:0"] / replicated["CPU:0"]
    assert ratio <= 0.3, ratio


def _worst(run: dict, ref: dict, key: str) -> tuple[str, float]:
    name = max(ref[key], key=lambda n: _max_relative_error(run[key][n], ref[key][n]))
    return name, _max_relative_error(run[key][name], ref[key][name])


@pytest.mark.parametrize("other", ["fsdp4", "checkpointed"])
def test_one_step_gives_the_replicated_loss_and_gradients(runs, other):
    ref, run = runs["replicated"], runs[other]
    assert _max_relative_error(run["loss"], ref["loss"]) <= 1e-5
    for key in ("exp_avg", "exp_avg_sq"):  # after one step: (1 - β1)·g and (1 - β2)·g², per element
        name, error = _worst(run, ref, key)
        assert error <= 1e-5, f"{key} {name}: {error:.2e}"


@pytest.mark.parametrize("which", ["replicated", "fsdp4", "checkpointed"])
def test_the_step_applies_adamw_and_ema_to_its_own_gradients(runs, cpu_unet, which):
    """The weights and EMA after the step are AdamW and the EMA update computed on the host in float64
    from the initial weights and the run's own moments: the sharded update is the same arithmetic."""
    run = runs[which]
    decay = EMA_UPDATE / (EMA_UPDATE + 9)
    for name, p0 in cpu_unet.named_parameters():
        p0 = p0.detach().double()
        m_hat = run["exp_avg"][name].double() / (1 - BETAS[0])
        v_hat = run["exp_avg_sq"][name].double() / (1 - BETAS[1])
        expected = p0 * (1 - LR * WEIGHT_DECAY) - LR * m_hat / (v_hat.sqrt() + EPS)
        assert _max_relative_error(expected, run["params"][name].double()) <= 1e-5, name
        expected_ema = p0 + (1 - decay) * (run["params"][name].double() - p0)  # the shadows start as p0
        assert _max_relative_error(expected_ema, run["ema"][name].double()) <= 1e-5, name


@pytest.mark.parametrize("other", ["fsdp4", "checkpointed"])
def test_one_step_weights_equal_the_replicated_weights(runs, other):
    """AdamW's first update is lr·g/(|g| + eps): about ±lr whatever |g| is. Where a gradient is near its
    rounding level (|g| ~ 1e-7 against a largest 1e-2 in the same tensor, measured), a different summation
    order (sharded reductions, recomputed activations) flips its sign and the weight moves by up to 2·lr
    the other way. So weights are compared where the gradient is at least 1e-3 of its tensor's largest,
    which is most of them; everywhere else the gradients were compared above."""
    ref, run = runs["replicated"], runs[other]
    compared = total = 0
    for name, w_ref in ref["params"].items():
        g = ref["exp_avg"][name].abs()
        kept = g >= 1e-3 * g.max()
        compared, total = compared + int(kept.sum()), total + g.numel()
        error = (run["params"][name] - w_ref).abs()[kept].max().item() / w_ref.abs().max().item() if kept.any() else 0
        assert error <= 1e-5, f"{name}: {error:.2e}"
    assert compared >= 0.98 * total, (compared, total)


def test_per_device_bytes_needs_an_annotation():
    from xla_diffusion import runtime

    rt = runtime.init_runtime(fsdp_size=1)
    with pytest.raises(ValueError, match="no sharding annotation"):
        sharding.per_device_bytes([torch.ones(3).to(rt.device)])
