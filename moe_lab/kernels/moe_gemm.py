"""Forward kernels of the MoE expert path: grouped GEMMs over the block-aligned layout of moe_routing.

With rows sorted by expert and padded to blocks of BLOCK_M (moe_align), every program owns one block
of rows of *one* expert, so a grouped GEMM is an ordinary tiled matmul whose B matrix is chosen per
block (MegaBlocks, Gale et al. 2022; vLLM's fused_moe). For SwiGLU experts (Shazeer 2020):

    1. up:      h[r]  = silu(x[tok(r)] @ w1[e]) * (x[tok(r)] @ w3[e])      rows r of expert e
                gathers the token rows itself (tok = flat index // top_k): no permuted copy of x;
                both projections share one load of x, SwiGLU runs in the epilogue.
    2. down:    o[a]  = weights[a] * (h[r] @ w2[e])                       a = sorted_ids[r]
                the routing weight is applied in the epilogue; each row is written to its
                assignment's slot in a (T*top_k, d) buffer (or, with combine="atomic", added into
                y (T, d) with atomics, whose order, hence rounding, changes from run to run).
    3. combine: y[t]  = sum_j o[t*top_k + j]  over the assignments that were not dropped,
                in the fixed order j = 0..top_k-1: the same bits on every run.

Configurations: compiled on a GPU, `triton.autotune` picks BLOCK_N / BLOCK_K / warps / stages for each
problem shape (set MOE_LAB_TRITON_AUTOTUNE=0 for one fixed configuration); under the interpreter there
is one small configuration. BLOCK_M is not tuned: it is fixed by the layout, chosen by `pick_block_m`.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from moe_lab.kernels import INTERPRETED

import triton  # noqa: E402  (after moe_lab.kernels: it decides whether kernels are interpreted)
import triton.language as tl  # noqa: E402

from moe_lab.kernels.moe_routing import MoEAlignment  # noqa: E402

AUTOTUNE: bool = not INTERPRETED and os.environ.get("MOE_LAB_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no")
"""Whether kernels are autotuned (compiled on a GPU, unless MOE_LAB_TRITON_AUTOTUNE=0)."""

POISON_OUTPUTS: bool = False
"""Debugging switch used by the tests: fill every buffer a kernel writes with NaN before the launch,
so an element the kernel forgot to write shows up as NaN instead of as stale memory."""


def new_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output buffer: uninitialised (kernels write every element that is read), NaN when poisoned."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _configs(interpreter: dict, gpu: list[dict]) -> list:
    """One small configuration under the interpreter (or with autotuning off), the GPU list otherwise."""
    chosen = gpu if AUTOTUNE else [interpreter if INTERPRETED else gpu[0]]
    out = []
    for c in chosen:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(meta, num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 1)))
    return out


# Kernels whose programs own a block of BLOCK_M sorted rows tune the output width and the reduction step.
ROW_BLOCK_CONFIGS = _configs(
    interpreter=dict(BLOCK_N=32, BLOCK_K=32),
    gpu=[dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
         dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
         dict(BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
         dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4)],
)


def pick_block_m(n_assignments: int, n_experts: int) -> int:
    """Rows per block of the layout: the power of two near the average rows per expert, at least 16
    (tl.dot's minimum when compiled) and at most 64 (padding wastes < 64 rows per expert); at most 32
    under the interpreter, which pays per program and per loop step, not per element."""
    avg = max(1, n_assignments // max(1, n_experts))
    return min(32 if INTERPRETED else 64, max(16, triton.next_power_of_2(avg)))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: "ieee" keeps float32 exact like torch's default matmul (TF32 would be
    ~1e-3 off); 16-bit inputs run on tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# 1. Up projection with SwiGLU in the epilogue
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=ROW_BLOCK_CONFIGS, key=["d", "f", "BLOCK_M"])
@triton.jit
def moe_up_kernel(
    x_ptr,  # (T, d) token activations, read row by row through the gather
    w1_ptr, w3_ptr,  # (E, d, f) gate and up projections (w3 has w1's strides)
    h_ptr,  # (max_rows, f) out: silu(x @ w1[e]) * (x @ w3[e]) for each sorted row
    a1_ptr, a3_ptr,  # (max_rows, f) out when SAVE_PREACT: x @ w1[e] and x @ w3[e], for the backward
    sorted_ids_ptr,  # (max_rows,) flat assignment index of each row; >= n_assignments marks padding
    block_expert_ptr,  # (max_blocks,) expert of each block of BLOCK_M rows; -1: unused block
    n_assignments,  # T * TOP_K, the padding sentinel
    d, f,  # the reduction width (x's columns) and the output width (the expert's hidden size)
    stride_xt, stride_xd,  # x's strides (token, feature)
    stride_we, stride_wd, stride_wf,  # w1's and w3's strides (expert, d, f)
    stride_hr, stride_hf,  # h's strides (row, column), shared by a1 and a3
    TOP_K: tl.constexpr,  # assignments per token: token = flat index // TOP_K
    SAVE_PREACT: tl.constexpr,  # also write a1 and a3 (training)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32, see dot_precision
    BLOCK_M: tl.constexpr,  # rows per program; equals the layout's block_m
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction step
):
    pid_m = tl.program_id(0)  # which block of sorted rows (consecutive programs share the w tile)
    pid_n = tl.program_id(1)  # which block of the f columns
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:  # past the last used row: nothing to do
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) sorted rows
    flat = tl.load(sorted_ids_ptr + offs_m)  # (BLOCK_M,) assignment index of each row
    row_ok = flat < n_assignments  # padding rows compute zeros and are not stored
    tok = (flat // TOP_K).to(tl.int64)  # (BLOCK_M,) the token each row gathers from x
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_ok = offs_n < f

    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    # Pointers to the first K-step's tiles; the loop moves them along K by BLOCK_K.
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd  # (BLOCK_M, BLOCK_K) gathered rows
    w_off = e * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wf  # (BLOCK_K, BLOCK_N)
    w1_ptrs = w1_ptr + w_off
    w3_ptrs = w3_ptr + w_off
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x @ w1[e]
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x @ w3[e]
    for k0 in range(0, d, BLOCK_K):
        k_ok = offs_k < d - k0  # the last step may be partial
        xa = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # loaded once, used twice
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc1 = tl.dot(xa, tl.load(w1_ptrs, mask=w_mask, other=0.0), acc1, input_precision=DOT_PRECISION)
        acc3 = tl.dot(xa, tl.load(w3_ptrs, mask=w_mask, other=0.0), acc3, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w1_ptrs += BLOCK_K * stride_wd
        w3_ptrs += BLOCK_K * stride_wd

    h = acc1 * tl.sigmoid(acc1) * acc3  # SwiGLU in float32: silu(a1) * a3
    out_off = offs_m.to(tl.int64)[:, None] * stride_hr + offs_n[None, :] * stride_hf  # (BLOCK_M, BLOCK_N)
    out_mask = row_ok[:, None] & n_ok[None, :]
    tl.store(h_ptr + out_off, h.to(h_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_PREACT:
        tl.store(a1_ptr + out_off, acc1.to(a1_ptr.dtype.element_ty), mask=out_mask)
        tl.store(a3_ptr + out_off, acc3.to(a3_ptr.dtype.element_ty), mask=out_mask)


def moe_up(x: Tensor, w1: Tensor, w3: Tensor, align: MoEAlignment, save_preact: bool = False):
    """Launch `moe_up_kernel`. Returns (h, a1, a3), each (max_rows, f) in x's dtype, rows in the
    layout's order (only rows of real assignments are written); a1 = a3 = None unless save_preact."""
    if w3.stride() != w1.stride():  # the kernel walks both with one set of strides
        w1, w3 = w1.contiguous(), w3.contiguous()
    f = w1.shape[2]
    h = new_buffer((align.max_rows, f), x.dtype, x.device)
    a1 = new_buffer(h.shape, x.dtype, x.device) if save_preact else None
    a3 = new_buffer(h.shape, x.dtype, x.device) if save_preact else None
    if align.max_blocks == 0 or f == 0:
        return h, a1, a3
    grid = lambda meta: (align.max_blocks, triton.cdiv(f, meta["BLOCK_N"]))  # noqa: E731
    moe_up_kernel[grid](
        x, w1, w3, h, a1 if save_preact else h, a3 if save_preact else h,
        align.sorted_ids, align.block_expert, align.n_assignments, x.shape[1], f,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0), h.stride(1),
        TOP_K=align.top_k, SAVE_PREACT=save_preact, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=align.block_m,
    )
    return h, a1, a3


# ----------------------------------------------------------------------------------------------
# 2. Down projection, weighted in the epilogue, written to each assignment's slot
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=ROW_BLOCK_CONFIGS, key=["f", "d", "BLOCK_M"], reset_to_zero=["out_ptr"])
@triton.jit
def moe_down_kernel(
    h_ptr,  # (max_rows, f) the up kernel's output, in the layout's row order
    w2_ptr,  # (E, f, d) down projections
    weights_ptr,  # (T * TOP_K,) routing weight of each assignment (any float dtype)
    out_ptr,  # ATOMIC=False: (T * TOP_K, d) one row per assignment; ATOMIC=True: (T, d) float32, zeroed
    sorted_ids_ptr,  # (max_rows,) flat assignment index of each row; >= n_assignments marks padding
    block_expert_ptr,  # (max_blocks,) expert of each block; -1: unused
    n_assignments,  # T * TOP_K
    f, d,  # the reduction width and the output width
    stride_hr, stride_hf,  # h's strides
    stride_we, stride_wf, stride_wd,  # w2's strides (expert, f, d)
    stride_or, stride_od,  # out's strides (row, column)
    TOP_K: tl.constexpr,  # assignments per token
    ATOMIC: tl.constexpr,  # add into y[token] with atomics instead of writing the assignment's row
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) sorted rows = rows of h
    flat = tl.load(sorted_ids_ptr + offs_m)
    row_ok = flat < n_assignments
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns (d)
    n_ok = offs_n < d

    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hr + offs_k[None, :] * stride_hf  # (BLOCK_M, BLOCK_K)
    w_ptrs = w2_ptr + e * stride_we + offs_k[:, None] * stride_wf + offs_n[None, :] * stride_wd  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, f, BLOCK_K):
        k_ok = offs_k < f - k0
        ha = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(ha, tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc,
                     input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hf
        w_ptrs += BLOCK_K * stride_wf

    gate = tl.load(weights_ptr + flat, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_M,)
    acc = acc * gate[:, None]  # weight each expert output by its routing weight
    mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tok = (flat // TOP_K).to(tl.int64)
        tl.atomic_add(out_ptr + tok[:, None] * stride_or + offs_n[None, :] * stride_od, acc, mask=mask)
    else:
        out_off = flat.to(tl.int64)[:, None] * stride_or + offs_n[None, :] * stride_od
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# 3. Combine: sum each token's assignment rows in a fixed order
# ----------------------------------------------------------------------------------------------
@triton.jit
def moe_combine_kernel(
    buf_ptr,  # (T * TOP_K, d) one row per assignment; rows of dropped assignments are never read
    expert_idx_ptr,  # (T * TOP_K,) expert of each assignment, -1 = dropped
    y_ptr,  # (T, d) out
    T, d,  # tokens and row width
    stride_br, stride_bd,  # buf's strides
    stride_yt, stride_yd,  # y's strides
    TOP_K: tl.constexpr,  # assignments per token, summed in the order 0..TOP_K-1
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,  # tokens and columns per program
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    t_ok = offs_t < T
    d_ok = offs_d < d
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # unrolled at compile time: a fixed summation order
        a = offs_t.to(tl.int64) * TOP_K + j  # (BLOCK_T,) flat assignment index
        routed = tl.load(expert_idx_ptr + a, mask=t_ok, other=-1) >= 0
        v = tl.load(buf_ptr + a[:, None] * stride_br + offs_d[None, :] * stride_bd,
                    mask=routed[:, None] & d_ok[None, :], other=0.0)
        acc += v.to(tl.float32)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_d[None, :] * stride_yd,
             acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


def moe_combine(buf: Tensor, expert_idx: Tensor) -> Tensor:
    """y (T, d) = sum over the routed j of buf[t * top_k + j], in buf's dtype (accumulated in float32)."""
    T, top_k = expert_idx.shape
    d = buf.shape[1]
    y = new_buffer((T, d), buf.dtype, buf.device)
    if T == 0 or d == 0:
        return y
    block_t, block_d = (32, 32) if INTERPRETED else (16, 128)
    grid = (triton.cdiv(T, block_t), triton.cdiv(d, block_d))
    moe_combine_kernel[grid](buf, expert_idx.reshape(-1).contiguous(), y, T, d, buf.stride(0), buf.stride(1),
                             y.stride(0), y.stride(1), TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d)
    return y


def moe_down(h: Tensor, w2: Tensor, weights: Tensor, expert_idx: Tensor, align: MoEAlignment,
             combine: str = "ordered") -> Tensor:
    """Launch `moe_down_kernel` and combine: y (T, d) in h's dtype. combine="ordered" (default) writes
    each assignment's row and sums them in a fixed order; "atomic" adds into y with atomics."""
    T = expert_idx.shape[0]
    d = w2.shape[2]
    A = align.n_assignments
    atomic = combine == "atomic"
    if atomic:
        out = torch.zeros((T, d), dtype=torch.float32, device=h.device)  # atomics add into zeros
    else:
        out = new_buffer((A, d), h.dtype, h.device)  # (T * top_k, d)
    if align.max_blocks and d:
        grid = lambda meta: (align.max_blocks, triton.cdiv(d, meta["BLOCK_N"]))  # noqa: E731
        moe_down_kernel[grid](
            h, w2, weights.reshape(-1), out, align.sorted_ids, align.block_expert, A, w2.shape[1], d,
            h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0), out.stride(1),
            TOP_K=align.top_k, ATOMIC=atomic, DOT_PRECISION=dot_precision(h.dtype), BLOCK_M=align.block_m,
        )
    return out.to(h.dtype) if atomic else moe_combine(out, expert_idx)
