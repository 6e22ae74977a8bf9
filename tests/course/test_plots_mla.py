"""Notebook 10's recorded MLA-vs-MHA panel tells its seeds apart: the prose discusses one of them (the
seed where MHA never learned the carries), so each seed needs its own line style and label.

Run: .venv/bin/python -m pytest tests/course/test_plots_mla.py -q
"""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from moe_lab.course import plots  # noqa: E402
from moe_lab.studies.mla_study import load_record  # noqa: E402


def fake_record(seeds=(0, 1, 2)):
    def run(seed, last, em):
        return {"seed": seed, "eval_step": [0, 50, 100], "val_loss": [2.0, 1.5, last], "heldout_exact_match": em}
    return {"preset": "cpu", "steps": 100, "seeds": list(seeds),
            "runs": {"mha": [run(s, 1.0 + s / 10, 0.9) for s in seeds], "mla": [run(s, 1.1 + s / 10, 0.1 * s) for s in seeds]}}


def test_each_model_and_seed_gets_its_own_line_and_label():
    ax = plots.plot_mla_record(fake_record())
    lines = ax.get_lines()
    assert len(lines) == 6
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 6  # no two lines look alike
    assert {line.get_linestyle() for line in lines if line.get_color() == lines[0].get_color()} == {"-", "--", ":"}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "MHA seed 1: 1.100, exact match 90%" in labels and "MLA seed 2: 1.300, exact match 20%" in labels
    assert ax.get_xlabel() and ax.get_ylabel()
    plt.close("all")


def test_more_seeds_than_line_styles_is_refused_by_name():
    with pytest.raises(ValueError, match=r"record\['seeds'\]=\[0, 1, 2, 3, 4\]: at most 4"):
        plots.plot_mla_record(fake_record(seeds=range(5)))


def test_the_shipped_record_draws_with_its_seeds_told_apart():
    record = load_record("cpu")
    if record is None:
        pytest.skip("no recorded MLA study in this installation")
    ax = plots.plot_mla_record(record)
    assert len({(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}) == 2 * len(record["seeds"])
    plt.close("all")
