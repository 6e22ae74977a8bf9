"""Expert parallelism: the routed experts of an MoE layer spread over processes (notebook 09).

GShard (Lepikhin et al. 2020, section 2.2) and the Switch Transformer (Fedus et al. 2021, section
2.2, figure 3) shard the experts: with E experts on W ranks, rank r owns the E_local = E / W experts
[r * E_local, (r + 1) * E_local), while every rank keeps its own tokens, router and shared experts.
A forward pass is then four steps around the ordinary expert computation:

    1. route     each rank's router picks top-k experts for its own tokens (expert_idx, weights)
    2. dispatch  all-to-all: every token copy travels to the rank that owns its expert
    3. compute   each rank runs its local experts on the rows it received (any single-process
                 back-end of moe_lab.model.expert_backends)
    4. combine   all-to-all back: results return to the token's rank, are weighted by the routing
                 weights and summed into the token's row

The result equals the single-process layer exactly: y[t] = sum_j weights[t, j] * Expert_e(x[t]).
Dropped assignments (-1, beyond an expert's capacity) never travel. The capacity is computed on
each rank's own tokens, as GShard's "local group dispatching" does.

Gradients flow through autograd (AllToAll in moe_lab.distributed.comm): the expert weights on rank
r receive the gradient of *every* rank's loss, since every rank's tokens may have visited them.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from moe_lab.distributed.comm import CommStats, all_to_all, exchange_counts
from moe_lab.model import expert_backends
from moe_lab.model.experts import sort_by_expert, swiglu_expert
from moe_lab.model.moe import MoELayer


def local_expert_count(n_experts: int, group=None) -> int:
    """E_local = E / world_size; raises when the experts cannot be split evenly."""
    world = dist.get_world_size(group)
    if not isinstance(n_experts, int) or n_experts < 1 or n_experts % world:
        raise ValueError(f"n_experts={n_experts!r}: expected a positive multiple of world_size={world} "
                         f"so that every rank owns the same number of experts")
    return n_experts // world


def check_ep_inputs(x: Tensor, expert_idx: Tensor, weights: Tensor, w1_local: Tensor, w3_local: Tensor,
                    w2_local: Tensor, n_experts: int, local_backend: str, group=None) -> None:
    """The contract of moe_lab.model.experts, with the expert weights holding this rank's shard."""
    E_local = local_expert_count(n_experts, group)
    expert_backends.check_name(local_backend, "local_backend")
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, d_model); got shape {tuple(x.shape)}")
    T, d = x.shape
    if expert_idx.dim() != 2 or expert_idx.shape[0] != T or weights.shape != expert_idx.shape:
        raise ValueError(f"expert_idx and weights must both be (tokens={T}, top_k); got {tuple(expert_idx.shape)} "
                         f"and {tuple(weights.shape)}")
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expert_idx must be an integer tensor; got {expert_idx.dtype}")
    if w1_local.dim() != 3 or w1_local.shape[:2] != (E_local, d) or w3_local.shape != w1_local.shape:
        raise ValueError(f"w1_local and w3_local must be (n_experts / world_size={E_local}, d_model={d}, d_expert); "
                         f"got {tuple(w1_local.shape)} and {tuple(w3_local.shape)}")
    f = w1_local.shape[2]
    if w2_local.shape != (E_local, f, d):
        raise ValueError(f"w2_local must be ({E_local}, d_expert={f}, d_model={d}); got {tuple(w2_local.shape)}")
    if expert_idx.numel() and (int(expert_idx.min()) < -1 or int(expert_idx.max()) >= n_experts):
        raise ValueError(f"expert_idx must hold global expert ids in [-1, {n_experts - 1}] (-1 = dropped); got "
                         f"values in [{int(expert_idx.min())}, {int(expert_idx.max())}]")


def experts_ep(x: Tensor, expert_idx: Tensor, weights: Tensor, w1_local: Tensor, w3_local: Tensor,
               w2_local: Tensor, n_experts: int, group=None, local_backend: str = "sorted",
               stats: Optional[CommStats] = None) -> Tensor:
    """Expert-parallel back-end: this rank's tokens in, this rank's outputs out.

    x (T, d), expert_idx (T, k) global ids (-1 = dropped), weights (T, k): this rank's tokens (T may
    differ between ranks and may be 0). w1_local, w3_local (E_local, d, f), w2_local (E_local, f, d):
    the experts this rank owns. Returns (T, d).

    Every rank of `group` must call it together, and for the backward pass every rank's loss must
    depend on its output, with the same inputs requiring grad on every rank (true when all ranks
    run the same model): the backward all-to-alls are collective too.
    """
    check_ep_inputs(x, expert_idx, weights, w1_local, w3_local, w2_local, n_experts, local_backend, group)
    W = dist.get_world_size(group)
    E_local = n_experts // W

    # 1. sort this rank's assignments by expert, hence by destination rank, then expert
    order, token_of, counts = sort_by_expert(expert_idx, n_experts)  # (N,), (N,), (E,); dropped removed

    # 2. dispatch: first the counts, so every rank knows how many rows it will receive, then the rows
    recv_counts = exchange_counts(counts, group, stats).view(W, E_local)  # [src, e]: rows from src for local e
    send_splits = counts.view(W, E_local).sum(1).tolist()  # rows to each rank
    recv_splits = recv_counts.sum(1).tolist()  # rows from each rank
    x_sent = x[token_of]  # (N, d): one row per routed assignment
    x_recv = all_to_all(x_sent, recv_splits, send_splits, group, stats, "dispatch")  # (M, d)

    # 3. compute: received rows are grouped by source rank, then local expert; any back-end will do
    M = x_recv.shape[0]
    local_e = torch.arange(E_local, device=x.device).repeat(W)  # (W * E_local,) local expert of each block
    local_idx = local_e.repeat_interleave(recv_counts.reshape(-1))[:, None]  # (M, 1)
    if M > 0:
        y_recv = expert_backends.run_experts(local_backend, x_recv, local_idx, x_recv.new_ones(M, 1), w1_local, w3_local,
                                             w2_local)
    else:
        # No rows came in. Still build y_recv *from* x_recv and the weights: the backward all-to-alls
        # are collective, so this rank's graph must reach them just like the other ranks' graphs do.
        y_recv = swiglu_expert(x_recv, w1_local[0], w3_local[0], w2_local[0])  # (0, d)

    # 4. combine: rows go back where they came from (splits swapped), then weight and sum per token
    y_back = all_to_all(y_recv, send_splits, recv_splits, group, stats, "combine")  # (N, d), in x_sent's order
    w_sorted = weights.reshape(-1)[order].to(x.dtype)  # (N,) routing weight of each row
    return torch.zeros_like(x).index_add(0, token_of, y_back * w_sorted[:, None])  # (T, d)


class ExpertParallelExperts(nn.Module):
    """The routed experts of one MoE layer, sharded: this rank holds experts [first, first + E_local)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, group=None, local_backend: str = "sorted",
                 init_std: float = 0.02):
        super().__init__()
        E_local = local_expert_count(n_experts, group)
        self.n_experts, self.group = n_experts, group
        self.local_backend = expert_backends.check_name(local_backend, "local_backend")
        self.first = dist.get_rank(group) * E_local  # global id of this rank's first expert
        self.w1 = nn.Parameter(torch.randn(E_local, d_model, d_expert) * init_std)  # gate projections
        self.w3 = nn.Parameter(torch.randn(E_local, d_model, d_expert) * init_std)  # up projections
        self.w2 = nn.Parameter(torch.randn(E_local, d_expert, d_model) * init_std)  # down projections
        self.comm = CommStats()  # bytes moved by this rank, accumulated over calls

    @classmethod
    def from_full(cls, w1: Tensor, w3: Tensor, w2: Tensor, group=None,
                  local_backend: str = "sorted") -> "ExpertParallelExperts":
        """Keep this rank's slice of full expert weights w1, w3 (E, d, f), w2 (E, f, d) (same on all ranks)."""
        if w1.dim() != 3 or w3.shape != w1.shape or w2.shape != (w1.shape[0], w1.shape[2], w1.shape[1]):
            raise ValueError(f"w1, w3 must be (E, d, f) and w2 (E, f, d); got {tuple(w1.shape)}, {tuple(w3.shape)}, "
                             f"{tuple(w2.shape)}")
        E, d, f = w1.shape
        module = cls(E, d, f, group, local_backend)
        mine = slice(module.first, module.first + module.w1.shape[0])
        with torch.no_grad():
            for local, full in ((module.w1, w1), (module.w3, w3), (module.w2, w2)):
                local.data = full[mine].detach().clone()  # dtype and device follow the full weights
        return module

    @property
    def expert_ids(self) -> range:
        """Global ids of the experts on this rank."""
        return range(self.first, self.first + self.w1.shape[0])

    @property
    def backend(self) -> str:
        """'ep'; the back-end each rank runs its own experts with is `local_backend`."""
        return "ep"

    @backend.setter
    def backend(self, name: str) -> None:  # the model's set_backend(name) changes how each rank computes
        self.local_backend = expert_backends.check_name(name, "local_backend")

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        return experts_ep(x, expert_idx, weights, self.w1, self.w3, self.w2, self.n_experts, self.group,
                          self.local_backend, self.comm)

    @torch.no_grad()
    def gather_full(self) -> tuple[Tensor, Tensor, Tensor]:
        """All ranks' shards put back together: (w1, w3, w2) of shapes (E, d, f), (E, d, f), (E, f, d)."""
        full = []
        for local in (self.w1, self.w3, self.w2):
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, local.detach().contiguous(), group=self.group)
            full.append(torch.cat(parts))  # (E, ...), rank order = expert order
        return tuple(full)


class ExpertParallelMoE(MoELayer):
    """An MoELayer whose routed experts are sharded over a process group: the same layer, with its
    experts module swapped for an ExpertParallelExperts (its forward is MoELayer's).

    Router and shared experts are replicated (every rank holds a copy and routes its own tokens).
    Build one with `to_expert_parallel(layer, group)`; it adds what a replicated part needs
    (gradients summed over ranks, the router's bias rule on every rank's load).
    """

    def __init__(self, layer: MoELayer, group=None, local_backend: Optional[str] = None):
        experts = ExpertParallelExperts.from_full(layer.w1, layer.w3, layer.w2, group, local_backend or layer.backend)
        super().__init__(layer.w1.shape[1], layer.cfg, experts=experts)
        self.group = group
        self.router = copy.deepcopy(layer.router)  # replicated
        self.shared = copy.deepcopy(layer.shared)  # replicated (None without shared experts)

    @property
    def comm(self) -> CommStats:
        return self.experts.comm

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds a copy of (router and shared experts)."""
        mods = [self.router] + ([self.shared] if self.shared is not None else [])
        return [p for m in mods for p in m.parameters()]

    @torch.no_grad()
    def all_reduce_replicated_grads(self, average: bool = False) -> None:
        """Sum (or average) the replicated parameters' gradients over the group.

        Call after backward. Summing matches the expert shards, whose gradients already add up every
        rank's loss: the result is the gradient of the sum of all ranks' losses, as one process
        computing all the tokens would get.
        """
        world = dist.get_world_size(self.group)
        for p in self.replicated_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # a rank that saw no tokens still takes part
            dist.all_reduce(p.grad, group=self.group)
            if average:
                p.grad /= world

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free balancing from the load of *all* ranks, so biases stay equal."""
        dist.all_reduce(self.router.load_since_update, group=self.group)
        self.router.update_bias()


def to_expert_parallel(layer: MoELayer, group=None, local_backend: Optional[str] = None) -> ExpertParallelMoE:
    """An expert-parallel copy of `layer` on `group` (every rank must pass the same weights).

    local_backend: how each rank runs its experts (a name of moe_lab.model.expert_backends); default:
    the layer's own back-end. The original layer is left unchanged.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a moe_lab.model.moe.MoELayer; got {type(layer).__name__}")
    return ExpertParallelMoE(layer, group, local_backend)
