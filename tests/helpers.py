"""Running the real trainer CLI as subprocesses, on a chosen number of CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_text_to_image_xla.py")


def cli_env(num_devices: int = 4) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(num_devices), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def with_xla_flags(flags: str) -> str:
    """This session's XLA_FLAGS (conftest.py) with `flags` added: for a subprocess that sets XLA flags of its own."""
    return (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def start_cli(args: list[str], log_prefix: str, num_devices: int = 4, script: str = SCRIPT,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the CLI with stdout/stderr going to `<log_prefix>.out/.err` (files, not pipes: several runs
    go at once and a full pipe would stall one); `env` adds to or overrides `cli_env`."""
    os.makedirs(os.path.dirname(log_prefix), exist_ok=True)
    with open(log_prefix + ".out", "w") as out, open(log_prefix + ".err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, script, *args], env={**cli_env(num_devices), **(env or {})}, cwd=ROOT, stdout=out,
            stderr=err, stdin=subprocess.DEVNULL,
        )
    proc.log_prefix = log_prefix  # type: ignore[attr-defined]
    return proc


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def finish(proc: subprocess.Popen, timeout: float = 900) -> Finished:
    proc.wait(timeout=timeout)
    with open(proc.log_prefix + ".out") as out, open(proc.log_prefix + ".err") as err:  # type: ignore[attr-defined]
        return Finished(proc.returncode, out.read(), err.read())


def run_cli(args: list[str], log_prefix: str, num_devices: int = 4, timeout: float = 600) -> Finished:
    return finish(start_cli(args, log_prefix, num_devices), timeout)


def checkpoint_tensors(output_dir: str, step: int) -> dict:
    """Every tensor of the run's checkpoint of `step`, read on the CPU (no process group, no XLA), by flat name
    (`module.*`, `optimizer.*`, `ema.*`)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from xla_diffusion import checkpoint

    target = os.path.join(output_dir, f"step_{step}.pt")
    dcp_to_torch_save(checkpoint.step_dir(output_dir, step), target)
    return checkpoint.flat_tensors(torch.load(target))


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "logs", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


VALIDATION_PROMPTS = ["a red circle on a blue background", "a white square on a black background",
                      "a green triangle on a red background"]
EVAL_LOOP_ARGS = [
    "--mixed_precision", "no", "--eval_steps", "2", "--eval_fraction", "0.25", "--eval_timesteps", "4",
    "--validation_steps", "2", "--validation_prompts", "; ".join(VALIDATION_PROMPTS),
    "--validation_scheduler", "dpm-solver++", "--validation_num_inference_steps", "4",
    "--validation_guidance_scale", "4",
    # trained objective differs from the checkpoint scheduler's (epsilon): validation must sample with the trained one
    "--prediction_type", "v_prediction",
    # validation, eval and export then use the moving average (swapped in, no extra step compilation)
    "--use_ema", "--ema_decay", "0.9",
    # TensorBoard and wandb (offline: WANDB_MODE, set by conftest) get the metrics, images and config
    "--report_to", "all", "--tracker_project_name", "evalloop-project",
]

# The 4-device / 1-device pair (and the FSDP runs) train the clean latents (x0) with min-SNR, offset noise, input
# perturbation and an EMA (exported):
# the host-drawn offset and perturbation batches must be sharded like the rest for the two meshes to agree.
FP32_ARGS = [
    "--mixed_precision", "no", "--prediction_type", "sample", "--snr_gamma", "5.0", "--noise_offset", "0.1",
    "--input_perturbation", "0.1", "--use_ema", "--ema_decay", "0.9",
]

# The token of the session's loopback hub (tests/hub_server.py); tests grep every output of the bf16 run for it.
HUB_TOKEN = "hf_SessionLoopbackTokenNeverToBeWritten7"
HUB_REPO = "test-user/tiny-bf16"


# bf16 with warm-up + cosine to a final lr of 2.5e-6, where `1 - lr * weight_decay` rounds to 1.0f: with
# Python-float optimizer scalars that step compiled a third graph. The warm-up's first lr is 0, which torch_xla
# would make a graph constant if it came from a CPU tensor. A peak per chip makes the run report MFU on CPU,
# and diffusers' xformers flag asks for flash attention, which off TPU warns and keeps the standard attention.
BF16_ARGS = [
    "--mixed_precision", "bf16", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--learning_rate", "5e-5",
    # P2 weighting in the step graph (no extra compilation); the export is pushed to the loopback hub, with every
    # tracker on so that the token can be looked for in all of their files
    "--p2_gamma", "1.0", "--report_to", "all", "--push_to_hub", "--hub_model_id", HUB_REPO, "--hub_token", HUB_TOKEN,
    "--peak_tflops", "1", "--enable_xformers_memory_efficient_attention",
    # DREAM's extra no-grad UNet forward, in the same one step graph (epsilon: the tiny pipeline's scheduler)
    "--dream_training",
]
# The trainer with AdamW's state left to the first step: a real second compilation, for the bound's test.
UNPRIMED_SCRIPT = os.path.join(ROOT, "tests", "unprimed_trainer.py")


@dataclass
class TrainRuns:
    """The end-to-end runs of the session:

    - `fp32_4dev` / `fp32_1dev`: 3 fp32 steps, sample (x0) prediction + min-SNR + offset noise + input
      perturbation, same seed and data, on a 4-device and a 1-device mesh (the equivalence pair);
    - `bf16`: 10 bf16 steps on 4 devices with a warm-up + cosine lr schedule, P2 weighting and DREAM, logging
      every step, with MFU against a given peak and flash attention asked for, exported and pushed to the session's
      loopback hub (`hub_endpoint`) with TensorBoard and wandb on (compile count, MFU, export, push and token
      tests);
    - `fsdp_2x2` / `fsdp_1x4`: the fp32 runs' command with --fsdp_size 2 and 4 on the same 4 devices (UNet
      weights, gradients, AdamW moments and EMA sharded over the `fsdp` axis): the same losses and weights;
    - `bound`: bf16 with --max_compilations 1 in the trainer without optimizer priming
      (tests/unprimed_trainer.py), whose step 2 compiles a second graph: the bound must stop it there;
    - `evalloop`: 4 fp32 steps with an EMA of the weights, the validation loss (a quarter of the data held
      out) and validation samples (3 prompts: a padded batch) every 2 steps, reported to TensorBoard and wandb
      (in-loop evaluation, tracker and model card tests), replayed per tensor (--step_graph replay);
    - `evalloop_traced`: `evalloop` without trackers and with --step_graph trace (every step traced, while the
      other runs record steps 1-2 and replay the rest, here across the evaluation at step 2): the same losses,
      evaluations and weights;
    - `evalloop_flat`: `evalloop_traced` with --step_graph replay_flat (the default, as in the other runs) and a
      checkpoint at step 3: the state is unpacked from its flat buffers for the evaluation, the checkpoint and
      the export, and packed again.
    """

    pipeline: str
    data_dir: str
    root: str
    hub_endpoint: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    results: dict[str, Finished] = field(default_factory=dict)

    def out(self, name: str) -> str:
        return os.path.join(self.root, name)

    def log(self, name: str) -> str:
        return os.path.join(self.root, "logs", name)

    def common(self, name: str, steps: int) -> list[str]:
        return [
            "--pretrained_model_name_or_path", self.pipeline, "--train_data_dir", self.data_dir,
            "--resolution", "64", "--center_crop", "--train_batch_size", "8", "--max_train_steps", str(steps),
            "--logging_steps", "1", "--seed", "7", "--output_dir", self.out(name),
        ]

    def hlo_dump(self, name: str) -> str:
        """Where XLA dumps the compiled graphs of run `name` (the replayed runs `evalloop` and `evalloop_flat`)."""
        return os.path.join(self.root, name + "-hlo")

    def dump_env(self, name: str) -> dict[str, str]:
        from xla_diffusion.hlo import hlo_dump_flags

        return {"XLA_FLAGS": with_xla_flags(hlo_dump_flags(self.hlo_dump(name)))}

    def start_all(self) -> None:
        self.procs["fp32_4dev"] = start_cli(self.common("fp32_4dev", 3) + FP32_ARGS, self.log("fp32_4dev"), 4)
        self.procs["fp32_1dev"] = start_cli(self.common("fp32_1dev", 3) + FP32_ARGS, self.log("fp32_1dev"), 1)
        for name, fsdp in (("fsdp_2x2", "2"), ("fsdp_1x4", "4")):
            self.procs[name] = start_cli(self.common(name, 3) + FP32_ARGS + ["--fsdp_size", fsdp], self.log(name), 4)
        hub_env = {"HF_ENDPOINT": self.hub_endpoint, "HF_HUB_OFFLINE": "0"}  # the loopback hub only
        self.procs["bf16"] = start_cli(self.common("bf16", 10) + BF16_ARGS, self.log("bf16"), 4, env=hub_env)
        self.procs["bound"] = start_cli(
            self.common("bound", 4) + ["--mixed_precision", "bf16", "--max_compilations", "1"], self.log("bound"), 4,
            script=UNPRIMED_SCRIPT,
        )
        # per tensor: the other runs replay with the default flat state
        self.procs["evalloop"] = start_cli(self.common("evalloop", 4) + EVAL_LOOP_ARGS + ["--step_graph", "replay"],
                                           self.log("evalloop"), 4, env=self.dump_env("evalloop"))
        # the same run with the step traced every step (trackers off)
        traced_args = EVAL_LOOP_ARGS[:EVAL_LOOP_ARGS.index("--report_to")] + ["--step_graph", "trace"]
        self.procs["evalloop_traced"] = start_cli(self.common("evalloop_traced", 4) + traced_args,
                                                  self.log("evalloop_traced"), 4)
        # and with the state in flat buffers while replaying, unpacked for a checkpoint at step 3
        flat_args = traced_args[:-1] + ["replay_flat", "--checkpointing_steps", "3"]
        self.procs["evalloop_flat"] = start_cli(self.common("evalloop_flat", 4) + flat_args,
                                                self.log("evalloop_flat"), 4, env=self.dump_env("evalloop_flat"))

    def result(self, name: str) -> Finished:
        if name not in self.results:
            self.results[name] = finish(self.procs[name])
        return self.results[name]

    def succeeded(self, name: str) -> str:
        """Output folder of a run that must have succeeded (fails the test with its stderr otherwise)."""
        r = self.result(name)
        assert r.returncode == 0, f"run {name} failed ({r.returncode}):\n{r.stderr[-4000:]}"
        return self.out(name)

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
