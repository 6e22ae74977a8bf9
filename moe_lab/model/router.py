"""The router of an MoE layer (notebook 03): which experts each token goes to, with what weight,
and the balancing ideas that keep every expert busy.

- softmax router (Mixtral): p = softmax(x W_g); the top-k of p, weights renormalised over the k
  chosen (with k = 1 the raw probability is kept, as in the Switch Transformer, so the gate still
  learns).
- sigmoid router (DeepSeek-V3, eq. 15-16): s = sigmoid(x W_g); the top-k of s (+ bias), weights
  s / sum of the chosen s, times the routed scaling factor.
- Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6): alpha * E * sum_i f_i * P_i,
  f_i the fraction of assignments to expert i, P_i the mean router probability of expert i. It is
  1 * alpha at perfect balance and grows as load concentrates.
- Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2: keeps
  the logits small so the softmax stays numerically tame.
- Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): a per-expert bias b_i added to
  the scores for *selection only* (never to the weights); after each step b_i += gamma * sign(mean
  load - load_i): overloaded experts become less attractive, idle ones more.
- Capacity factor with token dropping (GShard, Switch): an expert takes at most
  ceil(cf * T * k / E) assignments; first choices are served before second choices, earlier tokens
  before later ones; the rest are dropped (marked -1) and pass through the residual connection.
  The limit acts in training only. At inference (eval mode) nothing is dropped, the usual choice
  (DeepSeek-V3 drops no token at all; Switch evaluates with a larger capacity than it trains with):
  with a KV cache each decode step routes one token per row, so a capacity counted over one forward
  pass would give cached and uncached generation different outputs, and would make a token's output
  depend on the other prompts in its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moe_lab.core.config import MoEConfig


def switch_aux_loss(probs: Tensor, expert_idx: Tensor, n_experts: int) -> Tensor:
    """E * sum_i f_i * P_i (Switch Transformer). probs (T, E); expert_idx (T, k) chosen experts."""
    if probs.shape[0] == 0:  # no tokens (e.g. an expert-parallel rank with an empty batch): nothing to balance
        return probs.sum() * 0.0
    chosen = expert_idx[expert_idx >= 0]
    f = torch.bincount(chosen, minlength=n_experts).float() / max(chosen.numel(), 1)  # (E,) fraction of assignments
    P = probs.float().mean(0)  # (E,) mean router probability
    return n_experts * (f * P).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_t logsumexp(logits_t)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(cf * T * k / E)."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def apply_capacity(expert_idx: Tensor, weights: Tensor, n_experts: int, capacity: int) -> tuple[Tensor, Tensor]:
    """Drop assignments beyond each expert's capacity: returns (expert_idx with -1, weights with 0).

    Priority: all first choices (in token order), then all second choices, ... (GShard).
    """
    T, k = expert_idx.shape
    flat = expert_idx.t().reshape(-1)  # (k*T,) slot-major: first choices first
    onehot = F.one_hot(flat.clamp_min(0), n_experts) * (flat >= 0).unsqueeze(-1)  # (k*T, E)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (k*T,) place in its expert's queue
    keep = ((position < capacity) & (flat >= 0)).view(k, T).t()  # (T, k)
    return expert_idx.masked_fill(~keep, -1), weights.masked_fill(~keep, 0.0)


@dataclass
class Routing:
    """Everything a router decided for a batch of tokens."""

    expert_idx: Tensor  # (T, k) chosen experts, -1 where dropped by capacity
    weights: Tensor  # (T, k) routing weights (0 where dropped)
    probs: Tensor  # (T, E) router probabilities (sigmoid affinities normalised to sum 1)
    logits: Tensor  # (T, E) raw gate outputs
    aux_loss: Tensor  # scalar: coefficient-weighted balance loss + z-loss (0 when off)

    def detach(self) -> "Routing":
        """A copy cut from the autograd graph (kept by layers for plots and statistics)."""
        return Routing(*(t.detach() for t in (self.expert_idx, self.weights, self.probs, self.logits, self.aux_loss)))


@dataclass
class RoutingStats:
    """Per-layer statistics of the last forward pass (detached; for plots and checks)."""

    load: Tensor  # (E,) assignments each expert received (after capacity)
    dropped: int  # assignments dropped by the capacity limit
    entropy: float  # mean entropy of the router distribution, in nats (log E = uniform)

    @property
    def imbalance(self) -> float:
        """max load / mean load: 1.0 is perfect balance, E means one expert takes everything."""
        mean = self.load.float().mean()
        return float(self.load.max() / mean) if mean > 0 else float("nan")


class Router(nn.Module):
    """Top-k router with softmax or sigmoid scores and optional aux-loss-free bias."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(d_model, cfg.n_experts, bias=False)
        # DeepSeek-V3's selection bias: a buffer, not a parameter: it is set by a rule, not by gradients
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.register_buffer("load_since_update", torch.zeros(cfg.n_experts), persistent=False)

    def scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1) if self.cfg.router == "softmax" else logits.sigmoid()

    def forward(self, x: Tensor) -> Routing:
        cfg = self.cfg
        logits = self.gate(x).float()  # (T, E): routing decisions in float32
        scores = self.scores(logits)  # (T, E)
        select = scores + self.expert_bias if cfg.balance == "aux_free" else scores  # bias: selection only
        expert_idx = select.topk(cfg.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(-1, expert_idx)  # (T, k)
        if cfg.router == "sigmoid" or cfg.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        if cfg.routed_scaling != 1.0:  # (a multiplication by 1 would still cost an operation and its backward)
            weights = weights * cfg.routed_scaling
        probs = scores if cfg.router == "softmax" else scores / scores.sum(-1, keepdim=True)

        aux = logits.new_zeros(())
        if cfg.balance == "aux_loss" and cfg.aux_loss_coef > 0:
            aux = aux + cfg.aux_loss_coef * switch_aux_loss(probs, expert_idx, cfg.n_experts)
        if cfg.z_loss_coef > 0:
            aux = aux + cfg.z_loss_coef * router_z_loss(logits)
        if cfg.capacity_factor is not None and self.training:  # training only: inference is dropless
            cap = expert_capacity(x.shape[0], cfg.top_k, cfg.n_experts, cfg.capacity_factor)
            expert_idx, weights = apply_capacity(expert_idx, weights, cfg.n_experts, cap)
        if self.training:  # assignments per expert; dropped ones (-1) counted in bin 0, then cut off
            self.load_since_update += torch.bincount(expert_idx.reshape(-1) + 1, minlength=cfg.n_experts + 1)[1:]
        return Routing(expert_idx, weights.to(x.dtype), probs, logits, aux)

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3: b_i += gamma * sign(mean load - load_i), from the load seen since the last call."""
        if self.cfg.balance == "aux_free" and self.load_since_update.sum() > 0:
            load = self.load_since_update
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()


def routing_stats(routing: Routing, n_experts: int) -> RoutingStats:
    """Load per expert, dropped assignments and router entropy of one routing decision."""
    idx = routing.expert_idx.detach()
    load = torch.bincount(idx[idx >= 0], minlength=n_experts)
    p = routing.probs.detach().float().clamp_min(1e-12)
    entropy = float(-(p * p.log()).sum(-1).mean())
    return RoutingStats(load=load.cpu(), dropped=int((idx < 0).sum()), entropy=entropy)
