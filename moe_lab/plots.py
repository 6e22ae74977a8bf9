"""Plots the notebooks show: loss curves, expert load, routing maps. Each returns its matplotlib Axes
so a notebook can add to it; every axis is labelled."""
from __future__ import annotations

from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


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
            ax.plot(xs[k - 1:], smooth, color=color, alpha=0.3, lw=1)
        ex = h.eval_step if x == "step" else h.eval_time
        ax.plot(ex, h.val_loss, color=color, marker="o", ms=3, label=f"{name} (val {h.final_val_loss:.3f})")
    ax.set_xlabel("optimiser step" if x == "step" else "training time (s)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or f"loss per {'step' if x == 'step' else 'second'}")
    ax.legend()
    return ax


def plot_expert_load(load, ax=None, title: str = "tokens per expert", ylabels: Optional[Sequence[str]] = None):
    """Heat map of a (rows, E) load matrix (rows = layers or steps), each row as a fraction of its total."""
    load = torch.as_tensor(load).float()
    if load.dim() == 1:
        load = load[None]
    frac = (load / load.sum(-1, keepdim=True).clamp_min(1)).numpy()
    ax = _axes(ax, figsize=(6, 0.4 * len(frac) + 1.5))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer" if ylabels is None else "")
    ax.set_xticks(range(frac.shape[1]))
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), labels=list(ylabels))
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
    plt.colorbar(im, ax=ax, label="fraction")
    return ax


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
