"""Plots the notebooks show: loss curves, expert load, routing maps. Each returns its matplotlib Axes
so a notebook can add to it; every axis is labelled."""
from __future__ import annotations

from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from moe_lab.core import backends
from moe_lab.studies.bench_records import ok_results, record_label
from moe_lab.studies.profiling import ridge_point, roofline


def _axes(ax, figsize=(6, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_loss_curves(histories: dict, x: str = "step", ax=None, title: Optional[str] = None, train: bool = True):
    """Validation (solid) and smoothed training (faint) loss of several runs, per step or per second."""
    if x not in ("step", "time"):
        raise ValueError(f"x={x!r}: expected 'step' or 'time'")
    ax = _axes(ax)
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        if train and h.train_loss:
            xs = h.step if x == "step" else h.time
            k = max(1, len(h.train_loss) // 50)
            smooth = np.convolve(h.train_loss, np.ones(k) / k, mode="valid")
            ax.plot(xs[k - 1:], smooth, color=color, alpha=0.3, lw=1, label=f"{name}, training batches (smoothed)")
        ex = h.eval_step if x == "step" else h.eval_time
        ax.plot(ex, h.val_loss, color=color, marker="o", ms=3, label=f"{name} (val {h.final_val_loss:.3f})")
    ax.set_xlabel("optimiser step" if x == "step" else "training time (s)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or f"loss per {'step' if x == 'step' else 'second'}")
    ax.legend(fontsize=8)
    return ax


def load_fractions(load) -> torch.Tensor:
    """A (rows, E) load matrix (or one row) as fractions of each row's total."""
    load = torch.as_tensor(load).float()
    if load.dim() == 1:
        load = load[None]
    return load / load.sum(-1, keepdim=True).clamp_min(1)


def plot_expert_load(load, ax=None, title: str = "tokens per expert", ylabels: Optional[Sequence[str]] = None,
                     vmax: Optional[float] = None):
    """Heat map of a (rows, E) load matrix (rows = layers or steps), each row as a fraction of its total.
    Rows are labelled by their index (layer 0, 1, ...) unless ylabels are given. Give panels that are to be
    compared the same vmax (e.g. the largest fraction over all of them): one colour, one share."""
    frac = load_fractions(load).numpy()
    ax = _axes(ax, figsize=(6, 0.4 * len(frac) + 1.5))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer" if ylabels is None else "")
    ax.set_xticks(range(frac.shape[1]))
    ax.set_yticks(range(len(frac)), labels=list(ylabels) if ylabels is not None else [str(i) for i in range(len(frac))])
    ax.set_title(title)
    plt.colorbar(im, ax=ax, label="fraction of assignments")
    return ax


def plot_load_over_time(history, layer: int = 0, ax=None, title: Optional[str] = None):
    """How one layer's expert load evolves during training: steps x experts, as fractions."""
    if not history.load:
        raise ValueError("this history has no expert load: was the model an MoE?")
    load = torch.stack([l[layer] for l in history.load]).float()  # (steps, E)
    frac = (load / load.sum(-1, keepdim=True)).numpy()
    ax = _axes(ax, figsize=(6, 3))
    im = ax.imshow(frac.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("expert")
    ax.set_title(title or f"layer {layer}: share of assignments per expert")
    plt.colorbar(im, ax=ax, label="share of assignments")
    return ax


def plot_balance_comparison(histories: dict, layer: int = 0):
    """Notebook 04: one layer's load over time for each run (one panel each, with its colour bar),
    then the imbalance of every run in a last panel. Constrained layout gives each colour bar's
    label its own room, clear of the next panel's axis label. Returns the figure."""
    fig, axes = plt.subplots(1, len(histories) + 1, figsize=(5 * (len(histories) + 1), 3.5), layout="constrained")
    for ax, (name, h) in zip(axes, histories.items()):
        plot_load_over_time(h, layer=layer, ax=ax, title=f"layer {layer}, {name}")
    for name, h in histories.items():
        axes[-1].plot(imbalance_curve(h), label=name, alpha=0.8)
    axes[-1].set_xlabel("optimiser step")
    axes[-1].set_ylabel("max load / mean load")
    axes[-1].set_title("imbalance (1 = perfect)")
    axes[-1].legend(fontsize=8)
    return fig


def imbalance_curve(history, layer: Optional[int] = None) -> np.ndarray:
    """max/mean expert load per step (averaged over layers unless one is given): 1 = perfect balance."""
    load = torch.stack(history.load).float()  # (steps, layers, E)
    ratio = load.max(-1).values / load.mean(-1).clamp_min(1e-9)  # (steps, layers)
    return (ratio.mean(-1) if layer is None else ratio[:, layer]).numpy()


def plot_routing_map(expert_idx, n_experts: int, tokens: Optional[Sequence[str]] = None, ax=None,
                     title: str = "which experts each token chose"):
    """Tokens (columns) x experts (rows): filled where the token was routed to the expert."""
    idx = torch.as_tensor(expert_idx)
    grid = np.zeros((n_experts, idx.shape[0]))
    for t in range(idx.shape[0]):
        for j, e in enumerate(idx[t].tolist()):
            if e >= 0:
                grid[e, t] = 1.0 if j == 0 else 0.6  # first choice darker
    ax = _axes(ax, figsize=(max(6, 0.25 * idx.shape[0]), 2.5))
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_ylabel("expert")
    ax.set_xlabel("token")
    if tokens is not None:
        ax.set_xticks(range(len(tokens)), labels=[repr(t)[1:-1] for t in tokens], fontsize=7)
    ax.set_title(title)
    return ax


def plot_roofline(peak_flops: float, bandwidth: float, points: Sequence[dict] = (), ax=None, title: Optional[str] = None,
                  unit: str = "TFLOP/s", roof_label: str = "measured roofline", intensity_range=None, **line_kw):
    """Roofline (Williams et al. 2009), log-log: attainable FLOP/s = min(peak, intensity * bandwidth).

    peak_flops in FLOP/s, bandwidth in bytes/s. points: dicts with "intensity" (FLOP/byte), "flops"
    (achieved FLOP/s), "label" and optionally "marker"/"color". unit: "TFLOP/s" or "GFLOP/s".
    Call again with the same ax to draw a second roof (e.g. a recorded GPU beside this CPU)."""
    scale = {"TFLOP/s": 1e12, "GFLOP/s": 1e9}.get(unit)
    if scale is None:
        raise ValueError(f"unit={unit!r}: expected 'TFLOP/s' or 'GFLOP/s'")
    ax = _axes(ax, figsize=(6.5, 4))
    ridge = ridge_point(peak_flops, bandwidth)
    lo, hi = intensity_range or (ridge / 100, ridge * 100)
    for p in points:
        lo, hi = min(lo, p["intensity"] / 2), max(hi, p["intensity"] * 2)
    xs = np.geomspace(lo, hi, 200)
    line = ax.plot(xs, roofline(xs, peak_flops, bandwidth) / scale, label=f"{roof_label} (ridge {ridge:.3g} FLOP/B)",
                   **{"color": "k", "lw": 1.5, **line_kw})[0]
    ax.axvline(ridge, color=line.get_color(), ls=":", lw=0.8)
    for i, p in enumerate(points):
        ax.scatter(p["intensity"], p["flops"] / scale, marker=p.get("marker", "o"), color=p.get("color", f"C{i % 10}"),
                   label=p["label"], zorder=3, s=p.get("size", 30))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel(f"attained {unit}")
    ax.set_title(title or "roofline")
    ax.legend(fontsize=8)
    return ax


def plot_bench_tokens(record: dict, shape: str, mode: str = "forward", ax=None, metric: str = "tflops"):
    """A bench record (data/bench/*.json): `metric` ("tflops" or "gbps") against tokens for each
    back-end, log-log, titled with the device and date it was recorded on."""
    if metric not in ("tflops", "gbps"):
        raise ValueError(f"metric={metric!r}: expected 'tflops' or 'gbps'")
    rows = ok_results(record, shape=shape, **{"pass": mode})
    if not rows:
        raise ValueError(f"the record from {record.get('device')} has no successful {mode} results for shape={shape!r}")
    ax = _axes(ax, figsize=(6.5, 3.8))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["tokens"], r[metric]) for r in rows if r["backend"] == backend)
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", ms=3, color=backend_color(backend), label=backend,
                ls="--" if backend == DENSE else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("TFLOP/s" if metric == "tflops" else "GB/s (weights + activations)")
    ax.set_title(f"{shape}, {mode}:\n{record_label(record)}", fontsize=9)  # two lines: panels side by side stay apart
    ax.legend(fontsize=7)
    return ax


DENSE = "dense"  # the bench's dense baseline (cuBLAS at equal FLOPs): not an expert back-end


def backend_marker(backend: str) -> str:
    """The back-end's plot marker (moe_lab.core.backends), "o" for the dense baseline or an unknown name."""
    return backends.facts(backend).marker if backend in backends.names(functions_only=False) else "o"


def backend_color(backend: str) -> str:
    """One colour per back-end in every bench plot (C9 for a name the course does not know)."""
    order = list(backends.names(functions_only=False)) + [DENSE]
    return f"C{order.index(backend)}" if backend in order else "C9"


SHAPE_MARKERS = {"tiny": "o", "teaching": "s", "fine": "*", "mixtral": "^"}


def bench_points(rows, with_tokens: bool = True, color: Optional[str] = None) -> list[dict]:
    """Roofline points (see plot_roofline) of successful bench rows: intensity and attained FLOP/s.
    Colour = back-end; marker = back-end when the rows hold one layer, the layer when they hold
    several (so no two series share a symbol). `color` overrides the colours (live points drawn grey
    beside recorded ones)."""
    ok = [r for r in rows if r["status"] == "ok"]
    several = len({r["shape"] for r in ok}) > 1
    return [dict(label=f"{r['backend']}, {r['shape']} T={r['tokens']}" if with_tokens else r["backend"],
                 intensity=r["intensity"], flops=r["flops"] / (r["ms"] * 1e-3),
                 marker=SHAPE_MARKERS.get(r["shape"], "P") if several else backend_marker(r["backend"]),
                 color=color or backend_color(r["backend"]), size=60 if several else 30)
            for r in ok]


def plot_bench_record(record: dict, shape: Optional[str] = None, live_rows=(), live_ceilings=None):
    """A recorded bench file in three panels: TFLOP/s against tokens (forward, forward+backward), and
    its roofline with the points at its largest token count; `live_rows` measured here (with their
    `live_ceilings`, a profiling.Ceilings) are drawn on the same roofline, in grey, for comparison.
    Every panel names the device and date of the recording. Returns the figure."""
    if shape is None:
        shape = "fine" if ok_results(record, shape="fine") else record["results"][0]["shape"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, mode in zip(axes[:2], ("forward", "forward+backward")):
        if ok_results(record, shape=shape, **{"pass": mode}):
            plot_bench_tokens(record, shape, mode, ax=ax)
        else:
            ax.set_axis_off()
            ax.set_title(f"{shape}, {mode}: not in this record", fontsize=9)
    c = record.get("ceilings") or {}
    fwd = ok_results(record, shape=shape, **{"pass": "forward"})
    if c and fwd:
        most = max(r["tokens"] for r in fwd)
        plot_roofline(c["peak_flops"], c["bandwidth"], bench_points([r for r in fwd if r["tokens"] == most], False),
                      ax=axes[2], roof_label=record_label(record), title=f"{shape}, forward, {most} tokens")
    else:
        axes[2].set_axis_off()
        axes[2].set_title("no ceilings or forward results in this record", fontsize=9)
    live = [r for r in live_rows if r["status"] == "ok"]
    if live and live_ceilings is not None and axes[2].axison:
        plot_roofline(live_ceilings.peak_flops, live_ceilings.bandwidth, bench_points(live, color="0.6"), ax=axes[2],
                      roof_label=f"live here: {live_ceilings.device[:32]}", title=axes[2].get_title(), color="0.6")
    if axes[2].axison:  # the roofline's legend beside it, so that no point or roof hides under it
        axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_backend_times(rows, ax=None, title: Optional[str] = None):
    """Bench rows (moe_lab.studies.bench.run) as bars: milliseconds per back-end, one bar per pass, with the
    layer, tokens and dtype in the title. Rows that did not run are left out. Returns the axes."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise ValueError("no successful bench rows to plot")
    ax = _axes(ax, figsize=(6.5, 3.2))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    passes = list(dict.fromkeys(r["pass"] for r in ok))
    width = 0.8 / len(passes)
    for i, mode in enumerate(passes):
        ms = [next((r["ms"] for r in ok if r["backend"] == b and r["pass"] == mode), float("nan")) for b in backends]
        ax.bar([j + (i - (len(passes) - 1) / 2) * width for j in range(len(backends))], ms, width=width, label=mode)
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("ms per call (median)")
    r0 = ok[0]
    ax.set_title(title or f"{r0['shape']} layer, {r0['tokens']} tokens, E={r0['n_experts']}, top-{r0['top_k']}, "
                          f"{r0['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    return ax


def plot_moe_layout(expert_idx, align, n_experts: int):
    """The block-aligned layout of notebook 06 in three panels: (a) which expert each token chose, in
    which slot j (dropped in grey); (b) the sorted, padded rows (sorted_ids), a line at each block
    boundary; (c) the expert each block of rows runs (block_expert). CPU tensors. Returns the figure."""
    T, k = expert_idx.shape
    A = align.n_assignments
    colors = plt.cm.tab10.colors
    fig, axes = plt.subplots(1, 3, figsize=(12, 6.5), gridspec_kw=dict(width_ratios=[n_experts + 1, 2.2, 1.3]))
    ax = axes[0]  # (a) tokens x experts
    for t in range(T):
        for j in range(k):
            e = int(expert_idx[t, j])
            col = n_experts if e < 0 else e
            ax.add_patch(plt.Rectangle((col, t), 1, 1, color="0.85" if e < 0 else colors[e], alpha=1.0 if j == 0 else 0.5))
            ax.text(col + 0.5, t + 0.5, f"a={t * k + j}\nj={j}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, n_experts + 1)
    ax.set_ylim(T, 0)
    ax.set_xticks([i + 0.5 for i in range(n_experts + 1)], [f"e{i}" for i in range(n_experts)] + ["dropped"])
    ax.set_yticks([t + 0.5 for t in range(T)], range(T))
    ax.set_xlabel("expert")
    ax.set_ylabel("token t")
    ax.set_title("(a) routing: tokens × experts")
    ax = axes[1]  # (b) sorted, block-padded rows
    ids = align.sorted_ids.tolist()
    blocks = align.block_expert.tolist()
    for r, a in enumerate(ids):
        e = blocks[r // align.block_m]
        real = a < A
        ax.add_patch(plt.Rectangle((0, r), 1, 1, color=colors[e] if real else "0.92", ec="white", lw=0.5))
        label = f"a={a} (t={a // k})" if real else (f"pad: {a}" if e >= 0 else f"unused: {a}")
        ax.text(0.5, r + 0.5, label, ha="center", va="center", fontsize=7)
    for b in range(len(blocks) + 1):
        ax.axhline(b * align.block_m, color="k", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(len(ids), 0)
    ax.set_xticks([])
    ax.set_ylabel("sorted row r")
    ax.set_title(f"(b) sorted_ids\n(block_m={align.block_m}, sentinel {A})")
    ax = axes[2]  # (c) expert of each block
    for b, e in enumerate(blocks):
        ax.add_patch(plt.Rectangle((0, b * align.block_m), 1, align.block_m, color=colors[e] if e >= 0 else "0.92", ec="k"))
        ax.text(0.5, (b + 0.5) * align.block_m, f"block {b}\nexpert {e}", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(len(ids), 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("(c) block_expert")
    fig.tight_layout()
    return fig


SEED_STYLES = ("-", "--", ":", "-.")  # one line style per seed of a recorded study, in the order of its seeds


def plot_mla_record(record: dict, ax=None, ylim=(0.6, 2.3)):
    """Notebook 10's recorded MLA-vs-MHA study: one colour per attention (MHA C0, MLA C1), one line style per
    seed, each line labelled with its seed, final validation loss and held-out exact match, so a seed the
    prose discusses can be found in the picture."""
    ax = _axes(ax, figsize=(6.5, 3.8))
    seeds = list(record["seeds"])
    if len(seeds) > len(SEED_STYLES):
        raise ValueError(f"plot_mla_record: record['seeds']={seeds}: at most {len(SEED_STYLES)} seeds get their own line style")
    for name, color in (("mha", "C0"), ("mla", "C1")):
        for run in record["runs"][name]:
            style = SEED_STYLES[seeds.index(run["seed"])]
            ax.plot(run["eval_step"], run["val_loss"], color=color, ls=style, lw=1.3,
                    label=f"{name.upper()} seed {run['seed']}: {run['val_loss'][-1]:.3f}, "
                          f"exact match {run['heldout_exact_match']:.0%}")
    ax.set(xlabel="step", ylabel="validation loss", ylim=ylim,
           title=f"recorded: {record['preset']} preset, {record['steps']} steps, seeds {seeds}")
    ax.legend(fontsize=7, ncol=2, loc="upper right", title="final loss, held-out exact match", title_fontsize=7)
    return ax
