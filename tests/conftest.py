"""Test session set-up: a real 4-device CPU mesh, no network, and shared fixtures.

The environment is fixed here, at import, before anything can start torch_xla's runtime: the device
count is read once per process.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ["PJRT_DEVICE"] = "CPU"
os.environ["CPU_NUM_DEVICES"] = "4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
# gcsfs reads this at import: without it the first bucket access stalls on a gRPC probe (GCS emulator tests).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset imports albumentations, which phones home
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "xla_diffusion_test_hf_home"))
# Tests compile many small graphs and run few steps of each: LLVM at -O0 in XLA's CPU backend generates their code
# about 2x faster (one tiny-UNet CLI run of 3 steps: 66 -> 29 s of CPU) and runs it about 1.9x slower. The HLO,
# its shardings, collectives, buffer assignment and compile counts are those of the default level; numbers can
# differ in the last bits (contracted multiply-adds), and every comparison here is between runs of this session
# or within a tolerance. A level already in XLA_FLAGS is kept. Subprocesses inherit it (tests/helpers.py).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from tests.helpers import HUB_TOKEN, TrainRuns  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    """The session's XLA flags head the log: they set how its graphs are compiled (see above)."""
    return f"XLA_FLAGS: {os.environ['XLA_FLAGS']}"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> str:
    """A tiny Stable Diffusion pipeline folder (built offline, seed 0)."""
    from xla_diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipeline"), seed=0)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """64 synthetic 64 px shape images in imagefolder layout, under `<dir>/train`."""
    from data_prep.synthetic import write_shapes_dataset

    out = str(tmp_path_factory.mktemp("shapes"))
    write_shapes_dataset(out, num_images=64, resolution=64, seed=0)
    return out


@pytest.fixture(scope="session")
def session_hub():
    """A loopback stand-in for the HF hub (tests/hub_server.py) that the session's bf16 run pushes to."""
    from tests.hub_server import HubServer

    with HubServer(HUB_TOKEN) as server:
        yield server


@pytest.fixture(scope="session")
def train_runs(tiny_pipeline, shapes_dir, session_hub, tmp_path_factory) -> TrainRuns:
    """The session's end-to-end trainer runs, started together (each compiles ~2 graphs of ~25 s, so they
    share the two cores instead of queueing) and shared by every test that inspects them."""
    runs = TrainRuns(tiny_pipeline, os.path.join(shapes_dir, "train"), str(tmp_path_factory.mktemp("runs")),
                     session_hub.endpoint)
    runs.start_all()
    yield runs
    runs.kill_all()


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on loopback for every gs:// test (STORAGE_EMULATOR_HOST is set for this process and
    the processes it starts); it stops with the session."""
    from tests.gcs_emulator import start_emulator

    emulator = start_emulator()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def single_thread_torch():
    """Eager CPU work on one intra-op thread for a test module: the suite's trainer subprocesses keep both
    cores busy, and two spinning OpenMP threads per process then run ~10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
