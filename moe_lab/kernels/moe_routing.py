"""Routing metadata for the grouped-GEMM MoE kernels: sort token copies by expert, pad each expert's
rows to a multiple of the kernel's row block (the "block-aligned" layout of vLLM's fused MoE and
MegaBlocks, Gale et al. 2022, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts").

A token routed to top_k experts makes top_k *assignments*, numbered a = t * top_k + j (the flat index
into expert_idx (T, top_k)). The kernels want one expert per block of block_m rows, so that a
program loads one expert's weights and runs a dense tile; `moe_align` lays the assignments out so:

    expert_idx = [[2, 0], [0, 1], [2, -1]]           T=3, top_k=2, E=3, block_m=4; -1 = dropped
    counts     = [2, 1, 2]                           assignments per expert
    offsets    = [0, 4, 8, 12]                       padded starts: expert e owns rows offsets[e]..offsets[e+1]
    sorted_ids = [1, 2, 6, 6 | 3, 6, 6, 6 | 0, 4, 6, 6 | 6 ...]    6 = T*top_k, the padding sentinel
    block_expert = [0, 1, 2, -1, ...]                the expert of each block; -1: beyond the last row

Dropped assignments get no row at all: no compute, and nothing is written for them.

It is built with torch ops (bincount by scatter_add, cumsum, a stable argsort, searchsorted), all on
the tensor's device and without copying anything to the host: the number of rows is not known on
the host, so buffers are sized by the bound A + min(E, A) * (block_m - 1) and blocks past the real end
carry block_expert = -1 and return at once. A Triton version would win only at large token counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lab.core.cost import max_padded_rows


@dataclass(frozen=True)
class MoEAlignment:
    """The block-aligned layout of routed assignments (see the module docstring for an example).

    Attributes:
        counts:       (E,) int64      assignments routed to each expert (dropped ones not counted)
        offsets:      (E + 1,) int32  padded start row of each expert; offsets[E] = rows actually used
        sorted_ids:   (max_rows,) int32  the flat assignment index of each row; padding = n_assignments
        block_expert: (max_blocks,) int32  expert of each block of block_m rows, -1 past the end
        block_m:      rows per block; every expert's rows are padded to a multiple of it
        top_k:        assignments per token (token of row r = sorted_ids[r] // top_k)
        n_assignments: T * top_k, also the padding sentinel
    """

    counts: Tensor
    offsets: Tensor
    sorted_ids: Tensor
    block_expert: Tensor
    block_m: int
    top_k: int
    n_assignments: int

    @property
    def max_rows(self) -> int:
        return self.sorted_ids.numel()

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def check_block_m(block_m) -> None:
    """The layout's row block is the kernels' BLOCK_M (tl.arange needs a power of two): refuse any other
    value here, with its name, rather than deep inside Triton."""
    if not isinstance(block_m, int) or isinstance(block_m, bool) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m!r}: expected an integer power of two >= 1 (1, 2, 4, ..., 16, 32, ...): "
                         f"it is the kernels' BLOCK_M")


def moe_align(expert_idx: Tensor, n_experts: int, block_m: int) -> MoEAlignment:
    """Sort assignments by expert and pad each expert's rows to a multiple of block_m (torch ops, on
    expert_idx's device, no host synchronisation). expert_idx (T, top_k) holds experts in
    [0, n_experts) or -1 for a dropped assignment."""
    if expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must be (tokens, top_k); got shape {tuple(expert_idx.shape)}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1; got {n_experts}")
    check_block_m(block_m)
    T, top_k = expert_idx.shape
    A = T * top_k
    dev = expert_idx.device
    flat = expert_idx.reshape(-1).to(torch.int64)  # (A,) expert of each assignment, -1 = dropped

    # 1. Count: bucket 0 collects the dropped assignments, bucket e + 1 expert e.
    buckets = torch.zeros(n_experts + 1, dtype=torch.int64, device=dev)
    buckets.scatter_add_(0, flat + 1, torch.ones_like(flat))  # (E + 1,)
    n_dropped, counts = buckets[:1], buckets[1:]  # (1,), (E,)

    # 2. Pad each count up to whole blocks and take the running sum: the padded starts.
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)  # (E + 1,)

    # 3. A stable sort puts the dropped first, then expert 0's assignments in token order, then 1's...
    order = torch.argsort(flat, stable=True)  # (A,) flat indices
    sorted_expert = flat[order]  # (A,)
    starts = n_dropped + torch.cumsum(counts, 0) - counts  # (E,) where each expert begins in `order`
    e = sorted_expert.clamp(min=0)  # (A,) a valid index even for the dropped
    rank = torch.arange(A, device=dev) - starts[e]  # (A,) position among the expert's assignments
    max_rows = max_padded_rows(A, n_experts, block_m)
    dest = torch.where(sorted_expert >= 0, offsets[e] + rank, max_rows)  # (A,) dropped -> a spare slot

    # 4. Scatter the flat indices to their rows; every other row keeps the sentinel A.
    sorted_ids = torch.full((max_rows + 1,), A, dtype=torch.int64, device=dev)
    sorted_ids.scatter_(0, dest, order)
    sorted_ids = sorted_ids[:max_rows]  # drop the spare slot: (max_rows,)

    # 5. The expert of each block: the e with offsets[e] <= start < offsets[e + 1]; empty experts have
    #    offsets[e] == offsets[e + 1] and are skipped by searchsorted; past offsets[E] there is none.
    block_start = torch.arange(0, max_rows, block_m, device=dev)  # (max_blocks,)
    block_expert = torch.searchsorted(offsets[1:].contiguous(), block_start, right=True)  # (max_blocks,)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1)

    return MoEAlignment(counts=counts, offsets=offsets.to(torch.int32), sorted_ids=sorted_ids.to(torch.int32),
                        block_expert=block_expert.to(torch.int32), block_m=block_m, top_k=top_k, n_assignments=A)


def moe_align_reference(expert_idx: Tensor, n_experts: int, block_m: int) -> tuple[list[int], list[int], list[int]]:
    """The same layout with Python loops (for tests and notebook 06): (offsets, sorted_ids, block_expert),
    sorted_ids only up to offsets[E] and block_expert only for the used blocks."""
    T, top_k = expert_idx.shape
    A = T * top_k
    flat = expert_idx.reshape(-1).tolist()
    offsets, sorted_ids, block_expert = [0], [], []
    for e in range(n_experts):
        rows = [a for a in range(A) if flat[a] == e]
        n_blocks = -(-len(rows) // block_m)
        sorted_ids += rows + [A] * (n_blocks * block_m - len(rows))
        block_expert += [e] * n_blocks
        offsets.append(len(sorted_ids))
    return offsets, sorted_ids, block_expert
