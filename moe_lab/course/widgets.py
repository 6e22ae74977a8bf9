"""Interactive explorers: thin ipywidgets layers over plain functions that tests call directly.

`explore_routing` is the router explorer of notebook 03: given how strongly tokens prefer one
expert, top-k, the router type, a balancing bias and a capacity factor, it routes a batch of
random tokens and reports where they went. `tiling_explorer` (notebook 05) and
`moe_padding_explorer` (notebook 06) draw the tile and padding arithmetic of `moe_lab.course.tiling`.
`advantage_explorer` (notebook 08) shows GRPO's advantages for groups with a chosen number of right
answers (`moe_lab.training.grpo.advantages_by_correct_count`).
"""
from __future__ import annotations

from typing import Optional

import torch

from moe_lab.core.config import MoEConfig
from moe_lab.course import tiling
from moe_lab.model.router import Router, expert_capacity
from moe_lab.training.grpo import ADVANTAGES, advantages_by_correct_count

# A label wider than ipywidgets' default description width (about 10 characters) is cut with "…";
# "initial" sizes it to its text. The same in ipywidgets 7 and 8: the explorers use only what both
# versions share (interactive, sliders, dropdowns), so they run on Colab's ipywidgets 7 as on 8.
WIDE = {"description_width": "initial"}


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
        out = r(x)  # still in training mode: the capacity limit acts in training only (inference is dropless)
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
        capacity_factor=W.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.25, description="capacity (0=off)",
                                      style=WIDE),  # WIDE: the whole label, not "capacity (…"
    )


def tiling_explorer():
    """Sliders over moe_lab.course.tiling.matmul_tiling: matrix sizes, block sizes, dtype and pipeline stages,
    drawn as C's tiles with the counts below (needs ipywidgets, i.e. a notebook). Defaults: the
    awkward shape notebook 05 checks on a GPU, with the tile intro.matmul uses for 16-bit inputs there."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    def show(M, N, K, block_m, block_n, block_k, dtype, num_stages):
        t = tiling.matmul_tiling(M, N, K, block_m, block_n, block_k, dtype=dtype, num_stages=num_stages)
        tiling.plot_matmul_tiles(t)
        plt.show()
        print(t.summary())

    blocks = [16, 32, 64, 128, 256]
    return W.interactive(
        show,
        M=W.IntSlider(value=1823, min=1, max=4096, description="M"),
        N=W.IntSlider(value=781, min=1, max=4096, description="N"),
        K=W.IntSlider(value=517, min=1, max=4096, description="K"),
        block_m=W.SelectionSlider(options=blocks, value=128, description="BLOCK_M"),
        block_n=W.SelectionSlider(options=blocks, value=128, description="BLOCK_N"),
        block_k=W.SelectionSlider(options=blocks, value=64, description="BLOCK_K"),
        dtype=W.Dropdown(options=["bfloat16", "float16", "float32"], value="bfloat16", description="dtype"),
        num_stages=W.IntSlider(value=3, min=1, max=5, description="stages"),
    )


def moe_padding_explorer(d: int = 1024, f: int = 512):
    """Sliders over moe_lab.course.tiling.grouped_gemm_tiling: random top-k routing of some tokens over some
    experts, padded to BLOCK_M, drawn per expert with the counts of one up projection (rows, d) @ (d, f)
    below (needs ipywidgets)."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    def show(n_tokens, n_experts, top_k, skew, block_m):
        top_k = min(top_k, n_experts)
        counts = tiling.random_expert_counts(n_tokens, n_experts, top_k, skew=skew)
        g = tiling.grouped_gemm_tiling(counts, block_m, k=d, n=f, block_n=128)
        tiling.plot_moe_padding(g)
        plt.show()
        print(g.summary())

    return W.interactive(
        show,
        n_tokens=W.IntSlider(value=512, min=1, max=8192, description="tokens"),
        n_experts=W.IntSlider(value=64, min=1, max=256, description="experts"),
        top_k=W.IntSlider(value=6, min=1, max=8, description="top-k"),
        skew=W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="skew"),
        block_m=W.SelectionSlider(options=[16, 32, 64, 128], value=64, description="BLOCK_M"),
    )


def advantage_explorer(group_size: int = 8, n_groups: int = 4):
    """Notebook 08: set how many answers of each group are right; see the advantages under each rule.

    A thin layer over moe_lab.training.grpo.advantages_by_correct_count (tests call that directly).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    def show(**counts):
        n_correct = [counts[f"group {i}"] for i in range(n_groups)]
        fig, axes = plt.subplots(1, len(ADVANTAGES), figsize=(12, 3), sharey=True)
        for ax, mode in zip(axes, ADVANTAGES):
            rows = advantages_by_correct_count(n_correct, group_size, mode)
            x = list(range(n_groups))
            ax.bar([i - 0.2 for i in x], [r["right"] or 0.0 for r in rows], width=0.4, label="a right answer")
            ax.bar([i + 0.2 for i in x], [r["wrong"] or 0.0 for r in rows], width=0.4, label="a wrong answer")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(xticks=x, xticklabels=[f"{n}/{group_size}" for n in n_correct], xlabel="right answers in the group",
                   title=f'advantage="{mode}"')
        axes[0].set_ylabel("advantage")
        axes[0].legend(fontsize=8)
        plt.tight_layout()
        plt.show()

    sliders = {f"group {i}": W.IntSlider(value=v, min=0, max=group_size, description=f"group {i}")
               for i, v in zip(range(n_groups), [1, group_size // 2, group_size - 1, group_size] + [0] * n_groups)}
    return W.interactive(show, **sliders)


def source_of(obj) -> str:
    """The Python source of a function, a class, or a Triton kernel (jit or autotuned: unwrapped)."""
    import inspect

    fn = obj
    while not inspect.isfunction(fn) and not inspect.isclass(fn):  # Autotuner -> JITFunction -> function
        if not hasattr(fn, "fn"):
            raise TypeError(f"source_of: {obj!r} is not a function, a class or a Triton kernel")
        fn = fn.fn
    return inspect.getsource(fn)


def show_source(obj) -> None:
    """Display obj's source as a highlighted code block in the notebook (notebooks 06 and 07 read the
    package's kernels this way)."""
    from IPython.display import Markdown, display

    display(Markdown(f"```python\n{source_of(obj)}```"))
