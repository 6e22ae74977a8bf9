"""A decoder-only transformer with a dense or Mixture-of-Experts feed-forward per block
(notebooks 02 and 04), and sampling-based generation.

Pre-norm blocks as in GPT-2 / Llama: x = x + attn(norm(x)); x = x + ffn(norm(x)). With
cfg.ffn = "moe" every block from cfg.n_dense_layers on uses an MoELayer (DeepSeek keeps the first
blocks dense). The router's auxiliary losses of the last forward are summed by `balance_loss()`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moe_lab.config import ModelConfig
from moe_lab.model import expert_backends
from moe_lab.model.layers import CausalSelfAttention, RMSNorm, SwiGLU
from moe_lab.model.moe import MoELayer
from moe_lab.model.router import RoutingStats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoELayer(cfg.d_model, cfg.moe) if cfg.is_moe_layer(layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Transformer(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> logits over the vocabulary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # --- bookkeeping -------------------------------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def n_params(self, active: bool = False) -> int:
        """All parameters, or with active=True those one token uses (top_k of E routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for layer in self.moe_layers():
                per_expert = layer.w1[0].numel() + layer.w3[0].numel() + layer.w2[0].numel()
                total -= (layer.cfg.n_experts - layer.cfg.top_k) * per_expert
        return total

    def set_backend(self, backend: str) -> None:
        """Run every MoE layer's experts with another back-end (moe_lab.model.expert_backends.names())."""
        expert_backends.check_name(backend, "set_backend(backend)")
        for layer in self.moe_layers():
            layer.backend = backend

    def balance_loss(self) -> Tensor:
        """Sum of the routers' auxiliary losses (balance + z-loss) from the last forward."""
        losses = [layer.aux_loss for layer in self.moe_layers()]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.head.weight.device)

    def routing_stats(self) -> list[RoutingStats]:
        """One RoutingStats per MoE layer, from the last forward."""
        return [layer.last_stats for layer in self.moe_layers()]

    def update_router_biases(self) -> None:
        """DeepSeek-V3 aux-loss-free balancing: call once after each optimiser step."""
        for layer in self.moe_layers():
            layer.router.update_bias()

    # --- forward -----------------------------------------------------------------------------
    def check_tokens(self, idx: Tensor) -> None:
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be an integer tensor; got dtype {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}); got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, loss_mask: Optional[Tensor] = None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        loss is the mean cross-entropy of targets over positions where loss_mask is 1 (all positions
        when loss_mask is None). It does not include the routers' balance_loss().
        """
        self.check_tokens(idx)
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).float()  # (B, T, V)
        if targets is None:
            return logits, None
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
        if loss_mask is None:
            return logits, nll.mean()
        m = loss_mask.flatten().to(nll.dtype)
        return logits, (nll * m).sum() / m.sum().clamp_min(1.0)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample up to max_new_tokens after the prompts idx (B, T0); returns (B, T0 + n).

        temperature 0 means greedy. With stop_token, a row that has produced it keeps emitting it
        (so the batch stays rectangular) and generation ends once every row has stopped.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: expected a number >= 0 (0 = greedy)")
        if top_k is not None and not 1 <= top_k <= self.cfg.vocab_size:
            raise ValueError(f"top_k={top_k}: expected None or an integer in [1, {self.cfg.vocab_size}]")
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.max_seq_len:])
            logits = logits[:, -1]  # (B, V): the next token's scores
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done |= nxt == stop_token
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if stop_token is not None and bool(done.all()):
                break
        return idx
