"""The routing layout of moe_routing.moe_align in one Triton program: one launch instead of about twenty.

`moe_align` builds the block-aligned layout with torch ops (scatter_add, cumsum, a stable argsort,
searchsorted...). Each op is a kernel launch, and for a small layer (the teaching layer at 128 tokens:
256 assignments) the launches cost far more than the work: the layer's whole forward is a few
microseconds of GPU time. This kernel does the same in a single program:

    1. counts     tl.histogram of the experts (dropped assignments and padding lanes go to an extra bin)
    2. offsets    padded counts, their running sum (tl.cumsum): offsets[e], and the unpadded starts
    3. ranks      sort the keys expert * BLOCK_A + a (tl.sort): the assignments of each expert come out
                  in token order, so an assignment's rank in its expert is its position in the sorted
                  keys minus the expert's unpadded start; its row is offsets[e] + rank
    4. blocks     the expert of each block of BLOCK_M rows: the number of experts that end at or before
                  the block's start (searchsorted's rule; empty experts are skipped)

One program means one CUDA block: `tl.debug_barrier()` (a __syncthreads) orders the steps that write
memory another thread reads. It is used for up to MAX_ASSIGNMENTS assignments (one program holds them
all in registers); `moe_align` serves larger problems, where its launches are a small share of the time.
The result is the same layout, bit for bit (tests compare them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from moe_lab.kernels import INTERPRETED

import triton  # noqa: E402  (after moe_lab.kernels: it decides whether kernels are interpreted)
import triton.language as tl  # noqa: E402

from moe_lab.core.cost import max_padded_rows  # noqa: E402
from moe_lab.kernels.moe_routing import MoEAlignment, check_block_m  # noqa: E402

MAX_ASSIGNMENTS = 4096
MAX_EXPERTS = 1023


@triton.jit(do_not_specialize=["A", "max_rows", "max_blocks"])
def moe_align_kernel(
    expert_idx_ptr,  # (A,) expert of each assignment, -1 = dropped
    counts_ptr,  # (E,) int64 out: assignments per expert
    offsets_ptr,  # (E + 1,) int32 out: padded start row of each expert, offsets[E] = rows used
    starts_ptr,  # (BLOCK_E,) int32 scratch: unpadded start of each expert in the sorted order
    sorted_ids_ptr,  # (max_rows,) int32 out: assignment of each row, A on padding rows
    block_expert_ptr,  # (max_blocks,) int32 out: expert of each block, -1 past the end
    A, E, max_rows, max_blocks,
    BLOCK_M: tl.constexpr,  # rows per block of the layout
    BLOCK_A: tl.constexpr,  # power of two >= A
    BLOCK_E: tl.constexpr,  # power of two >= E + 1 (bin E collects dropped assignments and padding lanes)
    BLOCK_R: tl.constexpr,  # rows or blocks written per step of the fill loops
):
    offs_a = tl.arange(0, BLOCK_A)
    expert = tl.load(expert_idx_ptr + offs_a, mask=offs_a < A, other=-1).to(tl.int32)
    expert = tl.where(expert >= 0, expert, E)  # dropped and padding lanes: bin E

    # 1-2. counts, padded starts, unpadded starts
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    counts = tl.where(e_ok, tl.histogram(expert, BLOCK_E), 0)  # (BLOCK_E,)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)  # (BLOCK_E,) padded end row of each expert
    tl.store(counts_ptr + offs_e, counts.to(tl.int64), mask=e_ok)
    tl.store(offsets_ptr + offs_e, ends - padded, mask=e_ok)
    tl.store(offsets_ptr + E, tl.sum(padded, 0))
    tl.store(starts_ptr + offs_e, tl.cumsum(counts, 0) - counts)

    # fill: every row holds the sentinel, every block -1, until written below
    for r0 in range(0, max_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        tl.store(sorted_ids_ptr + offs_r, tl.zeros((BLOCK_R,), dtype=tl.int32) + A, mask=offs_r < max_rows)
    # 4. the expert of each block (searchsorted's rule on the padded ends)
    for b0 in range(0, max_blocks, BLOCK_R):
        offs_b = b0 + tl.arange(0, BLOCK_R)
        start = offs_b * BLOCK_M
        before = (ends[None, :] <= start[:, None]) & e_ok[None, :]  # (BLOCK_R, BLOCK_E)
        block_e = tl.sum(before.to(tl.int32), 1)
        tl.store(block_expert_ptr + offs_b, tl.where(block_e < E, block_e, -1), mask=offs_b < max_blocks)
    tl.debug_barrier()  # the fill and the starts are written before any thread reads or overwrites them

    # 3. ranks: sort by (expert, assignment); position in the sorted keys - expert's start = rank
    keys = tl.sort(expert * BLOCK_A + offs_a)
    e_sorted = keys // BLOCK_A
    a_sorted = keys % BLOCK_A
    real = e_sorted < E
    e_safe = tl.where(real, e_sorted, 0)
    rank = offs_a - tl.load(starts_ptr + e_safe, mask=real, other=0)
    row = tl.load(offsets_ptr + e_safe, mask=real, other=0) + rank
    tl.store(sorted_ids_ptr + row, a_sorted, mask=real)


def moe_align_triton(expert_idx: Tensor, n_experts: int, block_m: int) -> MoEAlignment:
    """moe_routing.moe_align in one Triton launch, for at most MAX_ASSIGNMENTS assignments and
    MAX_EXPERTS experts (a ValueError beyond). Same layout, same dtypes."""
    if expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must be (tokens, top_k); got shape {tuple(expert_idx.shape)}")
    check_block_m(block_m)
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1; got {n_experts}")
    T, top_k = expert_idx.shape
    A = T * top_k
    if A > MAX_ASSIGNMENTS or n_experts > MAX_EXPERTS:
        raise ValueError(f"moe_align_triton takes at most {MAX_ASSIGNMENTS} assignments and {MAX_EXPERTS} experts; "
                         f"got {A} and {n_experts}: use moe_routing.moe_align")
    dev = expert_idx.device
    max_rows = max_padded_rows(A, n_experts, block_m)
    max_blocks = max_rows // block_m
    block_e = max(16, triton.next_power_of_2(n_experts + 1))
    counts = torch.empty(n_experts, dtype=torch.int64, device=dev)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=dev)
    starts = torch.empty(block_e, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    if A == 0:
        counts.zero_()
        offsets.zero_()
        block_expert.fill_(-1)
        return MoEAlignment(counts, offsets, sorted_ids, block_expert, block_m, top_k, A)
    meta = {} if INTERPRETED else dict(num_warps=4 if A <= 1024 else 8)
    moe_align_kernel[(1,)](expert_idx.reshape(-1).contiguous(), counts, offsets, starts, sorted_ids, block_expert,
                           A, n_experts, max_rows, max_blocks, BLOCK_M=block_m,
                           BLOCK_A=max(16, triton.next_power_of_2(A)), BLOCK_E=block_e, BLOCK_R=256, **meta)
    return MoEAlignment(counts, offsets, sorted_ids, block_expert, block_m, top_k, A)
