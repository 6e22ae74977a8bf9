"""Expert back-ends: the part of an MoE layer that runs each token through its chosen experts.

Every back-end computes the same function (DeepSeekMoE / Mixtral style SwiGLU experts):

    y[t] = sum_j  weights[t, j] * Expert_{expert_idx[t, j]}(x[t])
    Expert_e(x) = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]          (SwiGLU, Shazeer 2020)

The contract shared by all back-ends (`reference`, `sorted`, `grouped_mm` here; `triton` in
moe_lab.kernels.moe; `ep` in moe_lab.distributed; their registry, names and dispatch in
moe_lab.model.expert_backends) is written, with its check, in moe_lab.core.contract.

`reference` is the readable truth: a loop over experts. `sorted` permutes the token copies once so
that each expert's tokens are contiguous, then runs one matmul per expert on a slice: the layout the
Triton kernels of notebook 06 use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lab.core.contract import check_expert_inputs


def swiglu_expert(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """One SwiGLU expert on a block of rows: (n, d) -> (n, d)."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2  # (n, f) * (n, f) -> (n, f) @ (f, d)


def experts_reference(x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Loop over experts; gather each expert's tokens, run it, scatter-add back (the readable truth)."""
    check_expert_inputs(x, expert_idx, weights, w1, w3, w2)
    y = torch.zeros_like(x)  # (T, d)
    for e in range(w1.shape[0]):
        token, slot = torch.where(expert_idx == e)  # (n_e,), (n_e,): which tokens chose e, in which slot
        if token.numel() == 0:
            continue  # an expert with no tokens does no work
        out = swiglu_expert(x[token], w1[e], w3[e], w2[e])  # (n_e, d)
        y = y.index_add(0, token, out * weights[token, slot, None].to(x.dtype))
    return y


def sort_by_expert(expert_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Routing metadata of the sorted layout.

    Returns (order, token_of, counts):
      order    (N,)  positions in the flattened (T*k,) assignments, sorted by expert (dropped removed)
      token_of (N,)  the token each sorted row comes from (= order // k)
      counts   (E,)  rows per expert, so expert e owns rows [offsets[e], offsets[e] + counts[e])
    """
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)  # (T*k,)
    order = torch.argsort(flat, stable=True)  # dropped (-1) sort first
    order = order[flat[order] >= 0]  # (N,) keep routed assignments only
    counts = torch.bincount(flat[order], minlength=n_experts)  # (E,)
    return order, order // k, counts


def experts_sorted(x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Permute token copies once so each expert's rows are contiguous, then one matmul per slice."""
    check_expert_inputs(x, expert_idx, weights, w1, w3, w2)
    E = w1.shape[0]
    order, token_of, counts = sort_by_expert(expert_idx, E)
    xs = x[token_of]  # (N, d): token copies, grouped by expert
    outs = []
    for e, rows in enumerate(torch.split(xs, counts.tolist())):
        if rows.shape[0]:
            outs.append(swiglu_expert(rows, w1[e], w3[e], w2[e]))  # (n_e, d)
    if not outs:
        return torch.zeros_like(x)
    out = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)  # (N, d) weighted
    return torch.zeros_like(x).index_add(0, token_of, out)  # un-permute and combine: (T, d)


def experts_grouped_mm(x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """The `sorted` layout with each projection as one `torch._grouped_mm` call over all experts (one
    launch per projection instead of one per expert; where this torch has it: expert_backends.status)."""
    check_expert_inputs(x, expert_idx, weights, w1, w3, w2)
    order, token_of, counts = sort_by_expert(expert_idx, w1.shape[0])
    offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
    xs = x[token_of]  # (N, d) token copies grouped by expert
    h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)  # (N, f)
    out = torch._grouped_mm(h, w2, offs=offs) * weights.reshape(-1)[order, None].to(x.dtype)  # (N, d)
    return torch.zeros_like(x).index_add(0, token_of, out)  # (T, d)
