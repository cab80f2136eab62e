"""The README's flag table is the one generated from TrainConfig (xla_diffusion/config_docs.py)."""

import dataclasses
import os

from xla_diffusion.config import TrainConfig
from xla_diffusion.config_docs import BEGIN, END, flag_groups, render_flag_table, replace_table

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_table_is_the_generated_one():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert replace_table(text, render_flag_table()) == text, (
        "README.md's flag table is out of date: run `python -m xla_diffusion.config_docs --write README.md`")


def test_every_flag_is_in_exactly_one_group_in_declaration_order():
    groups = flag_groups()
    listed = [f.name for _, members in groups for f in members]
    assert listed != [] and sorted(listed) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(listed) == len(set(listed))
    titles = [title for title, _ in groups]
    assert len(titles) == len(set(titles)) and "other" not in titles
    assert titles[:3] == ["model", "data", "optimisation"]
    # a later section with an earlier title joins that group (the objective options sit with optimisation)
    optimisation = [f.name for f in dict(groups)["optimisation"]]
    assert {"snr_gamma", "noise_offset", "p2_gamma", "num_train_epochs", "scale_lr"} <= set(optimisation)


def test_rows_show_default_choices_and_help():
    table = render_flag_table()
    assert "| `--pretrained_model_name_or_path` | required |" in table
    assert "| `--report_to` | `tensorboard` |" in table and "| `--push_to_hub` | off |" in table
    assert "Choices: `epsilon`, `v_prediction`, `sample`." in table
    assert "#### Trackers" in table and "#### Hub" in table


def test_replace_table_needs_the_markers():
    import pytest

    with pytest.raises(ValueError, match="markers"):
        replace_table("no markers here", "x")
    assert replace_table(f"a\n{BEGIN}\nold\n{END}\nb", "new\n") == f"a\n{BEGIN}\n\nnew\n\n{END}\nb"
