# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The Mixture-of-Experts layer
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/03_moe_layer.ipynb)
#
# Replace the transformer's feed-forward with many experts and a router that sends each token to a
# few of them: more parameters, the same compute per token. This notebook builds every idea of the
# Switch → GShard → DeepSeekMoE → DeepSeek-V3 line and checks each one.
#
# **What you will learn**
# - SwiGLU experts and a top-k router: softmax (Mixtral) and sigmoid with routed scaling (DeepSeek-V3)
# - shared experts and fine-grained segmentation (DeepSeekMoE)
# - load balancing: the Switch auxiliary loss, the ST-MoE router z-loss, DeepSeek-V3's auxiliary-loss-free bias
# - capacity factor with token dropping (GShard, Switch) versus dropless routing
# - two expert back-ends that compute the same function: a loop over experts, and sorted tokens
#
# **Prerequisites**: notebook 02. **Time to run**: CPU (2 cores): 5 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. Experts and a top-k router
#
# An MoE layer computes $y = \sum_{j<k} w_j(x)\, E_{e_j(x)}(x)$: the router scores every expert,
# keeps the $k$ best, and mixes their outputs. With softmax scores $p = \mathrm{softmax}(xW_g)$, Mixtral
# renormalises the $k$ chosen probabilities to sum to 1. Write the router:

# %%
import torch
import torch.nn.functional as F
from moe_lab.course import checks


def topk_router(logits, k):  # logits: (T, E) -> expert_idx (T, k), weights (T, k)
    # BEGIN SOLUTION
    probs = logits.softmax(-1)  # (T, E)
    weights, expert_idx = probs.topk(k, dim=-1)  # (T, k) each
    return expert_idx, weights / weights.sum(-1, keepdim=True)
    # END SOLUTION


checks.check_topk_router(topk_router)  # the same as moe_lab.model.router.Router with router="softmax"

# %% [markdown]
# Each expert is the SwiGLU of notebook 02. The readable way to run them: loop over experts, gather
# the tokens that chose each one, run it, and add the weighted outputs back (`index_add`). Write it;
# an assignment of `-1` (dropped, section 5) goes to no expert:

# %%
def experts_loop(x, expert_idx, weights, w1, w3, w2):  # x (T, d); w1, w3 (E, d, f); w2 (E, f, d)
    # BEGIN SOLUTION
    y = torch.zeros_like(x)  # (T, d)
    for e in range(w1.shape[0]):
        token, slot = torch.where(expert_idx == e)  # which tokens chose e, in which of their k slots
        if len(token):
            h = F.silu(x[token] @ w1[e]) * (x[token] @ w3[e])  # (n_e, f)
            y = y.index_add(0, token, (h @ w2[e]) * weights[token, slot, None])
    return y
    # END SOLUTION


checks.check_expert_backend(experts_loop)  # the same as moe_lab.model.experts.experts_reference

# %% [markdown]
# ## 2. The sorted back-end: permute once
#
# The loop runs a `where` per expert over all tokens. Instead, sort the $T\cdot k$ token copies by
# expert once: each expert's tokens become one contiguous slice, processed by one matmul, then
# un-permuted and combined. This layout (token indices sorted by expert, with counts per expert) is
# what the Triton kernels of notebook 06 consume.

# %%
from moe_lab.model.experts import experts_reference, experts_sorted, sort_by_expert

T, d, f, E, k = 10, 8, 16, 4, 2
g = torch.Generator().manual_seed(0)
x = torch.randn(T, d, generator=g)
logits = torch.randn(T, E, generator=g)
expert_idx, weights = topk_router(logits, k)
order, token_of, counts = sort_by_expert(expert_idx, E)
print("expert of each token copy, sorted:", expert_idx.flatten()[order].tolist())
print("the token each sorted row comes from:", token_of.tolist())
print("rows per expert:", counts.tolist())
w1, w3, w2 = (torch.randn(*s, generator=g) * 0.3 for s in [(E, d, f), (E, d, f), (E, f, d)])
err = (experts_sorted(x, expert_idx, weights, w1, w3, w2)
       - experts_loop(x, expert_idx, weights, w1, w3, w2)).abs().max()
print("sorted vs loop, largest difference:", err.item())
assert err < 1e-5

# %% [markdown]
# ## 3. DeepSeek-V3's sigmoid router, shared and fine-grained experts
#
# DeepSeek-V3 scores experts with **sigmoid** affinities $s_i = \sigma(x W_{g,i})$ (independent of each
# other), keeps the top-k, normalises the chosen $s$ to sum to 1 and multiplies by a *routed scaling
# factor*. DeepSeekMoE adds **shared experts** that every token uses (common knowledge need not be
# learned by every expert) and **fine-grained** experts: split each expert into $m$ smaller ones and
# raise $k$ by $m$, so the combinations of experts a token can use grow from $\binom{8}{2}=28$ to
# $\binom{32}{8}\approx 10^7$ at the same compute.
#
# All of this is `moe_lab.model.MoELayer`, configured by `MoEConfig`:

# %%
from math import comb
from moe_lab.core.config import MoEConfig
from moe_lab.model import MoELayer

coarse = MoEConfig(n_experts=8, top_k=2, d_expert=128)
fine = MoEConfig(n_experts=32, top_k=8, d_expert=32, n_shared=1, d_shared=64, router="sigmoid",
                 routed_scaling=2.5)
for name, c in [("coarse", coarse), ("fine-grained + shared", fine)]:
    layer = MoELayer(64, c)
    params = sum(p.numel() for p in layer.parameters())
    print(f"{name:>22}: {c.n_experts} experts top-{c.top_k}, active width {c.active_width}, "
          f"{params:,} parameters, {comb(c.n_experts, c.top_k):,} expert combinations")
assert coarse.top_k * coarse.d_expert == fine.top_k * fine.d_expert  # same routed compute per token

layer = MoELayer(64, fine)
y = layer(torch.randn(2, 16, 64))
print("output", tuple(y.shape), "| router stats:", layer.last_stats)

# %% [markdown]
# ## 4. Load balancing
#
# Left alone, a router collapses: a few experts get most tokens, learn faster, and get even more.
# Three remedies:
#
# - **Switch auxiliary loss** (Fedus et al. 2021): $\mathcal{L}_{aux} = \alpha\,E\sum_i f_i P_i$, with $f_i$ the
#   fraction of assignments that went to expert $i$ and $P_i$ its mean router probability. It is
#   $\alpha$ at perfect balance and grows when load concentrates.
# - **Router z-loss** (ST-MoE, Zoph et al. 2022): $\frac{1}{T}\sum_t \big(\log\sum_i e^{z_{t,i}}\big)^2$ keeps
#   the router logits small and the softmax numerically tame.
# - **Auxiliary-loss-free balancing** (DeepSeek-V3): a bias $b_i$ added to the scores *for choosing
#   experts only*, never to the weights; after each step $b_i \mathrel{+}= \gamma\,\mathrm{sign}(\bar{c} - c_i)$,
#   with $c_i$ expert $i$'s load. No gradient interferes with the language-modelling loss.
#
# Implement the Switch loss:

# %%
def switch_aux_loss(probs, expert_idx, n_experts):  # probs (T, E), expert_idx (T, k) -> a scalar
    # BEGIN SOLUTION
    f = torch.bincount(expert_idx.flatten(), minlength=n_experts).float() / expert_idx.numel()
    P = probs.mean(0)
    return n_experts * (f * P).sum()
    # END SOLUTION


checks.check_switch_aux_loss(switch_aux_loss)  # the same as moe_lab.model.router.switch_aux_loss

# %% [markdown]
# Now watch the aux-loss-free rule work. `explore_routing` builds a router whose tokens all prefer
# expert 0 (a `skew` added to its logit), then applies the bias rule for some steps:

# %%
import matplotlib.pyplot as plt
from moe_lab.course.widgets import explore_routing

before = explore_routing(skew=2.0, router="sigmoid")
after = explore_routing(skew=2.0, router="sigmoid", bias_steps=200, bias_rate=0.01)
fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
for ax, res, title in [(axes[0], before, "no balancing"), (axes[1], after, "after 200 bias updates")]:
    ax.bar(range(8), res["load"].tolist())
    ax.axhline(256 * 2 / 8, color="k", ls="--", lw=1, label="perfect balance")
    ax.set_xlabel("expert")
    ax.set_title(f"{title}: max/mean = {res['imbalance']:.2f}")
axes[0].set_ylabel("assignments")
axes[0].legend()
plt.show()
print("learned bias:", [round(b, 2) for b in after["bias"].tolist()])
assert after["imbalance"] < before["imbalance"] - 0.5  # the bias rule balances the load
assert after["bias"][0] < 0  # the favourite expert was made less attractive

# %% [markdown]
# ### The router explorer
# Move the sliders: how do top-k, the router type, a favourite expert (skew), the bias updates and
# a capacity limit change where tokens go? (The logic is `moe_lab.course.widgets.explore_routing`.)

# %%
from moe_lab.course.widgets import router_explorer

router_explorer()

# %% [markdown]
# ## 5. Capacity factor and token dropping
#
# On accelerators, fixed shapes are cheap and variable ones are not, so GShard and Switch give each
# expert a fixed **capacity** of $\lceil cf \cdot T k / E\rceil$ assignments. First choices are served
# before second choices, earlier tokens before later ones; the rest are **dropped**: they skip the
# experts and travel on through the residual connection. *Dropless* MoE (MegaBlocks, DeepSeek-V3)
# keeps every token at the price of variable shapes, which the sorted layout and the kernels of
# notebook 06 handle. Implement the capacity rule:

# %%
def apply_capacity(expert_idx, weights, n_experts, capacity):  # -> (expert_idx with -1, weights with 0)
    # BEGIN SOLUTION
    T, k = expert_idx.shape
    keep = torch.zeros(T, k, dtype=torch.bool)
    used = [0] * n_experts
    for j in range(k):  # first choices first ...
        for t in range(T):  # ... in token order
            e = int(expert_idx[t, j])
            if used[e] < capacity:
                used[e] += 1
                keep[t, j] = True
    return expert_idx.masked_fill(~keep, -1), weights.masked_fill(~keep, 0.0)
    # END SOLUTION


checks.check_capacity(apply_capacity)  # the same as moe_lab.model.router.apply_capacity (vectorised)

# %%
x = torch.randn(4, 64, 64)
rows = []
for cf in [0.5, 1.0, 1.25, 2.0, None]:
    runtime.seed_everything(0)
    layer = MoELayer(64, MoEConfig(n_experts=8, top_k=2, d_expert=32, capacity_factor=cf))
    layer(x)
    s = layer.last_stats
    rows.append((cf, s.dropped / (x.shape[0] * x.shape[1] * 2)))
    print(f"capacity factor {str(cf):>5}: dropped {s.dropped:4d} of {256 * 2} assignments, max load "
          f"{int(s.load.max())}")
# more capacity, fewer drops; dropless drops none
assert rows[0][1] > rows[2][1] >= rows[3][1] and rows[-1][1] == 0
fig, ax = plt.subplots(figsize=(5, 2.5))
ax.bar([str(cf) for cf, _ in rows], [100 * frac for _, frac in rows], color="C3")
ax.set_xlabel("capacity factor (None = dropless)")
ax.set_ylabel("assignments dropped (%)")
ax.set_title("more capacity, fewer dropped assignments")
plt.show()

# %% [markdown]
# ## 6. One layer, two back-ends, the same function
#
# `MoELayer.backend` picks how experts run: `"reference"` (the loop) or `"sorted"`; notebook 06 adds
# `"triton"` (`moe_lab.model.expert_backends` lists them all, and says which can run here). Outputs
# *and gradients* must agree. `expert_backends.layer_agreement` runs the layer under each back-end
# with the same input and loss, and compares the output and the gradient of every parameter:

# %%
from moe_lab.model import expert_backends

runtime.seed_everything(0)
layer = MoELayer(32, MoEConfig(n_experts=6, top_k=2, d_expert=16, n_shared=1, router="sigmoid",
                               balance="aux_loss", z_loss_coef=1e-3)).double()
x = torch.randn(3, 20, 32, dtype=torch.float64)
# the output and every parameter's gradient (of mean(y^2) + aux loss) under "sorted", against "reference"
(row,) = expert_backends.layer_agreement(layer, x, ["sorted"])
print(f"largest relative difference: outputs {row['output']:.2e}, gradients {row['gradient']:.2e} "
      f"(worst: {row['worst_parameter']})")
assert row["output"] < 1e-12 and row["gradient"] < 1e-12

# %% [markdown]
# ## 7. Where do tokens go?
#
# A routing map of one sentence through an untrained layer (darker = first choice). In notebook 04
# the same picture, after training, shows experts specialising.

# %%
from moe_lab.data import TOKENIZER
from moe_lab.course.plots import plot_routing_map

text = "def add(a, b):\n    return a + b  # 12+34=64"
ids = torch.tensor(TOKENIZER.encode(text))
runtime.seed_everything(0)
emb = torch.nn.Embedding(TOKENIZER.vocab_size, 32)
layer = MoELayer(32, MoEConfig(n_experts=8, top_k=2, d_expert=16))
with torch.no_grad():
    layer(emb(ids))
plot_routing_map(layer.last_routing.expert_idx, 8, tokens=list(text))
plt.show()

# %% [markdown]
# ## Summary
# - An MoE layer = a router choosing top-k experts per token + SwiGLU experts + optional shared experts.
# - Softmax (Mixtral) and sigmoid (DeepSeek-V3) routers; fine-grained experts multiply the combinations at equal compute.
# - Balancing: Switch aux loss, ST-MoE z-loss, DeepSeek-V3's bias rule (no gradient interference).
# - Capacity factors drop overflow tokens; dropless routing keeps them all at the price of variable shapes.
# - `reference` and `sorted` back-ends compute the same function, gradients included: the contract every fast back-end must keep.
#
# ## Papers and further reading
# - Shazeer et al. *Outrageously large neural networks: the sparsely-gated mixture-of-experts layer* (2017).
# - Lepikhin et al. *GShard* (2020); Fedus, Zoph, Shazeer. *Switch Transformers* (2021).
# - Zoph et al. *ST-MoE: designing stable and transferable sparse expert models* (2022).
# - Dai et al. *DeepSeekMoE* (2024); DeepSeek-AI. *DeepSeek-V2* (2024) and *DeepSeek-V3 technical report* (2024).
# - Wang et al. *Auxiliary-loss-free load balancing strategy for mixture-of-experts* (2024).
# - Jiang et al. *Mixtral of experts* (2024); Gale et al. *MegaBlocks: efficient sparse training with mixture-of-experts* (2022).
