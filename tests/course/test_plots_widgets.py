"""The router explorer's logic, imbalance arithmetic, and that every plot labels its axes.

Run: MPLBACKEND=Agg .venv/bin/python -m pytest tests/course/test_plots_widgets.py -q
"""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_lab.course import plots  # noqa: E402
from moe_lab.training.loop import History  # noqa: E402
from moe_lab.course.widgets import explore_routing, router_explorer  # noqa: E402


def test_skew_concentrates_load_and_bias_spreads_it():
    even = explore_routing(skew=0.0)
    skewed = explore_routing(skew=3.0, router="sigmoid")
    balanced = explore_routing(skew=3.0, router="sigmoid", bias_steps=200, bias_rate=0.01)
    assert int(even["load"].sum()) == 256 * 2 and even["dropped"] == 0
    assert skewed["imbalance"] > even["imbalance"]
    assert int(skewed["load"].argmax()) == 0  # the favourite is expert 0
    assert balanced["imbalance"] < skewed["imbalance"] - 0.5
    assert balanced["bias"][0] < 0 < balanced["bias"][1:].max()


def test_capacity_caps_every_expert_and_counts_drops():
    res = explore_routing(skew=3.0, capacity_factor=1.0)
    assert res["capacity"] == 64  # ceil(1.0 * 256 * 2 / 8)
    assert int(res["load"].max()) <= 64
    assert int(res["load"].sum()) + res["dropped"] == 256 * 2 and res["dropped"] > 0


def test_router_explorer_is_a_widget_over_the_function():
    w = router_explorer()
    assert {c.description for c in w.children if hasattr(c, "description")} >= {"experts", "top-k", "router", "skew"}
    plt.close("all")


def make_history(steps=20, layers=2, E=4):
    h = History()
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        h.step.append(s)
        h.train_loss.append(2.0 - s * 0.05)
        h.time.append(0.1 * (s + 1))
        h.lr.append(1e-3)
        h.load.append(torch.randint(1, 10, (layers, E), generator=g))
        if (s + 1) % 5 == 0:
            h.eval_step.append(s + 1)
            h.eval_time.append(0.1 * (s + 1))
            h.val_loss.append(2.0 - s * 0.04)
    return h


def test_imbalance_curve_is_max_over_mean():
    h = make_history()
    curve = plots.imbalance_curve(h, layer=1)
    load = torch.stack(h.load).float()[:, 1]
    np.testing.assert_allclose(curve, (load.max(-1).values / load.mean(-1)).numpy(), rtol=1e-6)
    assert (plots.imbalance_curve(h) >= 1).all()


@pytest.mark.parametrize("draw", [
    lambda h: plots.plot_loss_curves({"a": h, "b": h}, x="step"),
    lambda h: plots.plot_loss_curves({"a": h}, x="time"),
    lambda h: plots.plot_expert_load(torch.stack(h.load).sum(0)),
    lambda h: plots.plot_load_over_time(h, layer=1),
    lambda h: plots.plot_routing_map(torch.tensor([[0, 1], [2, -1], [3, 0]]), 4, tokens=list("ab\n")),
])
def test_plots_label_their_axes(draw):
    ax = draw(make_history())
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    plt.close("all")


def test_expert_load_heat_maps_tick_whole_layers_and_share_a_colour_scale():
    """Notebook 04 compares two panels: their rows are layers 0, 1 (no -0.5 ... 1.5 ticks), and one vmax
    gives both one colour scale (otherwise the balanced panel's own maximum would look as hot)."""
    ax = plots.plot_expert_load(torch.tensor([[3.0, 1.0], [1.0, 1.0]]), vmax=0.9)
    assert list(ax.get_yticks()) == [0, 1] and [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    assert ax.images[0].get_clim() == (0, 0.9)
    np.testing.assert_allclose(plots.load_fractions(torch.tensor([3.0, 1.0])).numpy(), [[0.75, 0.25]])
    plt.close("all")


def test_plot_errors_are_clear():
    with pytest.raises(ValueError, match="x='epoch'"):
        plots.plot_loss_curves({}, x="epoch")
    with pytest.raises(ValueError, match="no expert load"):
        plots.plot_load_over_time(History())


def test_backend_times_plot_labels_every_bar():
    rows = [dict(shape="teaching", tokens=128, n_experts=16, top_k=2, dtype="bfloat16", backend=b, status="ok", ms=ms,
                 **{"pass": p}) for b, p, ms in [("sorted", "forward", 2.0), ("triton", "forward", 0.5),
                                                 ("sorted", "forward+backward", 6.0), ("triton", "forward+backward", 1.5)]]
    rows.append(dict(rows[0], backend="grouped_mm", status="skipped", ms=None))
    ax = plots.plot_backend_times(rows)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sorted", "triton"]
    assert sorted(p.get_height() for p in ax.patches) == [0.5, 1.5, 2.0, 6.0]
    assert ax.get_ylabel() and "teaching" in ax.get_title()
    with pytest.raises(ValueError, match="no successful"):
        plots.plot_backend_times(rows[-1:])


def test_loss_curves_legend_names_every_line():
    """The faint smoothed training losses are in the legend too, not only the validation curves."""
    ax = plots.plot_loss_curves({"dense": make_history(), "moe": make_history()}, x="step")
    lines = [line.get_label() for line in ax.get_lines()]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(lines) == 4 and all(not label.startswith("_") for label in lines), lines
    assert legend == lines
    plt.close("all")


def _label_boxes(fig):
    """Window extents of every axis label (x and y) of every axes of fig, colour bars included."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        for label in (ax.xaxis.label, ax.yaxis.label):
            if label.get_text():
                boxes.append((label.get_text(), label.get_window_extent(renderer)))
    return boxes


def test_balance_comparison_keeps_colour_bar_labels_clear_of_the_next_panel():
    """Notebook 04's load figure: each colour bar's label must not sit on the next panel's axis label."""
    h = make_history(steps=60)
    fig = plots.plot_balance_comparison({"no balancing": h, "aux-loss-free bias": h}, layer=0)
    boxes = _label_boxes(fig)
    assert sum(text == "share of assignments" for text, _ in boxes) == 2  # two colour bars, labelled
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1:]:
            assert not a.overlaps(b), f"{text_a!r} overlaps {text_b!r}"
    plt.close("all")


@pytest.mark.parametrize("make", [router_explorer], ids=["router_explorer"])
def test_explorer_labels_are_not_cut(make):
    """ipywidgets cuts a description longer than its default label width ("capacity (…"): a long one
    must ask for the room it needs (style description_width="initial")."""
    w = make()
    controls = [c for c in w.children if getattr(c, "description", "")]
    assert controls
    for c in controls:
        assert len(c.description) <= 10 or c.style.description_width == "initial", c.description
    plt.close("all")


def test_the_layout_picture_has_its_three_panels():
    from moe_lab.kernels.moe_routing import moe_align

    idx = torch.tensor([[2, 0], [0, 1], [2, -1]])
    fig = plots.plot_moe_layout(idx, moe_align(idx, 3, 4), 3)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 3 and titles[0].startswith("(a)") and "block_m=4" in titles[1] and titles[2] == "(c) block_expert"
    plt.close("all")


def test_source_of_unwraps_a_triton_kernel():
    from moe_lab.kernels import moe_gemm
    from moe_lab.course.widgets import source_of

    assert source_of(moe_gemm.moe_up_kernel).lstrip().startswith("@triton.jit") or "def moe_up_kernel" in source_of(moe_gemm.moe_up_kernel)
    assert "def moe_up_kernel" in source_of(moe_gemm.moe_up_kernel)
    with pytest.raises(TypeError, match="not a function"):
        source_of(42)
