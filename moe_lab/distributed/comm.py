"""All-to-all with autograd, and a counter of the bytes it moves (notebook 09).

Expert parallelism (GShard, Lepikhin et al. 2020, section 2.2; Switch Transformer, Fedus et al.
2021, section 2.2) moves tokens with one collective, *all-to-all*: every rank splits its rows into
`world_size` chunks and sends chunk j to rank j; rank j receives one chunk from every rank, in rank
order. `torch.distributed.all_to_all_single` does exactly that, with chunk sizes given per rank:

    input_splits[j]  rows this rank sends to rank j        (sum = rows of the input)
    output_splits[i] rows this rank receives from rank i   (sum = rows of the output)

Its gradient is the same exchange run backwards: the gradient of the row that travelled i -> j
travels j -> i, so the backward is an all-to-all with the two split lists swapped. `AllToAll`
below writes that down as a `torch.autograd.Function`, which works on every back-end (gloo on
CPUs, NCCL on GPUs) whether or not the functional collectives of c10d carry autograd there.

One rule follows from all-to-all being *collective*: every rank must call it, forward and backward,
in the same order. In an MoE layer this holds as long as each rank's graph has the same shape,
which moe_lab.distributed.expert_parallel takes care of even for ranks that hold no tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Bytes one rank moved through all-to-all, per phase (e.g. 'dispatch', 'combine.backward').

    Only bytes that leave the process count: the chunk a rank "sends" to itself is a local copy.
    """

    sent: dict[str, int] = field(default_factory=dict)  # phase -> bytes sent to other ranks
    received: dict[str, int] = field(default_factory=dict)  # phase -> bytes received from other ranks
    calls: dict[str, int] = field(default_factory=dict)  # phase -> number of all-to-all calls

    def add(self, phase: str, sent: int, received: int) -> None:
        self.sent[phase] = self.sent.get(phase, 0) + sent
        self.received[phase] = self.received.get(phase, 0) + received
        self.calls[phase] = self.calls.get(phase, 0) + 1

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.calls.clear()

    def __str__(self) -> str:
        rows = [f"{'phase':<18}{'calls':>6}{'sent (B)':>12}{'received (B)':>14}"]
        for phase in self.sent:
            rows.append(f"{phase:<18}{self.calls[phase]:>6}{self.sent[phase]:>12}{self.received[phase]:>14}")
        rows.append(f"{'total':<18}{sum(self.calls.values()):>6}{self.total_sent:>12}{self.total_received:>14}")
        return "\n".join(rows)


def _count(stats: Optional[CommStats], phase: str, x: Tensor, output_splits: list[int], input_splits: list[int],
           group) -> None:
    """Add to `stats` the bytes of this exchange that cross a process boundary."""
    if stats is None:
        return
    me = dist.get_rank(group)
    row_bytes = math.prod(x.shape[1:]) * x.element_size()  # one row: (d,) elements, or one scalar for 1-D
    sent = (sum(input_splits) - input_splits[me]) * row_bytes
    received = (sum(output_splits) - output_splits[me]) * row_bytes
    stats.add(phase, sent, received)


def _all_to_all_rows(x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """The raw exchange: (sum(input_splits), ...) -> (sum(output_splits), ...). No autograd."""
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))  # (rows received, ...)
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all-to-all (split lists swapped)."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group, stats, phase: str):
        ctx.splits = (output_splits, input_splits)
        ctx.group, ctx.stats, ctx.phase = group, stats, phase
        _count(stats, phase, x, output_splits, input_splits, group)
        return _all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        output_splits, input_splits = ctx.splits
        # the rows came in according to output_splits; their gradients go back the same way, reversed
        _count(ctx.stats, ctx.phase + ".backward", grad_out, input_splits, output_splits, ctx.group)
        grad_in = _all_to_all_rows(grad_out, input_splits, output_splits, ctx.group)
        return grad_in, None, None, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group=None,
               stats: Optional[CommStats] = None, phase: str = "all_to_all") -> Tensor:
    """Differentiable all-to-all of the rows of x.

    x (sum(input_splits), ...) -> (sum(output_splits), ...): rows [sum(input_splits[:j]), ...) go to
    rank j; the output holds rank 0's chunk first, then rank 1's, ... Bytes are added to `stats`
    under `phase` (and `phase + '.backward'` when the gradient flows back).
    """
    world = dist.get_world_size(group)
    for name, splits in (("output_splits", output_splits), ("input_splits", input_splits)):
        if len(splits) != world or any(s < 0 for s in splits):
            raise ValueError(f"{name}={list(splits)}: expected {world} non-negative row counts (one per rank)")
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"input_splits={list(input_splits)} sum to {sum(input_splits)} rows; x has {x.shape[0]}")
    return AllToAll.apply(x, list(output_splits), list(input_splits), group, stats, phase)


def exchange_counts(counts: Tensor, group=None, stats: Optional[CommStats] = None) -> Tensor:
    """Equal-split all-to-all of an integer tensor (no autograd): how many rows will travel.

    counts (world * n,) -> (world * n,): this rank's chunk j goes to rank j; the result holds, in
    rank order, the chunk each rank addressed to this one.
    """
    world = dist.get_world_size(group)
    if counts.dim() != 1 or counts.shape[0] % world:
        raise ValueError(f"counts must be 1-D with a length divisible by world_size={world}; got {tuple(counts.shape)}")
    splits = [counts.shape[0] // world] * world
    _count(stats, "counts", counts, splits, splits, group)
    return _all_to_all_rows(counts, splits, splits, group)
