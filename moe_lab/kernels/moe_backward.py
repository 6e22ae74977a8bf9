"""Backward kernels of the MoE expert path, over the same block-aligned layout as the forward.

Forward, per routed assignment a = (token t, slot j) with expert e and sorted row r (moe_gemm):

    a1 = x[t] @ w1[e],  a3 = x[t] @ w3[e],  h = silu(a1) * a3,  o = h @ w2[e],  y[t] += weights[a] * o

Backward, given dy (T, d), by the chain rule (silu'(z) = s + z s (1 - s) with s = sigmoid(z)):

    g          = dy[t] @ w2[e]^T                      (f,)   the gradient reaching h, before the weight
    dweights[a] = g . h                                      (= dy[t] . o)
    dh         = weights[a] * g
    da3        = dh * silu(a1)
    da1        = dh * a3 * silu'(a1)
    dw2[e]     = sum_{rows of e} h^T (weights[a] dy[t])       grouped GEMM, reduction over rows
    dw1[e]     = sum_{rows of e} x[t]^T da1,   dw3[e] = sum x[t]^T da3
    dx[t]      = sum_j (da1 @ w1[e]^T + da3 @ w3[e]^T)        per assignment, then combined over j

Kernels:
    1. moe_swiglu_backward_kernel  row blocks: g, the weight-gradient partial sums, da1, da3
    2. moe_dx_kernel               row blocks: da1 @ w1^T + da3 @ w3^T per assignment
    3. moe_dw13_kernel, moe_dw2_kernel  one program per (expert, tile of the weight): loops over that
       expert's rows. No atomics: every weight gradient is written once, so it is deterministic.
dx is combined over j by the forward's combine kernel (or with atomics when combine="atomic").
dweights sums partial dot products over f-tiles: written per tile, then summed with torch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from typing import Optional

from moe_lab.kernels import config_table as CT
from moe_lab.kernels import moe_gemm
from moe_lab.kernels.moe_gemm import (autotuned, dot_precision, kernel_choice, launch_meta, moe_combine, new_buffer,
                                      row_block_tile, row_grid)
from moe_lab.kernels.moe_routing import MoEAlignment

import triton  # noqa: E402  (after moe_lab.kernels: it decides whether kernels are interpreted)
import triton.language as tl  # noqa: E402

# ----------------------------------------------------------------------------------------------
# 1. Through w2 and SwiGLU: g = dy[t] @ w2[e]^T, then dweights, da1, da3 in the epilogue
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_assignments", "n_blocks", "top_k"])
def moe_swiglu_backward_kernel(
    dy_ptr,  # (T, d) gradient of the layer's output, gathered by token
    w2_ptr,  # (E, f, d) down projections, read transposed
    weights_ptr,  # (T * TOP_K,) routing weights
    a1_ptr, a3_ptr,  # (max_rows, f) saved pre-activations x @ w1[e], x @ w3[e]
    da1_ptr, da3_ptr,  # (max_rows, f) out: gradients of a1 and a3 (same strides as a1)
    dw_part_ptr,  # (T * TOP_K, n_tiles_f) float32 out: sum over this program's f-columns of g * h
    sorted_ids_ptr, block_expert_ptr,  # the layout (see moe_routing)
    n_assignments, n_blocks,  # T * TOP_K; blocks of BLOCK_M rows in the layout
    d, f,  # the reduction width (d) and the output width (f)
    stride_dyt, stride_dyd,  # dy's strides
    stride_we, stride_wf, stride_wd,  # w2's strides (expert, f, d)
    stride_ar, stride_af,  # a1's strides, shared by a3, da1, da3
    stride_pr,  # dw_part's row stride (its column stride is 1)
    top_k, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = row_block_tile(n_blocks, f, BLOCK_N, GROUP_M)  # which block of rows, which of f's columns
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) sorted rows
    flat = tl.load(sorted_ids_ptr + offs_m)
    row_ok = flat < n_assignments
    tok = (flat // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns of f
    n_ok = offs_n < f

    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns of d
    dy_ptrs = dy_ptr + tok[:, None] * stride_dyt + offs_k[None, :] * stride_dyd  # (BLOCK_M, BLOCK_K)
    w2t_ptrs = w2_ptr + e * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wf  # w2[e]^T tile
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # dy[t] @ w2[e]^T
    for k0 in range(0, d, BLOCK_K):
        k_ok = offs_k < d - k0
        dya = tl.load(dy_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w2t = tl.load(w2t_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        g = tl.dot(dya, w2t, g, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_K * stride_dyd
        w2t_ptrs += BLOCK_K * stride_wd

    off = offs_m.to(tl.int64)[:, None] * stride_ar + offs_n[None, :] * stride_af  # (BLOCK_M, BLOCK_N)
    mask = row_ok[:, None] & n_ok[None, :]
    a1 = tl.load(a1_ptr + off, mask=mask, other=0.0).to(tl.float32)
    a3 = tl.load(a3_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a1)
    silu = a1 * s
    # dweights: this program's share of g . h; the f-tiles are summed afterwards (no atomics).
    part = tl.sum(g * silu * a3, axis=1)  # (BLOCK_M,)
    tl.store(dw_part_ptr + flat.to(tl.int64) * stride_pr + pid_n, part, mask=row_ok)
    gate = tl.load(weights_ptr + flat, mask=row_ok, other=0.0).to(tl.float32)
    dh = g * gate[:, None]
    tl.store(da3_ptr + off, (dh * silu).to(da3_ptr.dtype.element_ty), mask=mask)
    tl.store(da1_ptr + off, (dh * a3 * (s + silu * (1.0 - s))).to(da1_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# 2. dx per assignment: da1 @ w1[e]^T + da3 @ w3[e]^T
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_assignments", "n_blocks", "top_k"])
def moe_dx_kernel(
    da1_ptr, da3_ptr,  # (max_rows, f) from moe_swiglu_backward_kernel
    w1_ptr, w3_ptr,  # (E, d, f), read transposed
    out_ptr,  # ATOMIC=False: (T * TOP_K, d) one row per assignment; ATOMIC=True: (T, d) float32, zeroed
    sorted_ids_ptr, block_expert_ptr,
    n_assignments, n_blocks,  # T * TOP_K; blocks of BLOCK_M rows in the layout
    f, d,  # the reduction width (f), the output width (d)
    stride_ar, stride_af,  # da1's strides, shared by da3
    stride_we, stride_wd, stride_wf,  # w1's strides, shared by w3
    stride_or, stride_od,  # out's strides
    top_k, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = row_block_tile(n_blocks, d, BLOCK_N, GROUP_M)  # which block of rows, which of d's columns
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    row_ok = flat < n_assignments
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns of d
    n_ok = offs_n < d

    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns of f
    g_off = offs_m.to(tl.int64)[:, None] * stride_ar + offs_k[None, :] * stride_af  # (BLOCK_M, BLOCK_K)
    da1_ptrs = da1_ptr + g_off
    da3_ptrs = da3_ptr + g_off
    w_off = e * stride_we + offs_k[:, None] * stride_wf + offs_n[None, :] * stride_wd  # (BLOCK_K, BLOCK_N) w[e]^T
    w1t_ptrs = w1_ptr + w_off
    w3t_ptrs = w3_ptr + w_off
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, f, BLOCK_K):
        k_ok = offs_k < f - k0
        a_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc = tl.dot(tl.load(da1_ptrs, mask=a_mask, other=0.0), tl.load(w1t_ptrs, mask=w_mask, other=0.0), acc,
                     input_precision=DOT_PRECISION)
        acc = tl.dot(tl.load(da3_ptrs, mask=a_mask, other=0.0), tl.load(w3t_ptrs, mask=w_mask, other=0.0), acc,
                     input_precision=DOT_PRECISION)
        da1_ptrs += BLOCK_K * stride_af
        da3_ptrs += BLOCK_K * stride_af
        w1t_ptrs += BLOCK_K * stride_wf
        w3t_ptrs += BLOCK_K * stride_wf

    mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tok = (flat // top_k).to(tl.int64)
        tl.atomic_add(out_ptr + tok[:, None] * stride_or + offs_n[None, :] * stride_od, acc, mask=mask)
    else:
        tl.store(out_ptr + flat.to(tl.int64)[:, None] * stride_or + offs_n[None, :] * stride_od,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# 3. Weight gradients: for each expert, a GEMM whose reduction runs over that expert's rows
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_assignments", "top_k"])
def moe_dw13_kernel(
    x_ptr,  # (T, d) token activations, gathered by token
    da1_ptr, da3_ptr,  # (max_rows, f)
    dw1_ptr, dw3_ptr,  # (E, d, f) out: every element written (zeros for an expert with no rows)
    sorted_ids_ptr, offsets_ptr,  # the layout: expert e owns rows offsets[e] .. offsets[e + 1]
    n_assignments, d, f,
    stride_xt, stride_xd,
    stride_ar, stride_af,  # da1's strides, shared by da3
    stride_we, stride_wd, stride_wf,  # dw1's strides, shared by dw3
    top_k, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of dw (d) per program
    BLOCK_N: tl.constexpr,  # columns of dw (f) per program
    BLOCK_K: tl.constexpr,  # sorted rows per step of the reduction
):
    # Grid (tiles of the weight, experts): an expert's tiles run back to back, so its rows of x, da1
    # and da3 are read from memory once and served from L2 to its other tiles.
    tile = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    n_tiles_n = tl.cdiv(f, BLOCK_N)
    offs_m = (tile // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) along d
    offs_n = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) along f
    m_ok = offs_m < d
    n_ok = offs_n < f
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) sorted rows
        in_e = offs_r < end  # BLOCK_K need not divide the expert's padded rows
        flat = tl.load(sorted_ids_ptr + offs_r, mask=in_e, other=n_assignments)
        r_ok = flat < n_assignments
        tok = (flat // top_k).to(tl.int64)
        xt = tl.load(x_ptr + tok[None, :] * stride_xt + offs_m[:, None] * stride_xd,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K) = x[rows]^T
        g_off = offs_r.to(tl.int64)[:, None] * stride_ar + offs_n[None, :] * stride_af  # (BLOCK_K, BLOCK_N)
        g_mask = r_ok[:, None] & n_ok[None, :]
        acc1 = tl.dot(xt, tl.load(da1_ptr + g_off, mask=g_mask, other=0.0), acc1, input_precision=DOT_PRECISION)
        acc3 = tl.dot(xt, tl.load(da3_ptr + g_off, mask=g_mask, other=0.0), acc3, input_precision=DOT_PRECISION)
    out = e * stride_we + offs_m[:, None] * stride_wd + offs_n[None, :] * stride_wf
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(dw1_ptr + out, acc1.to(dw1_ptr.dtype.element_ty), mask=mask)
    tl.store(dw3_ptr + out, acc3.to(dw3_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_assignments", "top_k"])
def moe_dw2_kernel(
    h_ptr,  # (max_rows, f) the forward's SwiGLU output
    dy_ptr,  # (T, d) gradient of the output, gathered by token
    weights_ptr,  # (T * TOP_K,) routing weights: the gradient reaching o is weights[a] * dy[t]
    dw2_ptr,  # (E, f, d) out
    sorted_ids_ptr, offsets_ptr,
    n_assignments, f, d,
    stride_hr, stride_hf,
    stride_dyt, stride_dyd,
    stride_we, stride_wf, stride_wd,  # dw2's strides (expert, f, d)
    top_k, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of dw2 (f) per program
    BLOCK_N: tl.constexpr,  # columns of dw2 (d) per program
    BLOCK_K: tl.constexpr,  # sorted rows per step
):
    tile = tl.program_id(0)  # grid (tiles of the weight, experts), as in moe_dw13_kernel
    e = tl.program_id(1).to(tl.int64)
    n_tiles_n = tl.cdiv(d, BLOCK_N)
    offs_m = (tile // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # along f
    offs_n = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # along d
    m_ok = offs_m < f
    n_ok = offs_n < d
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        in_e = offs_r < end
        flat = tl.load(sorted_ids_ptr + offs_r, mask=in_e, other=n_assignments)
        r_ok = flat < n_assignments
        tok = (flat // top_k).to(tl.int64)
        ht = tl.load(h_ptr + offs_r.to(tl.int64)[None, :] * stride_hr + offs_m[:, None] * stride_hf,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K) = h[rows]^T
        dyb = tl.load(dy_ptr + tok[:, None] * stride_dyt + offs_n[None, :] * stride_dyd,
                      mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        gate = tl.load(weights_ptr + flat, mask=r_ok, other=0.0).to(tl.float32)
        do = (dyb.to(tl.float32) * gate[:, None]).to(ht.dtype)  # gradient of o, in the dot's dtype
        acc = tl.dot(ht, do, acc, input_precision=DOT_PRECISION)
    out = e * stride_we + offs_m[:, None] * stride_wf + offs_n[None, :] * stride_wd
    tl.store(dw2_ptr + out, acc.to(dw2_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# The launcher: all gradients of experts(x, expert_idx, weights, w1, w3, w2)
# ----------------------------------------------------------------------------------------------
def _weight_grid(E: int, rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), E)


def _launch(kernel: str, fn, grid_of, args: tuple, fixed: dict, cfg: Optional[CT.KernelConfig], key: list,
            block_m: Optional[int] = None, reset_to_zero: Optional[list] = None) -> None:
    """Launch `fn` with `cfg`, or through opt-in autotuning when cfg is None (grid_of(meta) -> grid)."""
    row = kernel in CT.ROW_KERNELS
    if cfg is None:
        autotuned(kernel, fn, key, block_m, reset_to_zero)[grid_of](*args, **fixed)
    else:
        fn[grid_of(cfg.meta)](*args, **fixed, **launch_meta(cfg, row))


def moe_experts_backward(dy: Tensor, x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor,
                         w2: Tensor, h: Tensor, a1: Tensor, a3: Tensor, align: MoEAlignment,
                         needs: tuple[bool, bool, bool, bool, bool] = (True,) * 5, combine: str = "ordered",
                         configs: Optional[dict] = None):
    """Gradients (dx, dweights, dw1, dw3, dw2), None where `needs` (same order) says it is not wanted.
    h, a1, a3 are the forward's buffers (moe_up with save_preact=True). configs: {kernel name:
    KernelConfig} for "swiglu_backward", "dx", "dw13", "dw2" (default: config_table's choice for
    training over this layout; opt-in autotuning when MOE_LAB_TRITON_AUTOTUNE=1)."""
    need_dx, need_dweights, need_dw1, need_dw3, need_dw2 = needs
    E, d, f = w1.shape
    T, top_k = expert_idx.shape
    A = align.n_assignments
    dev, prec = x.device, dot_precision(x.dtype)
    dy = dy.to(x.dtype)
    if w3.stride() != w1.stride():  # moe_dx_kernel walks both with one set of strides
        w1, w3 = w1.contiguous(), w3.contiguous()
    flat_weights = weights.reshape(-1)
    if configs is None and not moe_gemm.AUTOTUNE:
        configs = kernel_choice(x.dtype, dev, d, f, E, top_k, T, training=True, block_m=align.block_m).configs
    cfg = (lambda k: None) if configs is None else configs.__getitem__
    nb = align.max_blocks
    dx = dweights = dw1 = dw3 = dw2 = None

    if need_dx or need_dweights or need_dw1 or need_dw3:
        da1 = new_buffer(a1.shape, x.dtype, dev)
        da3 = new_buffer(a1.shape, x.dtype, dev)
        c = cfg("swiglu_backward")
        narrowest = c.BLOCK_N if c is not None else min(k.BLOCK_N for k in CT.space("swiglu_backward", align.block_m, "autotune"))
        dw_part = torch.zeros((A, max(1, triton.cdiv(f, narrowest))), dtype=torch.float32, device=dev)  # unwritten tiles add 0
        if nb and f:
            _launch("swiglu_backward", moe_swiglu_backward_kernel, lambda meta: row_grid(nb, f, meta["BLOCK_N"]),
                    (dy, w2, flat_weights, a1, a3, da1, da3, dw_part, align.sorted_ids, align.block_expert, A, nb, d, f,
                     dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), a1.stride(0), a1.stride(1),
                     dw_part.stride(0)),
                    dict(top_k=top_k, DOT_PRECISION=prec, BLOCK_M=align.block_m), c, ["d", "f", "BLOCK_M"],
                    align.block_m, reset_to_zero=["dw_part_ptr"])  # autotuning: configs write different columns
        if need_dweights:
            dweights = dw_part.sum(dim=1).reshape(T, top_k).to(weights.dtype)  # (T, top_k)
        if need_dx:
            atomic = combine == "atomic"
            out = torch.zeros((T, d), dtype=torch.float32, device=dev) if atomic else new_buffer((A, d), x.dtype, dev)
            if nb and d:
                _launch("dx", moe_dx_kernel, lambda meta: row_grid(nb, d, meta["BLOCK_N"]),
                        (da1, da3, w1, w3, out, align.sorted_ids, align.block_expert, A, nb, f, d,
                         da1.stride(0), da1.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
                         out.stride(0), out.stride(1)),
                        dict(top_k=top_k, ATOMIC=atomic, DOT_PRECISION=prec, BLOCK_M=align.block_m), cfg("dx"),
                        ["f", "d", "BLOCK_M"], align.block_m, reset_to_zero=["out_ptr"])
            dx = out.to(x.dtype) if atomic else moe_combine(out, expert_idx)
        if need_dw1 or need_dw3:
            dw1, dw3 = new_buffer(w1.shape, w1.dtype, dev), new_buffer(w3.shape, w3.dtype, dev)
            if d and f:
                _launch("dw13", moe_dw13_kernel, _weight_grid(E, d, f),
                        (x, da1, da3, dw1, dw3, align.sorted_ids, align.offsets, A, d, f, x.stride(0), x.stride(1),
                         da1.stride(0), da1.stride(1), dw1.stride(0), dw1.stride(1), dw1.stride(2)),
                        dict(top_k=top_k, DOT_PRECISION=prec), cfg("dw13"), ["d", "f"])
            dw1, dw3 = (dw1 if need_dw1 else None), (dw3 if need_dw3 else None)

    if need_dw2:
        dw2 = new_buffer(w2.shape, w2.dtype, dev)
        if d and f:
            _launch("dw2", moe_dw2_kernel, _weight_grid(E, f, d),
                    (h, dy, flat_weights, dw2, align.sorted_ids, align.offsets, A, f, d, h.stride(0), h.stride(1),
                     dy.stride(0), dy.stride(1), dw2.stride(0), dw2.stride(1), dw2.stride(2)),
                    dict(top_k=top_k, DOT_PRECISION=prec), cfg("dw2"), ["f", "d"])
    return dx, dweights, dw1, dw3, dw2
