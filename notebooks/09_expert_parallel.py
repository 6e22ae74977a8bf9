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
# # 09 · Expert parallelism: experts on many processes, tokens over all-to-all
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/09_expert_parallel.ipynb)
#
# An MoE layer has many experts but each token uses only a few of them. At DeepSeek-V3's scale
# (256 routed experts in each of 58 MoE layers) the experts no longer fit on one GPU. So they are
# split: each GPU holds a few experts, and the *tokens* travel to the GPUs that hold their experts
# and come back. One collective operation does the travelling: **all-to-all**. This notebook builds
# that exchange, draws it, counts the bytes it moves, and runs it on 2 and 4 real processes. The
# expert-parallel layer must give **the same outputs and gradients** as one process, and every
# section checks that it does.
#
# **What you will learn**
# - why experts are sharded over devices, and what all-to-all does (each rank sends a different chunk to every other rank)
# - the four steps of an expert-parallel layer: route, dispatch (counts first, then rows), compute, combine, and why the backward pass is the same exchange run in reverse
# - how to count the bytes one step moves, and how to check the count against `CommStats`
# - how to launch 2 and 4 CPU processes (gloo) from a notebook and match the single-process layer exactly
# - capacity factor vs dropless routing: fixed-size buffers against variable ones
# - what changes on GPUs: NCCL and `torchrun`, overlapping communication with compute, DeepSeek-V3's node-limited routing, DeepEP
#
# **Prerequisites**: notebook 03 (the MoE layer, top-k routing, capacity factor). No prior
# `torch.distributed` knowledge needed. **Time to run**: CPU (2 cores): 12 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. Why expert parallelism
#
# Count DeepSeek-V3's routed experts from its published configuration: hidden size 7168, 256
# routed experts per MoE layer, each a SwiGLU expert of width 2048 (three matrices), 8 of them
# active per token, and 58 MoE layers (the first 3 of its 61 layers are dense).

# %%
d_model, d_expert, n_routed, top_k_v3, n_moe_layers = 7168, 2048, 256, 8, 58
per_expert = 3 * d_model * d_expert  # w1, w3: (d, f); w2: (f, d)
routed = n_moe_layers * n_routed * per_expert
print(f"one expert: {per_expert / 1e6:.1f} M parameters; all routed experts: {routed / 1e9:.0f} B "
      f"of DeepSeek-V3's 671 B ({routed / 671e9:.0%})")
print(f"in bf16 the routed experts take {routed * 2 / 1e12:.2f} TB; one H100 has 0.08 TB")
print(f"active per token: {top_k_v3} of {n_routed} experts = {top_k_v3 / n_routed:.1%} of the routed weights")
for ep in (8, 64):
    print(f"  {ep:>2}-way expert parallelism: {n_routed // ep:>2} experts per layer per GPU, "
          f"{routed * 2 / ep / 1e9:6.1f} GB of routed weights per GPU")
assert routed / 671e9 > 0.9  # almost all of the model is routed experts...
assert top_k_v3 / n_routed < 0.05  # ...and each token touches under 5% of them

# %% [markdown]
# Almost all of the parameters sit in experts, and each token needs only 3% of them. Copying
# every expert onto every GPU, as data parallelism would, wastes memory. **Expert parallelism**
# (GShard, Lepikhin et al. 2020; Switch Transformer, Fedus et al. 2021) gives each of $W$ processes
# (*ranks*, one per GPU) $E/W$ experts and moves the tokens instead. DeepSeek-V3 trains with 64-way
# expert parallelism over 8 nodes.
#
# Each rank keeps its own tokens, its own copy of the router and of the shared experts (these are
# small), and runs the layer in four steps:
#
# 1. **route**: the rank's router picks the top-k experts of each of its tokens;
# 2. **dispatch**: every token copy travels to the rank that owns its expert;
# 3. **compute**: each rank runs its own experts on the rows it received;
# 4. **combine**: the results travel back, and each token sums its k results, weighted by the router.
#
# Steps 2 and 4 are the same collective operation: **all-to-all**.
#
# ## 2. All-to-all, with ranks simulated in one process
#
# In an all-to-all every rank splits its buffer into $W$ chunks and sends chunk $j$ to rank $j$.
# Each rank receives one chunk from every rank and stores them in rank order. If `chunks[src][dst]`
# is what `src` sends to `dst`, the exchange *transposes* that table. **Exercise**: write it, with
# plain Python lists standing in for the ranks.

# %%
from moe_lab.course import checks


def all_to_all_sim(chunks):
    """chunks[src][dst] -> received[dst][src]: what every rank receives, in source-rank order."""
    # BEGIN SOLUTION
    W = len(chunks)
    return [[chunks[src][dst] for src in range(W)] for dst in range(W)]
    # END SOLUTION


checks.check_all_to_all_sim(all_to_all_sim)

chunks = [[f"{src}→{dst}" for dst in range(3)] for src in range(3)]
for r, got in enumerate(all_to_all_sim(chunks)):
    print(f"rank {r} sends {chunks[r]}   receives {got}")
assert all_to_all_sim(all_to_all_sim(chunks)) == chunks  # exchanging twice brings every chunk home

# %% [markdown]
# The chunks need not be equal in size. `torch.distributed.all_to_all_single` takes one buffer and
# two lists: `input_splits[j]` is the number of rows sent to rank $j$, and `output_splits[i]` is the
# number of rows received from rank $i$. A receiver must know `output_splits` *before* the
# exchange, so it can allocate its buffer. An MoE layer therefore runs two exchanges: first the
# **counts** (a few integers: how many rows each rank will send to each of my experts), then the
# **rows**.
#
# The backward pass needs no new idea. The gradient of a row that travelled from `src` to `dst` is
# computed on `dst` and must travel back from `dst` to `src`. That is the same exchange with the two
# split lists swapped. In one process autograd follows the rows through the lists on its own.
# Check that its answer is the reverse exchange:

# %%
import torch

# the library's, the same as yours once the check passes
from moe_lab.distributed.simulate import all_to_all_sim

torch.manual_seed(0)
W_demo, sizes = 3, torch.tensor([[2, 0, 1], [1, 3, 2], [0, 1, 1]])  # sizes[src, dst]: rows sent
sent = [[torch.randn(int(sizes[s, t]), 4, requires_grad=True) for t in range(W_demo)] for s in range(W_demo)]
received = [torch.cat(c) for c in all_to_all_sim(sent)]  # [dst]: (rows received, 4)
grad_received = [torch.randn_like(r) for r in received]  # the gradient each receiver computes
sum((r * g).sum() for r, g in zip(received, grad_received)).backward()

# the reverse exchange: each receiver splits its gradient by source rank and sends each piece home
back = [list(g.split(sizes[:, dst].tolist())) for dst, g in enumerate(grad_received)]  # back[dst][src]
for src, grads_home in enumerate(all_to_all_sim(back)):  # grads_home[dst]: what came back from dst
    for dst in range(W_demo):
        assert torch.equal(sent[src][dst].grad, grads_home[dst])
print("the gradient of an all-to-all is the all-to-all in reverse (splits swapped)")

# %% [markdown]
# Separate processes share no autograd graph, so `moe_lab.distributed.comm.AllToAll` writes this
# backward out as a `torch.autograd.Function`. Its `backward` calls the same all-to-all with
# `input_splits` and `output_splits` swapped. One rule follows from the exchange being
# *collective*: every rank must call it, in the same order, forward and backward, including a
# rank that happens to hold no tokens.
#
# ## 3. Dispatch, compute, combine, built inline
#
# Build the whole expert-parallel computation on simulated ranks. Rank $r$ owns experts
# $[rE_\text{local}, (r+1)E_\text{local})$ with $E_\text{local} = E/W$, so sorting a rank's token
# copies by expert also groups them by destination rank. `sort_by_expert` from notebook 03 does
# that sorting.

# %%
import torch.nn.functional as F
from moe_lab.model.experts import experts_reference, sort_by_expert, swiglu_expert


def ep_simulated(xs, idxs, ws, w1, w3, w2):
    """Expert parallelism on W simulated ranks. xs[r] (T_r, d), idxs[r] / ws[r] (T_r, k): rank r's tokens.

    w1, w3 (E, d, f), w2 (E, f, d) are the full expert weights; rank r only ever touches its slice.
    Returns each rank's outputs and a trace of what travelled (for the pictures and the byte count).
    """
    W, E = len(xs), w1.shape[0]
    E_local = E // W
    # 1. sort each rank's token copies by expert, hence by destination rank (dropped copies removed)
    sort = [sort_by_expert(idx, E) for idx in idxs]  # per rank: order (N,), token_of (N,), counts (E,)
    # 2a. exchange counts: src tells dst how many rows it will send to each of dst's experts
    count_chunks = [list(counts.view(W, E_local)) for _, _, counts in sort]  # [src][dst]: (E_local,)
    # [dst]: (W, E_local) rows from src for e
    recv_counts = [torch.stack(c) for c in all_to_all_sim(count_chunks)]
    send_splits = [counts.view(W, E_local).sum(1).tolist() for _, _, counts in sort]  # [src][dst] rows
    # 2b. dispatch the rows themselves
    row_chunks = [list(x[token_of].split(splits))
                  for x, (_, token_of, _), splits in zip(xs, sort, send_splits)]
    # [dst]: (M, d), by source rank, then local expert
    x_recv = [torch.cat(c) for c in all_to_all_sim(row_chunks)]
    # 3. compute: rank r runs its own experts on the rows it received
    y_recv = []
    for r in range(W):
        local_e = torch.arange(E_local).repeat(W).repeat_interleave(recv_counts[r].reshape(-1))  # (M,)
        y = torch.zeros_like(x_recv[r])  # (M, d)
        for e in range(E_local):
            rows = torch.where(local_e == e)[0]
            g = r * E_local + e  # global id of this rank's e-th expert
            y = y.index_copy(0, rows, swiglu_expert(x_recv[r][rows], w1[g], w3[g], w2[g]))
        y_recv.append(y)
    # 4. combine: the rows go back the way they came (splits swapped), then weight and sum per token
    back_chunks = [list(y_recv[r].split(recv_counts[r].sum(1).tolist())) for r in range(W)]
    y_back = [torch.cat(c) for c in all_to_all_sim(back_chunks)]  # [src]: (N, d) in the order it was sent
    outs = []
    for r, (order, token_of, _) in enumerate(sort):
        w_sorted = ws[r].reshape(-1)[order]  # (N,) routing weight of each returning row
        outs.append(torch.zeros_like(xs[r]).index_add(0, token_of, y_back[r] * w_sorted[:, None]))  # (T_r, d)
    trace = dict(sort=sort, send_splits=send_splits, recv_counts=recv_counts, E_local=E_local)
    return outs, trace


# %% [markdown]
# Route a batch with a real `MoELayer` (its router), split it over simulated ranks, and compare
# with the loop over experts of notebook 03 running on every token in one place. The computation
# is done in float64: rounding then stays near $10^{-16}$, while a row sent to the wrong expert
# would show up as an error of order 1.

# %%
from moe_lab.core.config import MoEConfig
from moe_lab.model import MoELayer

from moe_lab.core.config import notebook_sizes

# tokens per rank, model width, expert width, routed experts, top-k
SIZES = notebook_sizes("09", rt.mode)["layer"]
T, d, f, E, k = (SIZES[n] for n in ("T", "d", "f", "E", "k"))
DTYPE = torch.float64
cfg = MoEConfig(n_experts=E, top_k=k, d_expert=f, n_shared=1, backend="reference")
torch.manual_seed(0)
layer = MoELayer(d, cfg, init_std=d ** -0.5).to(DTYPE)

for W in (2, 4):
    xs = [torch.randn(T, d, dtype=DTYPE) for _ in range(W)]  # rank r's tokens
    with torch.no_grad():
        routings = [layer.router(x) for x in xs]  # every rank routes its own tokens
        outs, trace = ep_simulated(xs, [r.expert_idx for r in routings], [r.weights for r in routings],
                                   layer.w1, layer.w3, layer.w2)
        one_place = experts_reference(torch.cat(xs), torch.cat([r.expert_idx for r in routings]),
                                      torch.cat([r.weights for r in routings]), layer.w1, layer.w3, layer.w2)
    err = (torch.cat(outs) - one_place).abs().max().item()
    print(f"W={W}: rows sent per [src][dst] = {trace['send_splits']}; largest difference from one process "
          f"{err:.1e}")
    assert err < 1e-12

# %% [markdown]
# The canonical version is `moe_lab.distributed.experts_ep`. It performs these same steps with
# `torch.distributed.all_to_all_single` between real processes, and section 6 checks it against
# one process. Each rank now stores and computes only $E/W$ of the experts. The price is the two
# exchanges.
#
# ## 4. Pictures: dispatch and combine
#
# Draw one small example: 4 ranks with 3 tokens each, 8 experts (2 per rank), top-2. Every box is
# one token copy, and its colour is the rank the copy is heading to. In the dispatch, rank $r$'s
# copies (`t1→e5`: its token 1, for expert 5) leave sorted by destination. The receiving rank
# stores them by source rank and then by expert (`r2·t1→e5`). Arrow width is proportional to the
# rows sent. Dashed arrows are copies whose expert is on their own rank: they are copied locally
# and never cross the network. The combine runs the same exchange backwards. Each result (`E5(r2·t1)`)
# goes home to its token's rank, where the k results are weighted and summed.

# %%
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

Wp, Tp = 4, 3  # a picture-sized example
torch.manual_seed(1)
xs_p = [torch.randn(Tp, d, dtype=DTYPE) for _ in range(Wp)]
with torch.no_grad():
    routing_p = [layer.router(x) for x in xs_p]
_, trace_p = ep_simulated(xs_p, [r.expert_idx for r in routing_p], [r.weights for r in routing_p],
                          layer.w1, layer.w3, layer.w2)
colors = plt.get_cmap("tab10").colors

E_loc = trace_p["E_local"]
copies = [list(zip(token_of.tolist(), routing_p[src].expert_idx.reshape(-1)[order].tolist()))
          # [src]: (token, expert), in send order
          for src, (order, token_of, _) in enumerate(trace_p["sort"])]
# receivers store rows by source rank, then local expert: each sender's order, senders one after another
arrived = [[(src, t, e) for src in range(Wp) for t, e in copies[src] if e // E_loc == dst]
           for dst in range(Wp)]
# every buffer as (label, destination rank) per row
dispatch_send = [[(f"t{t}→e{e}", e // E_loc) for t, e in rows] for rows in copies]
dispatch_recv = [[(f"r{src}·t{t}→e{e}", dst) for src, t, e in rows] for dst, rows in enumerate(arrived)]
combine_send = [[(f"E{e}(r{src}·t{t})", src) for src, t, e in rows] for rows in arrived]
combine_recv = [[(f"t{t} ← e{e}", src) for t, e in rows] for src, rows in enumerate(copies)]


def draw_all_to_all(ax, send, recv, splits, title):
    """send[r] / recv[r]: (label, colour rank) per row of rank r's buffers; splits[src][dst]: rows sent."""
    W = len(send)
    def layout(buffers):  # y of every row, ranks stacked top to bottom with a gap between them
        ys, y = [], 0.0
        for rows in buffers:
            ys.append([-(y + i) for i in range(len(rows))])
            y += max(len(rows), 1) + 1.0
        return ys
    y_send, y_recv = layout(send), layout(recv)
    for x0, buffers, ys in ((0.0, send, y_send), (4.0, recv, y_recv)):
        for rows, yr in zip(buffers, ys):
            for (label, c), y in zip(rows, yr):
                ax.add_patch(Rectangle((x0, y - 0.45), 1.6, 0.9, color=colors[c], alpha=0.85))
                ax.text(x0 + 0.8, y, label, ha="center", va="center", fontsize=7)
    for src in range(W):
        for dst in range(W):
            n = splits[src][dst]
            if n == 0:
                continue
            a = sum(splits[src][:dst])  # first row of the chunk in src's send buffer
            b = sum(splits[s][dst] for s in range(src))  # first row of the chunk in dst's receive buffer
            ya = (y_send[src][a] + y_send[src][a + n - 1]) / 2
            yb = (y_recv[dst][b] + y_recv[dst][b + n - 1]) / 2
            ax.annotate("", xy=(3.95, yb), xytext=(1.65, ya),
                        arrowprops=dict(arrowstyle="->", color=colors[dst], lw=0.8 + 0.8 * n,
                                        linestyle="--" if src == dst else "-"))
    centres = lambda ys: [(yr[0] + yr[-1]) / 2 if yr else 0 for yr in ys]
    ax.set_yticks(centres(y_send), [f"rank {r}" for r in range(W)])
    for r, y in enumerate(centres(y_recv)):
        ax.text(5.7, y, f"rank {r}", va="center", fontsize=9)
    ax.set_xticks([0.8, 4.8], ["send buffer", "receive buffer"])
    ax.set_xlim(-0.2, 6.3)
    ax.set_ylim(min(min(y) for y in y_send + y_recv if y) - 1, 1)
    ax.set_xlabel("all-to-all: chunk j of every send buffer goes to rank j")
    ax.set_ylabel("rank (one box per row of its buffer)")
    ax.set_title(title)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


recv_splits_p = [c.sum(1).tolist() for c in trace_p["recv_counts"]]  # [dst][src]
fig, axes = plt.subplots(1, 2, figsize=(13, 7))
draw_all_to_all(axes[0], dispatch_send, dispatch_recv, trace_p["send_splits"],
                "dispatch: token copies to their experts' ranks")
draw_all_to_all(axes[1], combine_send, combine_recv, recv_splits_p,
                "combine: expert outputs back to their tokens' ranks")
fig.legend([Rectangle((0, 0), 1, 1, color=colors[r]) for r in range(Wp)], [f"to rank {r}" for r in range(Wp)],
           loc="lower center", ncol=Wp, title="box and arrow colour: destination")
fig.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()
assert [len(rows) for rows in combine_recv] == [len(rows) for rows in dispatch_send]  # every copy comes home
# a rank receives only its experts' rows
assert all(c == r for r, rows in enumerate(dispatch_recv) for _, c in rows)

# %% [markdown]
# The combine's splits are the dispatch's splits transposed. A rank sends back exactly as many rows
# to each source as it received from it, so after the dispatch no further count exchange is needed.
#
# ## 5. Bytes moved per step, counted by hand
#
# Only rows that leave their process cost network bandwidth. Rows whose expert lives on the same
# rank are a local copy (the diagonal of the traffic matrix). Per rank and per training step:
#
# | phase | sent | received |
# |---|---|---|
# | counts | $(W-1)\cdot E_\text{local}$ integers (int64: 8 bytes) | the same |
# | dispatch | my routed copies whose expert is elsewhere × row bytes | other ranks' copies for my experts × row bytes |
# | combine | = dispatch received | = dispatch sent |
# | combine.backward | = dispatch sent (gradients of the returned rows go out again) | = dispatch received |
# | dispatch.backward | = dispatch received | = dispatch sent |
#
# A row is $d$ numbers: $d \times 8$ bytes in float64, $d\times 2$ in bf16. Dropped copies (-1,
# beyond capacity) never travel. **Exercise**: write the count as a function. Rank r owns experts
# `r * E_local` to `(r + 1) * E_local - 1`. (From section 6 on, the notebook uses the library's
# `moe_lab.distributed.simulate.bytes_by_hand`, as section 2's exercise is replaced by
# `simulate.all_to_all_sim` after its check, so the later sections run before you solve these.)

# %%
def bytes_by_hand(idxs, n_experts, row_bytes, count_bytes=8):
    """Bytes each rank sends and receives, per phase, from each rank's routing idxs[r] (T_r, k).

    Returns ([{phase: (sent, received)} per rank], rows[src, dst]: routed copies src sends to dst).
    """
    # BEGIN SOLUTION
    W = len(idxs)
    E_local = n_experts // W
    rows = torch.zeros(W, W, dtype=torch.long)  # rows[src, dst], the diagonal stays home
    for src, idx in enumerate(idxs):
        rows[src] += torch.bincount(idx[idx >= 0] // E_local, minlength=W)  # owner rank of each routed copy
    off = rows * (1 - torch.eye(W, dtype=torch.long))  # only what crosses a process boundary
    per_rank = []
    for r in range(W):
        out, inc = int(off[r].sum()) * row_bytes, int(off[:, r].sum()) * row_bytes
        counts = (W - 1) * E_local * count_bytes
        per_rank.append({"counts": (counts, counts), "dispatch": (out, inc), "combine": (inc, out),
                         "combine.backward": (out, inc), "dispatch.backward": (inc, out)})
    return per_rank, rows
    # END SOLUTION


checks.check_bytes_by_hand(bytes_by_hand)  # the same count as moe_lab.distributed.comm.CommStats records

hand_p, rows_p = bytes_by_hand([r.expert_idx for r in routing_p], E, row_bytes=d * 8)
assert rows_p.tolist() == trace_p["send_splits"]  # the same rows the picture's arrows carry
print(f"the picture's example, rank 0 (d={d}, float64: a row is {d * 8} bytes):")
for phase, (s, rcv) in hand_p[0].items():
    print(f"  {phase:<18} sent {s:>6} B   received {rcv:>6} B")

# %% [markdown]
# At scale the numbers get large. Under uniform routing a copy leaves its rank with probability
# $(W-1)/W$, and every copy that leaves crosses the network four times per training step (dispatch,
# combine and their two backwards). For one DeepSeek-V3 MoE layer with bf16 rows and 64-way
# expert parallelism:

# %%
W_v3 = 64
per_token = 4 * top_k_v3 * d_model * 2 * (W_v3 - 1) / W_v3  # bytes per token per MoE layer per step
print(f"{per_token / 1e3:.0f} kB per token per MoE layer per step; a 4096-token sequence through "
      f"{n_moe_layers} MoE layers: {per_token * 4096 * n_moe_layers / 1e9:.0f} GB")

# is the exchange cheap next to the experts' arithmetic? compare FLOPs per byte moved
flops_per_copy = 2 * 3 * d_model * d_expert  # forward: three (d x f) matmuls on one row
bytes_per_copy = 2 * d_model * 2  # the row goes out and comes back, bf16
layer_ratio = flops_per_copy / bytes_per_copy
machine_ratio = 1000e12 / 50e9  # ~1,000 bf16 TFLOP/s (H100 dense) over ~50 GB/s InfiniBand per GPU
print(f"the experts do {layer_ratio:,.0f} FLOPs per byte exchanged; the machine can do {machine_ratio:,.0f} "
      f"FLOPs in the time one byte crosses InfiniBand")
assert layer_ratio < machine_ratio  # across nodes, moving a token costs more time than computing its expert

# %% [markdown]
# At peak speed, sending a copy over InfiniBand takes several times longer than the arithmetic of
# its expert. The DeepSeek-V3 report describes a computation-to-communication ratio of about 1:1 for
# its cross-node expert parallelism, and that is after its own optimisations. The exchange cannot be
# ignored, which is why section 8 is about shrinking it and hiding it.
#
# ## 6. The real thing: 2 and 4 processes
#
# `moe_lab.distributed.launch(fn, W, *args)` starts $W$ processes on this machine and joins them
# in a process group with the **gloo** back-end (CPU tensors over 127.0.0.1). It calls
# `fn(rank, W, *args)` on each and returns their results in rank order. If a rank raises or hangs,
# every rank is stopped and the error names the rank. `fn` must be importable by a fresh process,
# so it lives in a module: `moe_lab.distributed.workers.moe_layer_runs`. It rebuilds our layer
# from its weights and converts it with `to_expert_parallel`, which keeps rank $r$'s slice of the
# routed experts and copies the router and the shared expert. It then runs rank $r$'s tokens
# forward and backward and sums the replicated gradients over the ranks. It runs two layers: the
# dropless one of section 3 and a capacity-limited copy (section 7).
#
# In real training each rank's loss depends on its output through the rest of the network. Here
# a fixed random tensor `grad_y[r]` stands in for that upstream gradient: rank $r$'s loss is
# $\sum y_r \odot \text{grad\_y}_r$ + the router's auxiliary loss.

# %%
import time
from dataclasses import replace
from moe_lab.distributed import launch
from moe_lab.distributed.simulate import bytes_by_hand  # the library's count, the same as yours once checked
from moe_lab.distributed.workers import moe_layer_runs

cfg_cap = replace(cfg, capacity_factor=1.0)
layer_cap = MoELayer(d, cfg_cap).to(DTYPE)
layer_cap.load_state_dict(layer.state_dict())  # the same weights; only the capacity differs
LAYERS = {"dropless": layer, "capacity 1.0": layer_cap}

inputs, runs, cases_of, seconds = {}, {}, {}, {}
for W in (2, 4):
    g = torch.Generator().manual_seed(W)
    xs = [torch.randn(T, d, generator=g, dtype=DTYPE) for _ in range(W)]  # rank r's tokens
    grads = [torch.randn(T, d, generator=g, dtype=DTYPE) for _ in range(W)]  # stand-in upstream gradients
    cases_of[W] = [dict(cfg=l.cfg, d_model=d, dtype=DTYPE, state=l.state_dict(), x=xs, grad_y=grads,
                        local_backend="sorted")
                   for l in LAYERS.values()]
    t0 = time.perf_counter()
    per_rank = launch(moe_layer_runs, W, cases_of[W], timeout=180)  # [rank][case]
    seconds[W] = time.perf_counter() - t0
    print(f"{W} processes: {seconds[W]:.1f} s (start-up included)")
    inputs[W] = (xs, grads)
    runs[W] = {name: [per_rank[r][i] for r in range(W)] for i, name in enumerate(LAYERS)}  # name -> [rank]
t0 = time.perf_counter()
launch(moe_layer_runs, 2, cases_of[2], timeout=180)  # the first launch again, now that the server runs
print(f"2 processes, launched again: {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# Four processes can finish sooner than two, start-up included, and the third line says why. The
# first `launch` of a session starts a *forkserver*: a process that imports torch and `moe_lab` once
# and then forks every rank from itself, already loaded. That import, about a second, is paid by
# whichever launch comes first, here the one with two processes. Launched again, two processes take
# a fraction of a second, like four. So these times measure start-up on a shared CPU, not the speed
# of expert parallelism; what decides that at scale is the bytes counted in section 5.
#
# Now the single-process layer, in this process: each rank's tokens go through the original
# layer, with the same losses, summed. Each rank applies the capacity limit to its own tokens
# (GShard's *local group dispatching*), so the reference also runs rank by rank. Then compare
# outputs, input gradients, the expert gradients (each rank holds the gradient of its own shard,
# and the shards put side by side give the full tensor), and the replicated router and shared-expert
# gradients.

# %%
def single_process(layer, xs, grads):
    """Every rank's tokens through one process's layer; gradients of the summed losses."""
    layer.zero_grad()
    ys, gxs = [], []
    for x, g in zip(xs, grads):
        x = x.clone().requires_grad_()
        y = layer(x)
        ((y * g).sum() + layer.aux_loss).backward()
        ys.append(y.detach())
        gxs.append(x.grad)
    return torch.cat(ys), torch.cat(gxs)


def max_err(a, b):
    return (a - b).abs().max().item()


TOL = 1e-10  # float64: rounding is ~1e-16; any mis-routed row would be of order 1
print(f"{'W':>2} {'layer':<13}{'output':>10}{'grad x':>10}{'grad experts':>14}{'grad replicated':>17}")
for W, by_layer in runs.items():
    xs, grads = inputs[W]
    for name, results in by_layer.items():
        ref = LAYERS[name]
        y_ref, gx_ref = single_process(ref, xs, grads)
        params = dict(ref.named_parameters())
        errs = [
            max_err(torch.cat([r["y"] for r in results]), y_ref),
            max_err(torch.cat([r["grad_x"] for r in results]), gx_ref),
            max(max_err(torch.cat([r[f"grad_{n}"] for r in results]), getattr(ref, n).grad)
                for n in ("w1", "w3", "w2")),
            max(max_err(r["replicated"][n], params[n].grad) for r in results for n in r["replicated"]),
        ]
        print(f"{W:>2} {name:<13}" + "".join(f"{e:>{w}.1e}" for e, w in zip(errs, (10, 10, 14, 17))))
        assert max(errs) < TOL, (W, name, errs)
        replicated = {n for n in params if not n.startswith("experts.")}
        assert all(set(r["replicated"]) == replicated for r in results)
print("the expert-parallel layer matches one process: outputs and every gradient")

# %% [markdown]
# Now check the hand count against the bytes each rank's `CommStats` recorded during its forward
# and backward pass. Every phase, every rank and both world sizes must agree exactly.

# %%
for W, by_layer in runs.items():
    for name, results in by_layer.items():
        hand, rows = bytes_by_hand([r["expert_idx"] for r in results], E, row_bytes=d * DTYPE.itemsize)
        for rank, (r, expected) in enumerate(zip(results, hand)):
            measured = {phase: (r["comm"]["sent"][phase], r["comm"]["received"][phase])
                        for phase in r["comm"]["sent"]}
            assert measured == expected, (W, name, rank, measured, expected)
            assert all(n == 1 for n in r["comm"]["calls"].values())  # one all-to-all per phase per step
hand4, rows4 = bytes_by_hand([r["expert_idx"] for r in runs[4]["dropless"]], E, row_bytes=d * 8)
print("hand count == CommStats, every phase of every rank, W = 2 and 4, dropless and capacity")
print(f"\nW=4, dropless, rank 0 (T={T} tokens, top-{k}, d={d}, float64):")
for phase, (s, rcv) in hand4[0].items():
    print(f"  {phase:<18} sent {s:>8} B   received {rcv:>8} B")
total = sum(s for s, _ in hand4[0].values())
print(f"  {'total':<18} sent {total:>8} B")

# %%
import numpy as np

fig, ax = plt.subplots(figsize=(4.8, 4))
traffic = (rows4 * d * 8).numpy()
network = np.where(np.eye(4, dtype=bool), np.nan, traffic)  # the diagonal is a local copy: left blank
im = ax.imshow(network, cmap="Blues", vmin=0)
for s in range(4):
    for t in range(4):
        ax.text(t, s, "local" if s == t else f"{traffic[s, t] / 1e3:.1f} kB", ha="center", va="center",
                fontsize=8,
                color="grey" if s == t
                else ("white" if traffic[s, t] > 0.6 * np.nanmax(network) else "black"))
ax.set_xticks(range(4))
ax.set_yticks(range(4))
ax.set_xlabel("destination rank (owns the expert)")
ax.set_ylabel("source rank (owns the token)")
ax.set_title("dispatch traffic, W=4 (bytes)")
fig.colorbar(im, ax=ax, label="bytes over the network")
plt.show()
off_diag = traffic.sum() - np.trace(traffic)
print(f"{off_diag / traffic.sum():.0%} of the routed bytes leave their rank (uniform routing: {3 / 4:.0%})")

# %% [markdown]
# The routing is not perfectly balanced, so some cells are larger than others. The rank that
# receives the most rows sets the pace for the whole step, because everyone waits in the
# combine. This is the systems reason behind the balancing losses of notebook 03.
#
# ## 7. Capacity vs dropless
#
# **Capacity factor** (GShard, Switch): each expert accepts at most
# $C = \lceil cf \cdot T k / E\rceil$ copies from a rank, and the rest are dropped (they skip the
# layer through the residual connection). Every buffer then has a fixed size known in advance:
# rank $r$ can send each other rank a padded block of $E_\text{local}\cdot C$ rows. The all-to-all
# has equal splits and static shapes, with no count exchange and no data-dependent allocation.
# This suited TPUs and XLA. The price is dropped tokens, plus bytes spent on padding.
#
# **Dropless** (MegaBlocks; DeepSeek-V3 drops no tokens in training or inference): every copy
# travels. The splits depend on the data, so the counts must be exchanged first, and a rank's
# receive buffer can grow up to $W\cdot T\cdot\min(k, E_\text{local})$ rows when many tokens pick
# its experts. That is why balance matters even without drops.
#
# Compare the two layers of section 6 on the same tokens and routers:

# %%
W = 4
res_dl, res_cap = runs[W]["dropless"], runs[W]["capacity 1.0"]
cap = -(-int(cfg_cap.capacity_factor * T * k) // E)  # ceil(cf * T * k / E)
row_b = d * 8
sent_dl = [r["comm"]["sent"]["dispatch"] for r in res_dl]
sent_cap = [r["comm"]["sent"]["dispatch"] for r in res_cap]
padded = [(W - 1) * (E // W) * cap * row_b] * W  # fixed-size buffers: E_local * C rows to each other rank
dropped = [r["dropped"] for r in res_cap]
_, rows_cap = bytes_by_hand([r["expert_idx"] for r in res_cap], E, row_b)
_, rows_dl = bytes_by_hand([r["expert_idx"] for r in res_dl], E, row_b)
print(f"capacity C = {cap} copies per expert per source rank; dropped copies per rank: {dropped}")
print(f"rows each rank computes: dropless {rows_dl.sum(0).tolist()}, capacity {rows_cap.sum(0).tolist()} "
      f"(capacity bound W * E_local * C = {W * (E // W) * cap})")

fig, ax = plt.subplots(figsize=(6.5, 3.6))
xpos = np.arange(W)
for i, (label, vals) in enumerate([("dropless", sent_dl), ("capacity 1.0 (only kept rows)", sent_cap),
                                   ("capacity 1.0, padded fixed buffers", padded)]):
    ax.bar(xpos + (i - 1) * 0.27, [v / 1e3 for v in vals], width=0.27, label=label)
ax.set_xticks(xpos, [f"rank {r}" for r in range(W)])
ax.set_xlabel("sending rank")
ax.set_ylabel("dispatch bytes sent (kB)")
ax.set_title(f"dispatch traffic, W={W}, T={T} tokens per rank, top-{k}")
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
plt.show()

assert sum(dropped) > 0  # the capacity limit really bit
assert all(c <= dl for c, dl in zip(sent_cap, sent_dl))  # dropped copies never travel
assert all(c <= p for c, p in zip(sent_cap, padded))  # the padded buffer always fits what is kept
assert int(rows_cap.sum(0).max()) <= W * (E // W) * cap  # capacity bounds every receive buffer

# %% [markdown]
# Capacity trades quality (dropped copies) for predictable shapes. Dropless keeps every token and
# sends only real rows, but needs the count exchange and balanced routing. DeepSeek-V3 chose
# dropless and keeps its experts balanced with the auxiliary-loss-free bias of notebook 03.
#
# ## 8. What changes on real GPUs
#
# **NCCL and torchrun.** On GPUs the same code runs with the NCCL back-end, one process per GPU,
# started by `torchrun`. It sets `RANK`, `WORLD_SIZE` and the rendezvous address for each process.
# The course's check takes both forms. Here it runs with gloo on this machine's CPUs, through
# `torch.distributed.run` (the module behind the `torchrun` command), in a temporary folder of its
# own that `run_torchrun` removes afterwards (torchrun leaves a `torchelastic_*` log folder behind):
#
# ```
# torchrun --nproc-per-node 8 -m moe_lab distributed --backend nccl --dtype float32 --tokens 4096
# ```

# %%
from moe_lab.distributed.launch import run_torchrun

out = run_torchrun(2, "--tokens", T, "--capacity-factor", "1.0", timeout=300)
print(out.stdout)
assert out.returncode == 0 and "match (tolerance" in out.stdout, out.stdout + out.stderr[-3000:]

# %% [markdown]
# With two or more GPUs the same check runs from this notebook, one GPU per rank:

# %%
from moe_lab.distributed.workers import moe_layer_check

n_gpus = torch.cuda.device_count()
if n_gpus >= 2:
    (res, *_) = launch(moe_layer_check, n_gpus, 1024, 256, 8 * n_gpus, 2, 512, backend="nccl", timeout=300)
    print({key: f"{v:.1e}" for key, v in res.items() if key.startswith("max_err")})
    assert max(v for key, v in res.items() if key.startswith("max_err")) < TOL
else:
    print(f"{n_gpus} GPU(s) here: the NCCL run needs at least 2 (one per rank); skipped")

# %% [markdown]
# **Overlapping communication with compute.** Our layer is serial: dispatch, then compute, then
# combine, with the GPU's arithmetic units idle during the exchanges. Real systems hide the
# exchanges behind work that does not depend on them:
# - the **shared experts** need no exchange, so they can run while the dispatch is in flight
#   (launch the all-to-all with `async_op=True`, compute, then `wait()` on the handle);
# - split the batch into two **micro-batches**, and compute one while the other communicates.
#   DeepSeek-V3's *DualPipe* schedule pairs a forward chunk with a backward chunk so that the
#   all-to-alls of one overlap the computation of the other. It gives the communication kernels a
#   fixed share of the GPU's SMs (20 of the H800's 132).
#
# **Node-limited routing.** Inside a node GPUs talk over NVLink (DeepSeek-V3's H800s: about
# 160 GB/s). Between nodes, InfiniBand gives about 50 GB/s, so inter-node traffic is the
# bottleneck. DeepSeek-V3 therefore sends each token to experts on at most $M = 4$ nodes. It
# scores each node by the sum of its best $k/M$ expert affinities, keeps the $M$ best nodes, and
# picks the top-k experts among those nodes only. A token crosses InfiniBand once per node, not
# once per expert. Inside the node, NVLink forwards it to every chosen expert. **Exercise**: write
# it (experts `i * E / n_nodes` to `(i + 1) * E / n_nodes - 1` live on node i). Then measure what the
# limit buys with DeepSeek-V3's shape (256 experts on 8 nodes, top-8) and random affinities.

# %%
def node_limited_topk(scores, n_nodes, max_nodes, k):
    """DeepSeek-V3 node-limited routing: top-k experts among the max_nodes best nodes of each token."""
    # BEGIN SOLUTION
    T_, E_ = scores.shape
    per_node = scores.view(T_, n_nodes, E_ // n_nodes)  # (T, nodes, experts per node)
    node_score = per_node.topk(k // max_nodes, dim=-1).values.sum(-1)  # (T, nodes)
    top_nodes = node_score.topk(max_nodes, -1).indices  # (T, max_nodes)
    keep = torch.zeros(T_, n_nodes, dtype=torch.bool).scatter_(1, top_nodes, True)
    allowed = keep.repeat_interleave(E_ // n_nodes, dim=1)  # (T, E)
    return scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices  # (T, k)
    # END SOLUTION


checks.check_node_limited_topk(node_limited_topk)


def nodes_per_token(idx, n_nodes, experts_per_node):
    # (T,) distinct nodes each token visits
    return F.one_hot(idx // experts_per_node, n_nodes).amax(1).sum(-1)


n_nodes, M, n_tok = 8, 4, notebook_sizes("09", rt.mode)["routing_tokens"]
scores = torch.randn(n_tok, n_routed, generator=torch.Generator().manual_seed(0)).sigmoid()
free = nodes_per_token(scores.topk(top_k_v3, -1).indices, n_nodes, n_routed // n_nodes)
limited = nodes_per_token(node_limited_topk(scores, n_nodes, M, top_k_v3), n_nodes, n_routed // n_nodes)
print(f"nodes per token: plain top-{top_k_v3} {free.float().mean():.2f} (max {free.max()}), "
      f"node-limited {limited.float().mean():.2f} (max {limited.max()})")
print(f"inter-node copies per token: one per expert {top_k_v3}, one per node {free.float().mean():.2f}, "
      f"one per node with M={M}: {limited.float().mean():.2f}")

fig, ax = plt.subplots(figsize=(5.5, 3))
bins = np.arange(1, top_k_v3 + 2) - 0.5
ax.hist([free.numpy(), limited.numpy()], bins=bins, label=["plain top-8", f"node-limited, M={M}"])
ax.set_xlabel("distinct nodes a token's 8 experts live on")
ax.set_ylabel("tokens")
ax.set_title("256 experts on 8 nodes: node-limited routing")
ax.legend()
plt.show()
assert int(limited.max()) <= M < int(free.max())
assert limited.float().mean() < free.float().mean()

# %% [markdown]
# Our layer sends one row per (token, expert) pair, even when two of a token's experts share a
# rank. Production systems send each token once per node (or per GPU) and fan it out on arrival.
#
# **DeepEP** is DeepSeek's open-source library of all-to-all kernels for MoE dispatch and combine.
# Its *normal* kernels forward traffic from NVLink to RDMA and serve training and prefill. Its
# *low-latency* kernels use pure RDMA and serve decoding; they can overlap with compute through a
# hook that occupies no SMs. It supports FP8 dispatch: DeepSeek-V3 dispatches in FP8 and combines
# in BF16, which halves the dispatch bytes of our bf16 count. The steps are the ones you built
# here: counts, dispatch, a local grouped GEMM (notebook 06), combine.
#
# **Going further** (open questions, no checker)
# 1. Change `bytes_by_hand` to send each token once per destination rank, however many of its
#    experts live there. How many bytes does W=4 save for top-2? For top-8 with 32 experts?
# 2. Set `capacity_factor=2.0` for `layer_cap` and rerun sections 6 and 7. When does the padded
#    buffer cost more than dropless?
# 3. Pass `local_backend="reference"` in the cases of section 6. Every back-end must give the same result.
#
# ## Summary
# - Expert parallelism gives each of $W$ ranks $E/W$ experts and moves tokens instead of weights.
#   Router and shared experts stay replicated, and their gradients are summed over ranks.
# - One layer = route, dispatch (a count exchange, then the rows), compute, combine. Both exchanges
#   are all-to-alls, and the backward pass is the same exchanges with the splits swapped.
# - Bytes per rank per step: $4\times$ the routed copies that leave the rank $\times\, d \times$
#   bytes per element, plus a few counts. Our hand count equals `CommStats` exactly.
# - On 2 and 4 gloo processes the layer matches one process in outputs and in every gradient,
#   dropless and with a capacity limit.
# - Capacity gives fixed, padded buffers and drops tokens. Dropless sends only real rows but needs
#   counts and balance. On GPUs: NCCL, overlap, node-limited routing and kernels like DeepEP.
#
# ## Papers and further reading
# - Lepikhin et al. *GShard: Scaling giant models with conditional computation and automatic sharding* (2020): expert sharding, all-to-all, capacity and local group dispatching.
# - Fedus, Zoph, Shazeer. *Switch Transformers: scaling to trillion parameter models with simple and efficient sparsity* (2021): section 2.2 and figure 3 on distributing experts, capacity factor.
# - DeepSeek-AI. *DeepSeek-V3 technical report* (2024): node-limited routing, DualPipe, FP8 dispatch, the all-to-all kernels (section 3.2).
# - Rajbhandari et al. *DeepSpeed-MoE: advancing mixture-of-experts inference and training to power next-generation AI scale* (2022).
# - Hwang et al. *Tutel: adaptive mixture-of-experts at scale* (2023): switching parallelism at run time, overlapped all-to-all.
# - Gale et al. *MegaBlocks: efficient sparse training with mixture-of-experts* (2022): dropless MoE.
# - Dai et al. *DeepSeekMoE* (2024) and DeepSeek-AI's DeepEP repository (github.com/deepseek-ai/DeepEP).
