"""Functions that run on every rank of launch() or torchrun: the checks of notebook 09 and the tests.

They live in a module, not in a notebook, because the launched processes import them by name. Each
takes (rank, world_size, ...) and returns detached tensors and numbers, which launch() hands back
to the parent in rank order.

- run_cases: the test-suite's batch of cases (raw expert-parallel back-end and whole MoE layers);
  one launch runs them all, since starting processes costs more than the checks themselves.
- moe_layer_runs: whole MoE layers built by the parent (weights, each rank's tokens and output
  gradients), run expert-parallel; the parent compares them with one process (notebook 09).
- moe_layer_check: one MoE layer, expert-parallel against the single-process layer, forward and
  backward, with the bytes each rank moved (notebook 09 and `python -m moe_lab distributed`).
- fail_on_rank, sleep_on_rank: a rank that raises, a rank that hangs (the launcher's own tests).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moe_lab.core.config import MoEConfig
from moe_lab.distributed.comm import CommStats
from moe_lab.distributed.expert_parallel import experts_ep, to_expert_parallel
from moe_lab.model.moe import MoELayer


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_()


def _comm_dict(stats: CommStats) -> dict:
    return {"sent": dict(stats.sent), "received": dict(stats.received), "calls": dict(stats.calls)}


def _experts_case(rank: int, world_size: int, case: dict) -> dict:
    """Shard the case's full expert weights, run this rank's tokens forward and backward."""
    E = case["w1"].shape[0]
    E_local = E // world_size
    mine = slice(rank * E_local, (rank + 1) * E_local)
    x, weights = _leaf(case["x"][rank]), _leaf(case["weights"][rank])
    w1, w3, w2 = (_leaf(case[name][mine]) for name in ("w1", "w3", "w2"))
    stats = CommStats()
    y = experts_ep(x, case["expert_idx"][rank], weights, w1, w3, w2, E, local_backend=case["local_backend"],
                   stats=stats)
    (y * case["grad_y"][rank]).sum().backward()
    return {"y": y.detach(), "grad_x": x.grad, "grad_weights": weights.grad, "grad_w1": w1.grad,
            "grad_w3": w3.grad, "grad_w2": w2.grad, "comm": _comm_dict(stats)}


def _moe_case(rank: int, world_size: int, case: dict) -> dict:
    """Build the case's MoELayer, make it expert-parallel, run this rank's tokens forward and backward."""
    layer = MoELayer(case["d_model"], case["cfg"]).to(case["dtype"])
    layer.load_state_dict(case["state"])
    ep = to_expert_parallel(layer, local_backend=case.get("local_backend"))
    x = _leaf(case["x"][rank])
    y = ep(x)
    ((y * case["grad_y"][rank]).sum() + ep.aux_loss).backward()
    ep.all_reduce_replicated_grads()
    ep.update_bias()  # aux-loss-free balancing from every rank's load (a no-op for the bias otherwise)
    replicated = {name: p.grad.detach() for name, p in ep.named_parameters() if not name.startswith("experts.")}
    return {"y": y.detach(), "grad_x": x.grad, "grad_w1": ep.experts.w1.grad, "grad_w3": ep.experts.w3.grad,
            "grad_w2": ep.experts.w2.grad, "replicated": replicated, "dropped": ep.last_stats.dropped,
            "gathered_w1": ep.experts.gather_full()[0], "expert_bias": ep.router.expert_bias.clone(),
            "expert_idx": ep.last_routing.expert_idx.clone(), "comm": _comm_dict(ep.comm)}


def _error_messages(rank: int, world_size: int) -> dict:
    """Inputs that break the contract: each must raise before any collective, naming its argument."""
    d, f, E = 4, 3, 2 * world_size
    x, idx, w = torch.randn(3, d), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    good = [torch.zeros(E // world_size, d, f), torch.zeros(E // world_size, d, f), torch.zeros(E // world_size, f, d)]
    attempts = {
        "n_experts": lambda: experts_ep(x, idx, w, *good, n_experts=E + 1),
        "expert_idx": lambda: experts_ep(x, idx + E, w, *good, n_experts=E),
        "w1_local": lambda: experts_ep(x, idx, w, torch.zeros(E, d, f), torch.zeros(E, d, f), good[2], n_experts=E),
        "local_backend": lambda: experts_ep(x, idx, w, *good, n_experts=E, local_backend="loop"),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = None
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


def run_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """Run every case (kind 'experts', 'moe' or 'errors') in order; one result per case."""
    results = []
    for case in cases:
        if case["kind"] == "experts":
            results.append(_experts_case(rank, world_size, case))
        elif case["kind"] == "moe":
            results.append(_moe_case(rank, world_size, case))
        elif case["kind"] == "errors":
            results.append(_error_messages(rank, world_size))
        else:
            raise ValueError(f"case kind={case['kind']!r}: expected 'experts', 'moe' or 'errors'")
    return results


def moe_layer_runs(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """Notebook 09: MoE layers given by the parent, run expert-parallel, forward and backward.

    Each case is a dict with cfg (MoEConfig), d_model, dtype, state (the layer's state_dict, the same
    for every rank), x and grad_y (lists with one (T_r, d_model) tensor per rank) and optionally
    local_backend. Rank r runs x[r] through the layer's expert-parallel copy, backpropagates
    sum(y * grad_y[r]) + aux_loss and sums the replicated gradients over the ranks. Returns, per
    case, this rank's y, grad_x, expert-shard gradients (grad_w1, grad_w3, grad_w2), replicated
    gradients, routing (expert_idx, -1 = dropped), dropped count and bytes moved (comm).
    """
    return [_moe_case(rank, world_size, case) for case in cases]


def _gather(t: Tensor, group=None) -> Tensor:
    """Concatenate equal-shaped tensors from every rank, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def moe_layer_check(rank: int, world_size: int, tokens: int = 64, d_model: int = 32, n_experts: int = 8,
                    top_k: int = 2, d_expert: int = 64, n_shared: int = 1, capacity_factor: Optional[float] = None,
                    local_backend: str = "sorted", dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    """One MoE layer run expert-parallel on `tokens` tokens per rank, checked against one process.

    Every rank builds the same layer and the same inputs from `seed`; rank r keeps tokens block r.
    Rank 0 then runs the single-process layer (back-end 'reference') on each rank's block and
    compares outputs and gradients. Returns, on every rank, this rank's bytes moved; on rank 0 also
    the largest differences found.
    """
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    torch.manual_seed(seed)
    cfg = MoEConfig(n_experts=n_experts, top_k=top_k, d_expert=d_expert, n_shared=n_shared,
                    capacity_factor=capacity_factor, backend="reference")
    layer = MoELayer(d_model, cfg).to(device, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x_all = torch.randn(world_size, tokens, d_model, generator=g, dtype=dtype).to(device)  # (W, T, d)
    grad_all = torch.randn(world_size, tokens, d_model, generator=g, dtype=dtype).to(device)  # (W, T, d)

    # expert-parallel: this rank's block of tokens, this rank's share of the experts
    ep = to_expert_parallel(layer, local_backend=local_backend)
    x = x_all[rank].clone().requires_grad_()
    y = ep(x)  # (T, d)
    ((y * grad_all[rank]).sum() + ep.aux_loss).backward()
    ep.all_reduce_replicated_grads()
    y_all, gx_all = _gather(y.detach()), _gather(x.grad)  # (W*T, d)
    gw_all = [_gather(p.grad) for p in (ep.experts.w1, ep.experts.w3, ep.experts.w2)]  # (E, ...)
    comms = [None] * world_size
    dist.all_gather_object(comms, _comm_dict(ep.comm))
    result = {"rank": rank, "comm": _comm_dict(ep.comm), "dropped": ep.last_stats.dropped}
    if rank != 0:
        return result

    # one process, every rank's block through the original layer: the same losses, summed
    ys, gxs = [], []
    for r in range(world_size):
        xr = x_all[r].clone().requires_grad_()
        yr = layer(xr)
        ((yr * grad_all[r]).sum() + layer.aux_loss).backward()
        ys.append(yr.detach())
        gxs.append(xr.grad)

    def err(a: Tensor, b: Tensor) -> float:
        return float((a - b).abs().max()) if a.numel() else 0.0

    rep = dict(layer.named_parameters())
    result.update(
        max_err_y=err(y_all, torch.cat(ys)),
        max_err_grad_x=err(gx_all, torch.cat(gxs)),
        max_err_grad_experts=max(err(a, p.grad) for a, p in zip(gw_all, (layer.w1, layer.w3, layer.w2))),
        max_err_grad_replicated=max(err(p.grad, rep[n].grad) for n, p in ep.named_parameters()
                                    if not n.startswith("experts.")),
        comm_per_rank=comms,
    )
    return result


def fail_on_rank(rank: int, world_size: int, bad_rank: int) -> int:
    """Rank `bad_rank` raises; the others wait in a collective that can never complete."""
    if rank == bad_rank:
        raise ValueError(f"rank {rank} fails on purpose")
    dist.barrier()
    return rank


def sleep_on_rank(rank: int, world_size: int, slow_rank: int, seconds: float) -> int:
    """Rank `slow_rank` sleeps `seconds` (longer than the launch's timeout); the others return at once."""
    if rank == slow_rank:
        time.sleep(seconds)
    return rank


def sleep_on_every_rank(rank: int, world_size: int, seconds: float, started_in: str) -> int:
    """Every rank leaves a file `rank<r>` in the folder `started_in`, then sleeps `seconds` (a run to kill
    while its ranks are alive, for the tests of what a killed run leaves behind)."""
    with open(f"{started_in}/rank{rank}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return rank
