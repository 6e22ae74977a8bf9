"""The two RoPE layouts, and the row permutation that turns one into the other.

RoPE rotates a head's query and key in pairs of numbers, pair i by the angle position * theta^(-2i/d).
Which numbers form pair i is a convention of each codebase:

    interleaved   pairs (2i, 2i+1)     moe_lab (apply_rope), DeepSeek's own code, and in transformers
                                      DeepseekV3 with rope_interleave=True, DeepseekV2 (complex numbers)
                                      and Ernie4_5_Moe
    half          pairs (i, i + d/2)   transformers' `rotate_half`: Llama, Mixtral, Glm4Moe, and
                                      DeepseekV3 with rope_interleave=False

Attention only ever uses q . k, and a dot product does not change when both vectors have their
numbers reordered the same way. So a model written in one layout runs exactly in the other once the
rows of its query and key projections are reordered, head by head: the half layout's number j < d/2
is the interleaved layout's number 2j, and its number d/2 + j is number 2j + 1. Values and the
output projection are untouched (the permutation cancels inside q . k).
"""
from __future__ import annotations

import torch
from torch import Tensor


def half_order(width: int) -> Tensor:
    """Indices that reorder one head's rotated numbers from interleaved to half: [0, 2, 4, ..., 1, 3, 5, ...]."""
    if width % 2:
        raise ValueError(f"half_order(width={width}): expected an even width (RoPE rotates pairs)")
    return torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])


def interleaved_order(width: int) -> Tensor:
    """The inverse of half_order: reorders half-layout numbers back to interleaved pairs."""
    return torch.argsort(half_order(width))


def permute_heads(weight: Tensor, n_heads: int, order: Tensor, start: int = 0) -> Tensor:
    """Reorder the rows of a projection weight (n_heads * head_width, in): in every head, rows
    start .. start + len(order) are taken in `order` (the rest of the head is left as it is)."""
    rows, width = weight.shape[0], len(order)
    if rows % n_heads:
        raise ValueError(f"permute_heads: weight has {rows} rows, expected a multiple of n_heads={n_heads}")
    head = rows // n_heads
    if start + width > head:
        raise ValueError(f"permute_heads: rows {start}..{start + width} do not fit in a head of {head} rows")
    per_head = torch.arange(head)
    per_head[start:start + width] = start + order
    index = (torch.arange(n_heads)[:, None] * head + per_head).reshape(-1)  # (n_heads * head,)
    return weight[index]


def to_half(weight: Tensor, n_heads: int, width: int, start: int = 0) -> Tensor:
    """Rows of a query or key projection in moe_lab's interleaved layout -> the half layout."""
    return permute_heads(weight, n_heads, half_order(width), start)


def to_interleaved(weight: Tensor, n_heads: int, width: int, start: int = 0) -> Tensor:
    """Rows in the half layout (transformers' rotate_half) -> moe_lab's interleaved layout."""
    return permute_heads(weight, n_heads, interleaved_order(width), start)
