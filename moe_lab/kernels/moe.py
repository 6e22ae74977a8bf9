"""The MoE expert path in Triton (notebook 06): the `triton` back-end of moe_lab.model.experts.

It computes what `experts_reference` computes (SwiGLU experts, Shazeer 2020; top-k routing as in
Switch / GShard / DeepSeekMoE):

    y[t] = sum_j weights[t, j] * (silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e],   e = expert_idx[t, j]

in four steps, each in its own module:

    1. moe_routing.moe_align     sort the T*top_k assignments by expert, pad each expert to blocks
                                 (torch ops on the device; one Triton program, moe_align_triton,
                                 for small layers on a GPU)
    2. moe_gemm.moe_up           grouped GEMM, gathers token rows, x@w1 and x@w3 together, SwiGLU
    3. moe_gemm.moe_down         grouped GEMM h@w2, routing weight in the epilogue, combined per token
                                 in a fixed order (deterministic) or with atomics
    4. moe_backward              gradients of x, weights, w1, w3, w2 over the same layout

`MoEExpertsFunction` ties them into autograd; `experts_triton` is the back-end's entry point.

Memory traffic, N = routed assignments (about T * top_k): the `sorted` torch back-end writes and reads
back a permuted copy of x (N x d), a1, a3 and h (N x f each, plus silu's output), and the expert
outputs (N x d) before index_add. The kernels gather x's rows inside the up GEMM (no copy), keep a1
and a3 in registers unless training needs them, and write one (N x d) buffer that the combine reads
once: at inference h (N x f) is the only intermediate that goes through memory besides that buffer.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from moe_lab.core.runtime import align_in_one_launch
from moe_lab.kernels import INTERPRETED, check_device, check_dtype_supported
from moe_lab.kernels import config_table as CT
from moe_lab.kernels import moe_gemm
from moe_lab.kernels.moe_backward import moe_experts_backward
from moe_lab.kernels.moe_gemm import kernel_choice, moe_combine, moe_down, moe_up, pick_block_m
from moe_lab.kernels.moe_align_triton import MAX_ASSIGNMENTS, MAX_EXPERTS, moe_align_triton
from moe_lab.kernels.moe_routing import MoEAlignment, moe_align, moe_align_reference
from moe_lab.core.contract import check_expert_inputs

Combine = Literal["ordered", "atomic"]


_last_choice: Optional[CT.Choice] = None

ALIGN_IN_ONE_LAUNCH: bool = not INTERPRETED and align_in_one_launch()
"""On a GPU, small layouts are built by moe_align_triton (one launch) instead of moe_align's torch ops
(about twenty launches); MOE_LAB_ALIGN=torch turns that off. Both give the same layout."""


def align_layout(expert_idx: Tensor, n_experts: int, block_m: int) -> MoEAlignment:
    """The block-aligned layout, built the cheapest way for its size (the same layout either way)."""
    if ALIGN_IN_ONE_LAUNCH and expert_idx.numel() <= MAX_ASSIGNMENTS and n_experts <= MAX_EXPERTS:
        return moe_align_triton(expert_idx, n_experts, block_m)
    return moe_align(expert_idx, n_experts, block_m)


def last_choice() -> Optional[CT.Choice]:
    """The kernel configurations the last call of the triton back-end used, and where they came from
    (print config_table.describe(last_choice()))."""
    return _last_choice


class MoEExpertsFunction(torch.autograd.Function):
    """Autograd for the Triton expert path. Saves x, the routing, the weights and the forward's
    (max_rows, f) buffers h, a1 = x@w1, a3 = x@w3 (3 * rows * f elements), so the backward
    recomputes nothing."""

    @staticmethod
    def forward(ctx, x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
                block_m: Optional[int], combine: str, choice: Optional[CT.Choice] = None) -> Tensor:
        global _last_choice
        training = any(ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5))
        T, top_k = expert_idx.shape
        E, d, f = w1.shape
        # One lookup per call: the layout's block_m and every kernel's configuration (config_table).
        if choice is None:
            choice = kernel_choice(x.dtype, x.device, d, f, E, top_k, T, training, block_m=block_m)
        _last_choice = choice
        configs = None if moe_gemm.AUTOTUNE else choice.configs
        align = align_layout(expert_idx, E, choice.block_m)
        h, a1, a3 = moe_up(x, w1, w3, align, save_preact=training, config=configs and configs["up"])  # (max_rows, f)
        y = moe_down(h, w2, weights, expert_idx, align, combine=combine, config=configs and configs["down"])  # (T, d)
        if training:
            ctx.save_for_backward(x, expert_idx, weights, w1, w3, w2, h, a1, a3,
                                  align.counts, align.offsets, align.sorted_ids, align.block_expert)
            ctx.layout = (align.block_m, align.top_k, align.n_assignments)
            ctx.combine = combine
            ctx.configs = configs
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, expert_idx, weights, w1, w3, w2, h, a1, a3, counts, offsets, sorted_ids, block_expert = ctx.saved_tensors
        block_m, top_k, n_assignments = ctx.layout
        align = MoEAlignment(counts, offsets, sorted_ids, block_expert, block_m, top_k, n_assignments)
        n = ctx.needs_input_grad
        dx, dweights, dw1, dw3, dw2 = moe_experts_backward(
            dy, x, expert_idx, weights, w1, w3, w2, h, a1, a3, align,
            needs=(n[0], n[2], n[3], n[4], n[5]), combine=ctx.combine, configs=ctx.configs,
        )
        return dx, None, dweights, dw1, dw3, dw2, None, None, None


def experts_triton(x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, *,
                   block_m: Optional[int] = None, combine: Combine = "ordered",
                   choice: Optional[CT.Choice] = None) -> Tensor:
    """The `triton` expert back-end: same contract as moe_lab.model.experts.experts_reference.

    x (T, d), expert_idx (T, top_k) with -1 = dropped, weights (T, top_k), w1 and w3 (E, d, f),
    w2 (E, f, d); returns (T, d) in x's dtype, differentiable in x, weights, w1, w3 and w2.
    x and the expert weights share one dtype: float32 or float16 anywhere, bfloat16 on a GPU only.
    block_m: rows per block of the sorted layout (default: the device's tuned table, else the row block
    nearest the average rows per expert; >= 16 when compiled). The kernels' other parameters come
    from moe_lab.kernels.config_table (`last_choice()` says which ran and why).
    combine: "ordered" sums each token's expert outputs in a fixed order (the same bits every run);
    "atomic" adds them with atomics (no (T*top_k, d) buffer, but the rounding varies run to run).
    choice: force every kernel's configuration (a config_table.Choice, e.g. to compare two of them);
    its block_m is the layout's.
    """
    check_expert_inputs(x, expert_idx, weights, w1, w3, w2)  # shapes, index range and one dtype for x and weights
    check_dtype_supported(x=x, weights=weights, w1=w1, w3=w3, w2=w2)
    check_device(x=x, expert_idx=expert_idx, weights=weights, w1=w1, w3=w3, w2=w2)
    if combine not in ("ordered", "atomic"):
        raise ValueError(f"combine={combine!r}: expected 'ordered' or 'atomic'")
    if block_m is not None and (block_m < 1 or block_m & (block_m - 1) or (block_m < 16 and not INTERPRETED)):
        raise ValueError(f"block_m must be a power of two (>= 16 when compiled: tl.dot's minimum); got {block_m}")
    if choice is not None:
        missing = [k for k in CT.KERNELS if k not in choice.configs]
        if missing:
            raise ValueError(f"choice lacks configurations for {missing}")
        bad = [k for k in CT.ROW_KERNELS if choice.configs[k].BLOCK_M != choice.block_m]
        if bad:
            raise ValueError(f"choice: the row-block kernels {bad} must use the layout's block_m={choice.block_m}")
    return MoEExpertsFunction.apply(x, expert_idx, weights, w1, w3, w2, block_m, combine, choice)


__all__ = ["MoEAlignment", "MoEExpertsFunction", "align_layout", "experts_triton", "last_choice", "moe_align",
           "moe_align_reference", "moe_align_triton", "moe_combine", "moe_down", "moe_experts_backward", "moe_up",
           "pick_block_m"]
