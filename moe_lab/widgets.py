"""Interactive explorers: thin ipywidgets layers over plain functions that tests call directly.

`explore_routing` is the router explorer of notebook 03: given how strongly tokens prefer one
expert, top-k, the router type, a balancing bias and a capacity factor, it routes a batch of
random tokens and reports where they went.
"""
from __future__ import annotations

from typing import Optional

import torch

from moe_lab.config import MoEConfig
from moe_lab.model.router import Router, expert_capacity


def explore_routing(n_tokens: int = 256, n_experts: int = 8, top_k: int = 2, router: str = "softmax",
                    skew: float = 0.0, bias_steps: int = 0, bias_rate: float = 0.01,
                    capacity_factor: Optional[float] = None, seed: int = 0) -> dict:
    """Route n_tokens random tokens and report the load per expert.

    skew: how much every token's logit for expert 0 is raised (0 = no favourite).
    bias_steps: how many DeepSeek-V3 aux-loss-free bias updates to apply first (on the same tokens).
    Returns load (E,), dropped, imbalance (max/mean), bias (E,) and the routing itself.
    """
    cfg = MoEConfig(n_experts=n_experts, top_k=top_k, d_expert=4, router=router,
                    balance="aux_free" if bias_steps else "none", bias_update_rate=bias_rate,
                    capacity_factor=capacity_factor)
    g = torch.Generator().manual_seed(seed)
    d = 16
    r = Router(d, cfg)
    with torch.no_grad():
        r.gate.weight.copy_(torch.randn(n_experts, d, generator=g) / d**0.5)
    x = torch.randn(n_tokens, d, generator=g)
    x[:, 0] = 1.0  # a constant feature ...
    with torch.no_grad():
        r.gate.weight[:, 0] = 0.0
        r.gate.weight[0, 0] = skew  # ... through which expert 0 gets a head start of `skew`
        r.train()
        for _ in range(bias_steps):
            r(x)
            r.update_bias()
        r.eval()
        out = r(x)
    load = torch.bincount(out.expert_idx[out.expert_idx >= 0], minlength=n_experts)
    return {
        "load": load,
        "dropped": int((out.expert_idx < 0).sum()),
        "imbalance": float(load.max() / load.float().mean()) if load.sum() else float("nan"),
        "bias": r.expert_bias.clone(),
        "capacity": None if capacity_factor is None else expert_capacity(n_tokens, top_k, n_experts, capacity_factor),
        "routing": out,
    }


def router_explorer():
    """Sliders over explore_routing with a bar chart of the load (needs ipywidgets, i.e. a notebook)."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    def show(n_experts, top_k, router, skew, bias_steps, capacity_factor):
        top_k = min(top_k, n_experts)
        cf = None if capacity_factor == 0 else capacity_factor
        res = explore_routing(n_experts=n_experts, top_k=top_k, router=router, skew=skew,
                              bias_steps=bias_steps, capacity_factor=cf)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(n_experts), res["load"].tolist(), color="C0")
        ax.axhline(256 * top_k / n_experts, color="k", ls="--", lw=1, label="perfect balance")
        if res["capacity"] is not None:
            ax.axhline(res["capacity"], color="C3", lw=1, label=f"capacity ({res['capacity']})")
        ax.set_xlabel("expert")
        ax.set_ylabel("assignments")
        ax.set_title(f"imbalance max/mean = {res['imbalance']:.2f}, dropped = {res['dropped']}")
        ax.legend(loc="upper right")
        plt.show()

    return W.interactive(
        show,
        n_experts=W.IntSlider(value=8, min=2, max=32, description="experts"),
        top_k=W.IntSlider(value=2, min=1, max=8, description="top-k"),
        router=W.Dropdown(options=["softmax", "sigmoid"], value="softmax", description="router"),
        skew=W.FloatSlider(value=1.0, min=0.0, max=4.0, step=0.25, description="skew"),
        bias_steps=W.IntSlider(value=0, min=0, max=300, step=25, description="bias steps"),
        capacity_factor=W.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.25, description="capacity (0=off)"),
    )
