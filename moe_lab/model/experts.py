"""Expert back-ends: the part of an MoE layer that runs each token through its chosen experts.

Every back-end computes the same function (DeepSeekMoE / Mixtral style SwiGLU experts):

    y[t] = sum_j  weights[t, j] * Expert_{expert_idx[t, j]}(x[t])
    Expert_e(x) = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]          (SwiGLU, Shazeer 2020)

The contract shared by all back-ends (`reference`, `sorted`, `grouped_mm` here; `triton` in
moe_lab.kernels.moe; `ep` in moe_lab.distributed; their registry, names and dispatch in
moe_lab.model.expert_backends) is written, with its check, in moe_lab.core.contract.

`reference` is the readable truth: a loop over experts. `sorted` permutes the token copies once so
that each expert's tokens are contiguous, then runs one matmul per expert on a slice: the layout the
Triton kernels of notebook 06 use. `padded` gives every expert a block of the same number of rows
(the busiest expert's count; the rest padding), so that the gate and up projections of all experts
are one batched matmul and the down projection another: a handful of larger operations per layer
instead of a few per expert, which is what a CPU running tiny experts pays for (issue 26).
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


def padded_layout(expert_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor, int]:
    """Routing metadata of the padded layout: expert e owns rows [e*C, (e+1)*C), C = the busiest
    expert's number of assignments; rows an expert does not fill are padding.

    Returns (slot, token_of, C):
      slot      (T*k,)  the row of each assignment of the flattened (T, k); E*C (one past the end) if dropped
      token_of  (E*C,)  the token each row holds (token 0 on padding rows, whose routing weight is 0)
      C         rows per expert (0 when nothing is routed)
    Within an expert, rows follow the flattened assignments' order (token by token)."""
    T, k = expert_idx.shape
    flat = expert_idx.reshape(-1)  # (T*k,)
    routed = flat >= 0
    onehot = F.one_hot(flat.clamp_min(0), n_experts) * routed[:, None]  # (T*k, E)
    place = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (T*k,) place in its expert's block
    C = int(onehot.sum(0).max()) if flat.numel() else 0
    slot = torch.where(routed, flat * C + place, n_experts * C)  # (T*k,)
    token = torch.arange(T * k, device=flat.device) // k  # (T*k,) the token of each assignment
    token_of = torch.zeros(n_experts * C + 1, dtype=torch.long, device=flat.device).index_copy_(0, slot, token)
    return slot, token_of[:-1], C


PADDED_MAX_ROWS = 1.5  # `padded` pads at most to this many times the routed rows, else runs `sorted`


def experts_padded(x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Every expert's rows padded to the busiest expert's count: one gather, the gate and up projections
    of all experts as one batched matmul, the down projection as another, one scatter. Padding costs
    FLOPs in proportion to the imbalance (max load / mean load), never a wrong value: a padding row
    carries routing weight 0, so it adds 0 to the output and to every gradient. Where the padded rows
    would exceed PADDED_MAX_ROWS times the routed ones (a badly balanced layer: the padding would cost
    more than the per-expert launches it saves), it runs `experts_sorted` instead."""
    check_expert_inputs(x, expert_idx, weights, w1, w3, w2)
    E, d, f = w1.shape
    slot, token_of, C = padded_layout(expert_idx, E)
    if C == 0:
        return torch.zeros_like(x)
    if E * C > PADDED_MAX_ROWS * max(int((expert_idx >= 0).sum()), 1):
        return experts_sorted(x, expert_idx, weights, w1, w3, w2)
    w_row = x.new_zeros(E * C + 1).index_copy(0, slot, weights.reshape(-1).to(x.dtype))[:-1]  # (E*C,)
    xs = x[token_of].view(E, C, d)  # (E, C, d): the one gather
    a1, a3 = torch.bmm(xs, torch.cat([w1, w3], dim=2)).chunk(2, dim=-1)  # (E, C, 2f) -> 2 x (E, C, f)
    out = torch.bmm(F.silu(a1) * a3, w2).view(E * C, d) * w_row[:, None]  # (E*C, d) weighted
    return torch.zeros_like(x).index_add(0, token_of, out)  # the one scatter: (T, d)
