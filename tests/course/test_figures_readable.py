"""The figures of notebooks 06 and 07 show what their labels say: the padding figure draws the block
lines its axis mentions, over the bars; the recorded roofline keeps its legend beside the axes, so
that no roof or point hides under it.

Run: .venv/bin/python -m pytest tests/course/test_figures_readable.py -q
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moe_lab.course import plots, tiling  # noqa: E402
from moe_lab.studies import bench_records  # noqa: E402


def test_the_padding_figure_draws_the_block_lines_its_label_mentions():
    g = tiling.grouped_gemm_tiling([5, 3, 5, 0], block_m=4, k=8, n=8)
    ax = tiling.plot_moe_padding(g)
    assert "block boundaries" in ax.get_xlabel()
    assert sorted(float(line.get_xdata()[0]) for line in ax.lines) == [4.0, 8.0]
    assert min(line.get_zorder() for line in ax.lines) > max(p.get_zorder() for p in ax.patches)  # drawn over the bars
    plt.close("all")


def test_the_recorded_roofline_keeps_its_legend_beside_the_axes():
    rec = bench_records.load_bench_records()[0]  # the committed GPU record
    fig = plots.plot_bench_record(rec)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    roof = fig.axes[2]
    assert roof.get_legend() is not None
    assert roof.get_legend().get_window_extent(renderer).x0 >= roof.get_window_extent(renderer).x1
    left, middle = fig.axes[0].get_window_extent(renderer), fig.axes[1].get_window_extent(renderer)
    title = fig.axes[0].title.get_window_extent(renderer)
    assert title.x1 <= middle.x0 + 1, "the first panel's title runs into the second panel"
    plt.close("all")
