"""The Mixture-of-Experts feed-forward layer (notebook 03).

    y = shared(x) + sum_{j < k} w_j(x) * Expert_{e_j(x)}(x)

The layer is three modules: the router, the routed experts (`Experts`: SwiGLU MLPs stored as three
stacked weights w1, w3: (E, d, f), w2: (E, f, d), run by any back-end of
moe_lab.model.expert_backends) and the shared experts. Expert parallelism swaps the experts module
for a sharded one (moe_lab.distributed.to_expert_parallel); the layer's forward stays the same. Shared experts (DeepSeekMoE, Dai et al. 2024) see every token; with
n_shared of width d_shared they are one SwiGLU of width n_shared * d_shared, as in DeepSeek-V3.
Fine-grained segmentation is simply many small experts (large E, small d_expert, larger top_k).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moe_lab.core.config import MoEConfig
from moe_lab.model import expert_backends
from moe_lab.model.layers import SwiGLU
from moe_lab.model.router import Router, Routing, RoutingStats, routing_stats


class Experts(nn.Module):
    """The routed experts of an MoE layer: three stacked SwiGLU weights and the back-end that runs them.

    forward(x (T, d), expert_idx (T, k), weights (T, k)) -> (T, d). `backend` names an entry of
    moe_lab.model.expert_backends and may be switched at any time: every back-end computes the same
    function. Expert parallelism (notebook 09) swaps this module for a sharded one with the same
    forward (moe_lab.distributed.ExpertParallelExperts).
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: str = "sorted", init_std: float = 0.02):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * init_std)  # gate projections
        self.w3 = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * init_std)  # up projections
        self.w2 = nn.Parameter(torch.randn(n_experts, d_expert, d_model) * init_std)  # down projections
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = expert_backends.check_name(name)

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        return expert_backends.run_experts(self.backend, x, expert_idx, weights, self.w1, self.w3, self.w2)

    def extra_repr(self) -> str:
        E, d, f = self.w1.shape
        return f"n_experts={E}, d_model={d}, d_expert={f}, backend={self.backend!r}"


class MoELayer(nn.Module):
    """Router + routed experts (`experts`, with interchangeable back-ends) + shared experts."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02, experts: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"MoELayer(cfg={cfg!r}): expected a MoEConfig")
        self.cfg = cfg.check()  # again: a field changed since construction (cfg.top_k = 50) is named here
        self.router = Router(d_model, cfg)
        self.experts = experts if experts is not None else Experts(cfg.n_experts, d_model, cfg.d_expert, cfg.backend,
                                                                   init_std)
        self.shared = SwiGLU(d_model, cfg.shared_width) if cfg.n_shared > 0 else None
        self.aux_loss: Tensor = torch.zeros(())  # balance + z-loss of the last forward
        self.last_routing: Optional[Routing] = None  # detached routing of the last forward (for plots and stats)

    # The experts' weights and back-end, reachable from the layer as before the experts had a module.
    @property
    def w1(self) -> Tensor:
        return self.experts.w1

    @property
    def w3(self) -> Tensor:
        return self.experts.w3

    @property
    def w2(self) -> Tensor:
        return self.experts.w2

    @property
    def backend(self) -> str:
        return self.experts.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.experts.backend = name

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints saved before the experts had their own module name their weights <prefix>w1, w3, w2.
        for name in ("w1", "w3", "w2"):
            if prefix + name in state_dict and prefix + "experts." + name not in state_dict:
                state_dict[prefix + "experts." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def last_stats(self) -> Optional[RoutingStats]:
        """Load per expert, dropped assignments and router entropy of the last forward pass."""
        return None if self.last_routing is None else routing_stats(self.last_routing, self.cfg.n_experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, d): every token of the batch, routed independently
        routing = self.router(xf)
        y = self.experts(xf, routing.expert_idx, routing.weights)  # (N, d)
        if self.shared is not None:
            y = y + self.shared(xf)
        self.aux_loss = routing.aux_loss
        self.last_routing = routing.detach()
        return y.reshape(shape)
