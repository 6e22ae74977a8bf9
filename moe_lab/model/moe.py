"""The Mixture-of-Experts feed-forward layer (notebook 03).

    y = shared(x) + sum_{j < k} w_j(x) * Expert_{e_j(x)}(x)

Routed experts are SwiGLU MLPs stored as three stacked weights (w1, w3: (E, d, f); w2: (E, f, d)),
so the same parameters can be run by any expert back-end ('reference', 'sorted', 'triton': see
moe_lab.model.experts). Shared experts (DeepSeekMoE, Dai et al. 2024) see every token; with
n_shared of width d_shared they are one SwiGLU of width n_shared * d_shared, as in DeepSeek-V3.
Fine-grained segmentation is simply many small experts (large E, small d_expert, larger top_k).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moe_lab.config import MoEConfig
from moe_lab.model.experts import run_experts
from moe_lab.model.layers import SwiGLU
from moe_lab.model.router import Router, Routing, RoutingStats, routing_stats


class MoELayer(nn.Module):
    """Router + routed SwiGLU experts (+ shared experts), with interchangeable expert back-ends."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        E, f = cfg.n_experts, cfg.d_expert
        self.router = Router(d_model, cfg)
        self.w1 = nn.Parameter(torch.randn(E, d_model, f) * init_std)  # gate projections
        self.w3 = nn.Parameter(torch.randn(E, d_model, f) * init_std)  # up projections
        self.w2 = nn.Parameter(torch.randn(E, f, d_model) * init_std)  # down projections
        self.shared = SwiGLU(d_model, cfg.shared_width) if cfg.n_shared > 0 else None
        self.backend = cfg.backend  # may be switched at any time: every back-end computes the same
        self.aux_loss: Tensor = torch.zeros(())  # balance + z-loss of the last forward
        self.last_routing: Optional[Routing] = None  # detached routing of the last forward (for plots and stats)

    @property
    def last_stats(self) -> Optional[RoutingStats]:
        """Load per expert, dropped assignments and router entropy of the last forward pass."""
        return None if self.last_routing is None else routing_stats(self.last_routing, self.cfg.n_experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, d): every token of the batch, routed independently
        routing = self.router(xf)
        y = run_experts(self.backend, xf, routing.expert_idx, routing.weights, self.w1, self.w3, self.w2)  # (N, d)
        if self.shared is not None:
            y = y + self.shared(xf)
        self.aux_loss = routing.aux_loss
        self.last_routing = routing.detach()
        return y.reshape(shape)
