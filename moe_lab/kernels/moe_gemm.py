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

Program order. The row-block kernels run on a one-dimensional grid of (row blocks) x (column tiles)
programs. `row_block_tile` maps a program to its tile: GROUP_M row blocks walk the column tiles
together, so with GROUP_M = 1 all column tiles of one row block run back to back (its gathered rows
are read from memory once, and the expert's weights stay in L2 while its row blocks pass); with a
large GROUP_M, neighbouring programs share a weight tile across many row blocks. Which is faster
depends on the shape: the tuner measures it.

Configurations (BLOCK_N, BLOCK_K, GROUP_M, warps, stages; BLOCK_M is the layout's): picked by
moe_lab.kernels.config_table from the device's tuned table, or its heuristic, with no timing at run
time; `MOE_LAB_TRITON_AUTOTUNE=1` opts into `triton.autotune` instead. Under the interpreter there is
one small configuration. Sizes that change with the number of tokens (n_assignments, the number of
row blocks) are plain arguments, not specialised by the compiler, so a sweep over token counts
compiles each kernel once per configuration.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from moe_lab.core.runtime import triton_autotune
from moe_lab.kernels import INTERPRETED
from moe_lab.kernels import config_table as CT

import triton  # noqa: E402  (after moe_lab.kernels: it decides whether kernels are interpreted)
import triton.language as tl  # noqa: E402

from moe_lab.kernels.moe_routing import MoEAlignment  # noqa: E402

AUTOTUNE: bool = not INTERPRETED and triton_autotune()
"""Opt-in: time configurations with `triton.autotune` on each new shape instead of using the tuned
table (MOE_LAB_TRITON_AUTOTUNE=1; notebook 07 shows what it does)."""

POISON_OUTPUTS: bool = False
"""Debugging switch used by the tests: fill every buffer a kernel writes with NaN before the launch,
so an element the kernel forgot to write shows up as NaN instead of as stale memory."""


@contextmanager
def poisoned_outputs():
    """Within the block, every buffer a kernel writes starts as NaN (POISON_OUTPUTS), so an element a
    kernel forgot to write reads NaN instead of stale memory."""
    global POISON_OUTPUTS
    before, POISON_OUTPUTS = POISON_OUTPUTS, True
    try:
        yield
    finally:
        POISON_OUTPUTS = before


def new_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output buffer: uninitialised (kernels write every element that is read), NaN when poisoned."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kernel_choice(dtype: torch.dtype, device, d_model: int, d_expert: int, n_experts: int, top_k: int, tokens: int,
                  training: bool, block_m: Optional[int] = None) -> CT.Choice:
    """The configurations of every kernel for one call of the expert path (see config_table.choose):
    the interpreter's, the device's tuned table's, or the heuristic's. Remembered per problem, so a
    call costs a dictionary lookup."""
    dev = torch.device(device)
    index = None if INTERPRETED or dev.type != "cuda" else (dev.index if dev.index is not None else torch.cuda.current_device())
    return _kernel_choice(dtype, index, d_model, d_expert, n_experts, top_k, tokens, training, block_m)


@lru_cache(maxsize=4096)
def _kernel_choice(dtype, cuda_index, d_model, d_expert, n_experts, top_k, tokens, training, block_m) -> CT.Choice:
    if INTERPRETED or cuda_index is None:
        return CT.choose(dtype, d_model, d_expert, n_experts, top_k, tokens, training, interpreted=True, block_m=block_m)
    limits = CT.device_limits(torch.device("cuda", cuda_index))
    return CT.choose(dtype, d_model, d_expert, n_experts, top_k, tokens, training, limits=limits,
                     table=CT.table_for(limits.name), block_m=block_m)


def config_for(kernel: str, align: MoEAlignment, dtype: torch.dtype, device, d_model: int, d_expert: int,
               training: bool = False) -> CT.KernelConfig:
    """The configuration of one kernel over an existing layout (its block_m is kept)."""
    n_experts = align.counts.numel()
    tokens = align.n_assignments // max(1, align.top_k)
    return kernel_choice(dtype, device, d_model, d_expert, n_experts, align.top_k, tokens, training,
                         block_m=align.block_m).configs[kernel]


def launch_meta(cfg: CT.KernelConfig, row_block: bool) -> dict:
    """Keyword arguments of a launch: the tile constexprs (without BLOCK_M for row-block kernels, whose
    BLOCK_M is the layout's; without GROUP_M for the weight-gradient kernels) and, when compiled,
    num_warps and num_stages."""
    meta = cfg.constexprs
    if row_block:
        meta.pop("BLOCK_M")
    else:  # the weight-gradient kernels have a fixed program order
        meta.pop("GROUP_M")
    if not INTERPRETED:
        meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return meta


_AUTOTUNED: dict = {}


def autotuned(kernel: str, fn, key: list, block_m: Optional[int] = None, reset_to_zero: Optional[list] = None):
    """`fn` wrapped in `triton.autotune` over config_table.space(kernel, size="autotune"): the opt-in
    (MOE_LAB_TRITON_AUTOTUNE=1) that times a few configurations on every new `key`."""
    row = kernel in CT.ROW_KERNELS
    cache_key = (kernel, block_m if row else None)
    if cache_key not in _AUTOTUNED:
        configs = []
        for c in CT.space(kernel, block_m if row else None, size="autotune"):
            meta = {k: v for k, v in launch_meta(c, row).items() if k not in ("num_warps", "num_stages")}
            configs.append(triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages))
        _AUTOTUNED[cache_key] = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(fn)
    return _AUTOTUNED[cache_key]


def pick_block_m(n_assignments: int, n_experts: int) -> int:
    """Rows per block of the layout when no table says otherwise: the power of two at or above the
    average rows per expert, at least 16 (tl.dot's minimum when compiled) and at most 128 (padding
    wastes < 128 rows per expert); at most 32 under the interpreter, which pays per program and per
    loop step, not per element."""
    return CT.block_m_for(n_assignments / max(1, n_experts), largest=32 if INTERPRETED else 128)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: "ieee" keeps float32 exact like torch's default matmul (TF32 would be
    ~1e-3 off); 16-bit inputs run on tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def row_block_tile(n_blocks, n_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column tile) of this program on the one-dimensional grid n_blocks x cdiv(n_cols,
    BLOCK_N): GROUP_M row blocks walk the column tiles together (the grouped order of notebook 05's
    matmul; GROUP_M = 1 runs a row block's column tiles back to back)."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(n_cols, BLOCK_N)
    tiles_per_group = GROUP_M * n_tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(n_blocks - first_m, GROUP_M)  # the last group may be shorter
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n


def row_grid(n_blocks: int, n_cols: int, block_n: int) -> tuple:
    return (n_blocks * triton.cdiv(n_cols, block_n),)


# ----------------------------------------------------------------------------------------------
# 1. Up projection with SwiGLU in the epilogue
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_assignments", "n_blocks", "top_k"])
def moe_up_kernel(
    x_ptr,  # (T, d) token activations, read row by row through the gather
    w1_ptr, w3_ptr,  # (E, d, f) gate and up projections (w3 has w1's strides)
    h_ptr,  # (max_rows, f) out: silu(x @ w1[e]) * (x @ w3[e]) for each sorted row
    a1_ptr, a3_ptr,  # (max_rows, f) out when SAVE_PREACT: x @ w1[e] and x @ w3[e], for the backward
    sorted_ids_ptr,  # (max_rows,) flat assignment index of each row; >= n_assignments marks padding
    block_expert_ptr,  # (max_blocks,) expert of each block of BLOCK_M rows; -1: unused block
    n_assignments,  # T * TOP_K, the padding sentinel
    n_blocks,  # blocks of BLOCK_M rows in the layout (max_blocks)
    d, f,  # the reduction width (x's columns) and the output width (the expert's hidden size)
    stride_xt, stride_xd,  # x's strides (token, feature)
    stride_we, stride_wd, stride_wf,  # w1's and w3's strides (expert, d, f)
    stride_hr, stride_hf,  # h's strides (row, column), shared by a1 and a3
    top_k,  # assignments per token: token = flat index // top_k
    SAVE_PREACT: tl.constexpr,  # also write a1 and a3 (training)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32, see dot_precision
    BLOCK_M: tl.constexpr,  # rows per program; equals the layout's block_m
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row blocks that walk the column tiles together (program order)
):
    pid_m, pid_n = row_block_tile(n_blocks, f, BLOCK_N, GROUP_M)  # which block of rows, which of f's columns
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:  # past the last used row: nothing to do
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) sorted rows
    flat = tl.load(sorted_ids_ptr + offs_m)  # (BLOCK_M,) assignment index of each row
    row_ok = flat < n_assignments  # padding rows compute zeros and are not stored
    tok = (flat // top_k).to(tl.int64)  # (BLOCK_M,) the token each row gathers from x
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


def moe_up(x: Tensor, w1: Tensor, w3: Tensor, align: MoEAlignment, save_preact: bool = False,
           config: Optional[CT.KernelConfig] = None):
    """Launch `moe_up_kernel`. Returns (h, a1, a3), each (max_rows, f) in x's dtype, rows in the
    layout's order (only rows of real assignments are written); a1 = a3 = None unless save_preact.
    config: the launch configuration (default: config_table's choice for this problem)."""
    if w3.stride() != w1.stride():  # the kernel walks both with one set of strides
        w1, w3 = w1.contiguous(), w3.contiguous()
    d, f = w1.shape[1], w1.shape[2]
    h = new_buffer((align.max_rows, f), x.dtype, x.device)
    a1 = new_buffer(h.shape, x.dtype, x.device) if save_preact else None
    a3 = new_buffer(h.shape, x.dtype, x.device) if save_preact else None
    if align.max_blocks == 0 or f == 0:
        return h, a1, a3
    args = (x, w1, w3, h, a1 if save_preact else h, a3 if save_preact else h,
            align.sorted_ids, align.block_expert, align.n_assignments, align.max_blocks, d, f,
            x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0), h.stride(1))
    fixed = dict(top_k=align.top_k, SAVE_PREACT=save_preact, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=align.block_m)
    if AUTOTUNE and config is None:
        kern = autotuned("up", moe_up_kernel, ["d", "f", "BLOCK_M"], align.block_m)
        kern[lambda meta: row_grid(align.max_blocks, f, meta["BLOCK_N"])](*args, **fixed)
    else:
        cfg = config or config_for("up", align, x.dtype, x.device, d, f, training=save_preact)
        moe_up_kernel[row_grid(align.max_blocks, f, cfg.BLOCK_N)](*args, **fixed, **launch_meta(cfg, True))
    return h, a1, a3


# ----------------------------------------------------------------------------------------------
# 2. Down projection, weighted in the epilogue, written to each assignment's slot
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_assignments", "n_blocks", "top_k"])
def moe_down_kernel(
    h_ptr,  # (max_rows, f) the up kernel's output, in the layout's row order
    w2_ptr,  # (E, f, d) down projections
    weights_ptr,  # (T * TOP_K,) routing weight of each assignment (any float dtype)
    out_ptr,  # ATOMIC=False: (T * TOP_K, d) one row per assignment; ATOMIC=True: (T, d) float32, zeroed
    sorted_ids_ptr,  # (max_rows,) flat assignment index of each row; >= n_assignments marks padding
    block_expert_ptr,  # (max_blocks,) expert of each block; -1: unused
    n_assignments,  # T * TOP_K
    n_blocks,  # blocks of BLOCK_M rows in the layout
    f, d,  # the reduction width and the output width
    stride_hr, stride_hf,  # h's strides
    stride_we, stride_wf, stride_wd,  # w2's strides (expert, f, d)
    stride_or, stride_od,  # out's strides (row, column)
    top_k,  # assignments per token
    ATOMIC: tl.constexpr,  # add into y[token] with atomics instead of writing the assignment's row
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = row_block_tile(n_blocks, d, BLOCK_N, GROUP_M)
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
        tok = (flat // top_k).to(tl.int64)
        tl.atomic_add(out_ptr + tok[:, None] * stride_or + offs_n[None, :] * stride_od, acc, mask=mask)
    else:
        out_off = flat.to(tl.int64)[:, None] * stride_or + offs_n[None, :] * stride_od
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# 3. Combine: sum each token's assignment rows in a fixed order
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
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
    # A memory-bound pass: 8 tokens x 256 columns per program, 16-byte loads of 16-bit rows.
    block_t, block_d = (32, 32) if INTERPRETED else (8, 256)
    grid = (triton.cdiv(T, block_t), triton.cdiv(d, block_d))
    moe_combine_kernel[grid](buf, expert_idx.reshape(-1).contiguous(), y, T, d, buf.stride(0), buf.stride(1),
                             y.stride(0), y.stride(1), TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d)
    return y


def moe_down(h: Tensor, w2: Tensor, weights: Tensor, expert_idx: Tensor, align: MoEAlignment,
             combine: str = "ordered", config: Optional[CT.KernelConfig] = None) -> Tensor:
    """Launch `moe_down_kernel` and combine: y (T, d) in h's dtype. combine="ordered" (default) writes
    each assignment's row and sums them in a fixed order; "atomic" adds into y with atomics.
    config: the launch configuration (default: config_table's choice for this problem)."""
    T = expert_idx.shape[0]
    f, d = w2.shape[1], w2.shape[2]
    A = align.n_assignments
    atomic = combine == "atomic"
    if atomic:
        out = torch.zeros((T, d), dtype=torch.float32, device=h.device)  # atomics add into zeros
    else:
        out = new_buffer((A, d), h.dtype, h.device)  # (T * top_k, d)
    if align.max_blocks and d:
        args = (h, w2, weights.reshape(-1), out, align.sorted_ids, align.block_expert, A, align.max_blocks, f, d,
                h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0), out.stride(1))
        fixed = dict(top_k=align.top_k, ATOMIC=atomic, DOT_PRECISION=dot_precision(h.dtype), BLOCK_M=align.block_m)
        if AUTOTUNE and config is None:
            kern = autotuned("down", moe_down_kernel, ["f", "d", "BLOCK_M"], align.block_m, reset_to_zero=["out_ptr"])
            kern[lambda meta: row_grid(align.max_blocks, d, meta["BLOCK_N"])](*args, **fixed)
        else:
            cfg = config or config_for("down", align, h.dtype, h.device, d, f)
            moe_down_kernel[row_grid(align.max_blocks, d, cfg.BLOCK_N)](*args, **fixed, **launch_meta(cfg, True))
    return out.to(h.dtype) if atomic else moe_combine(out, expert_idx)
