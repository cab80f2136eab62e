"""Bad input: one clear `error:` line and a non-zero exit, never a traceback. The four runs start
together (each pays a Python + torch_xla start-up, none compiles a step)."""

import os

import pytest

from tests.helpers import finish, start_cli

pytestmark = pytest.mark.slow  # four trainer processes (each a Python + torch_xla start-up)


@pytest.fixture(scope="module")
def error_runs(tiny_pipeline, shapes_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("error_logs")
    data = os.path.join(shapes_dir, "train")

    def args(**over):
        a = {"pretrained_model_name_or_path": tiny_pipeline, "train_data_dir": data, "resolution": "64",
             "train_batch_size": "8", "max_train_steps": "2", "output_dir": str(logs / "out")}
        a.update(over)
        return [x for k, v in a.items() for x in (f"--{k}", v)]

    cases = {
        "missing_model": args(pretrained_model_name_or_path=str(logs / "no_such_model")),
        "bad_prediction_type": args(prediction_type="x0"),
        "batch_not_divisible": args(train_batch_size="6"),
        "missing_caption_column": args(caption_column="caption"),
    }
    procs = {name: start_cli(a, str(logs / name), num_devices=4) for name, a in cases.items()}
    return {name: finish(p, timeout=600) for name, p in procs.items()}


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing_model", "no_such_model"),
        ("bad_prediction_type", "--prediction_type"),
        ("batch_not_divisible", "not divisible by the 4 data-parallel devices"),
        ("missing_caption_column", "--caption_column 'caption' is not a column"),
    ],
)
def test_bad_input_gives_one_error_line(error_runs, case, needle):
    r = error_runs[case]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    error_lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, r.stderr[-2000:]
    assert needle in error_lines[0]
    assert r.stderr.strip().splitlines()[-1] == error_lines[0]
