"""The experts' contract: what every expert back-end takes and returns, and its check.

Every back-end (`reference`, `sorted`, `grouped_mm` in moe_lab.model.experts; `triton` in
moe_lab.kernels.moe; `ep` in moe_lab.distributed) computes

    y[t] = sum_j  weights[t, j] * Expert_{expert_idx[t, j]}(x[t])
    Expert_e(x) = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]          (SwiGLU, Shazeer 2020)

on these tensors:

    x          (T, d)      token activations
    expert_idx (T, k)      int64, chosen experts; -1 marks an assignment dropped by the capacity
                           limit: it contributes nothing and costs no compute
    weights    (T, k)      routing weights (gradients flow into them)
    w1, w3     (E, d, f)   gate and up projections, laid out for `x @ w`
    w2         (E, f, d)   down projection
    returns    (T, d)      in x's dtype

It sits on the ground floor so that the model and the kernels both read it without importing each
other.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_expert_inputs(x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> None:
    """Raise a ValueError naming the argument when shapes or index ranges break the contract, and a
    TypeError naming the weight whose dtype differs from x's."""
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, d_model); got shape {tuple(x.shape)}")
    T, d = x.shape
    if expert_idx.shape != weights.shape or expert_idx.dim() != 2 or expert_idx.shape[0] != T:
        raise ValueError(
            f"expert_idx and weights must both be (tokens={T}, top_k); got {tuple(expert_idx.shape)} "
            f"and {tuple(weights.shape)}"
        )
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expert_idx must be an integer tensor; got {expert_idx.dtype}")
    if w1.dim() != 3 or w1.shape[1] != d or w3.shape != w1.shape:
        raise ValueError(f"w1 and w3 must be (n_experts, d_model={d}, d_expert); got {tuple(w1.shape)} and {tuple(w3.shape)}")
    E, _, f = w1.shape
    if w2.shape != (E, f, d):
        raise ValueError(f"w2 must be (n_experts={E}, d_expert={f}, d_model={d}); got {tuple(w2.shape)}")
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if w.dtype != x.dtype:  # the same message as the triton back-end gives
            raise TypeError(f"{name} has dtype {w.dtype} but x has {x.dtype}: x and the expert weights must share a dtype")
    # The range check reads values: one device synchronisation (skipped while a CUDA graph is captured,
    # where no synchronisation is allowed; the values were checked on the eager warm-up runs).
    capturing = expert_idx.is_cuda and torch.cuda.is_current_stream_capturing()
    if expert_idx.numel() and not capturing:
        lo, hi = (int(v) for v in torch.aminmax(expert_idx))
        if lo < -1 or hi >= E:
            raise ValueError(f"expert_idx must lie in [-1, {E - 1}] (-1 = dropped); got values in [{lo}, {hi}]")


def max_rel_diff(a: Tensor, b: Tensor, floor: float = 1e-12) -> float:
    """How far `a` is from the reference `b`: the largest |a - b| over the largest |b| (at least
    `floor`), in float64; 0 for empty tensors. The one measure of agreement between back-ends (the
    registry's agreement checks, the bench, the GPU suite)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor)
