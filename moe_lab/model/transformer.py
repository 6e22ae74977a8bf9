"""A decoder-only transformer with a dense or Mixture-of-Experts feed-forward per block
(notebooks 02 and 04), multi-head or multi-head latent attention (notebook 10), and sampling-based
generation with a KV cache.

Pre-norm blocks as in GPT-2 / Llama: x = x + attn(norm(x)); x = x + ffn(norm(x)). With
cfg.ffn = "moe" every block from cfg.n_dense_layers on uses an MoELayer (DeepSeek keeps the first
blocks dense). The router's auxiliary losses of the last forward are summed by `balance_loss()`.
With cfg.attention = "mla" every block uses DeepSeek-V2's MultiHeadLatentAttention.

Generation (`generate`) runs the prompt once and then one token per step against a KV cache
(moe_lab.model.kv_cache); `use_cache=False` re-runs the whole prefix at every step instead, the
readable definition the cached path is tested against. Generation always runs in eval mode: an MoE
layer then drops no token whatever its capacity_factor (see moe_lab.model.router), so a token's
output never depends on how many tokens one forward pass happens to see.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moe_lab.core.config import ModelConfig
from moe_lab.model import expert_backends
from moe_lab.model.kv_cache import KVCache, LayerCache
from moe_lab.model.layers import CausalSelfAttention, RMSNorm, SwiGLU
from moe_lab.model.mla import MultiHeadLatentAttention
from moe_lab.model.moe import MoELayer
from moe_lab.model.router import RoutingStats


class GenerationArgumentError(ValueError, TypeError):
    """A wrong argument of generation: the message names the function, the argument, the value and what was expected."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_sampling_args(where: str, temperature, top_k, vocab_size: int) -> None:
    """temperature: a finite number >= 0 (0 = greedy); top_k: None or an integer in [1, vocab_size]."""
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature >= 0):
        raise GenerationArgumentError(f"{where}(temperature={temperature!r}): expected a finite number > 0, "
                                      "or 0 for greedy decoding")
    if top_k is not None and not (_is_int(top_k) and 1 <= top_k <= vocab_size):
        raise GenerationArgumentError(f"{where}(top_k={top_k!r}): expected None or an integer in [1, {vocab_size}]")


def check_generate_args(where: str, max_new_tokens, temperature, top_k, repeats, vocab_size: int,
                        min_new_tokens: int = 0) -> None:
    """The arguments generate() and generate_completions() share, each named with its value when wrong."""
    if not (_is_int(max_new_tokens) and max_new_tokens >= min_new_tokens):
        what = "0 returns the prompts as they are" if min_new_tokens == 0 else "tokens to generate"
        raise GenerationArgumentError(f"{where}(max_new_tokens={max_new_tokens!r}): expected an integer "
                                      f">= {min_new_tokens} ({what})")
    check_sampling_args(where, temperature, top_k, vocab_size)
    if not (_is_int(repeats) and repeats >= 1):
        raise GenerationArgumentError(f"{where}(repeats={repeats!r}): expected an integer >= 1")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.attention == "mla":
            self.attn = MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.max_seq_len, cfg.kv_rank, cfg.rope_dim,
                                                 cfg.q_rank, cfg.rope_theta, cfg.norm_eps)
        else:
            self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoELayer(cfg.d_model, cfg.moe) if cfg.is_moe_layer(layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.ffn(self.norm2(x))


class Transformer(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> logits over the vocabulary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"Transformer(cfg={cfg!r}): expected a ModelConfig")
        self.cfg = cfg.check()  # again: a field changed since construction (cfg.norm_eps = nan) is named here
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
        if idx.numel() and bool(((idx < 0) | (idx >= self.cfg.vocab_size)).any()):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}); got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")

    def new_cache(self, capacity: Optional[int] = None) -> KVCache:
        """An empty KV cache for this model: one LayerCache per block, for `capacity` positions (default max_seq_len)."""
        if capacity is not None and not 1 <= capacity <= self.cfg.max_seq_len:
            raise ValueError(f"new_cache(capacity={capacity}): expected an integer in [1, max_seq_len={self.cfg.max_seq_len}]")
        return KVCache(self.cfg.n_layers, capacity or self.cfg.max_seq_len)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, loss_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        loss is the mean cross-entropy of targets over positions where loss_mask is 1 (all positions
        when loss_mask is None). It does not include the routers' balance_loss().
        With a cache, idx are the tokens that follow the cache.length tokens already cached: they
        take positions cache.length, cache.length + 1, ..., and are appended to the cache.
        """
        self.check_tokens(idx)
        start = cache.length if cache is not None else 0
        if start + idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + idx.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        logits = self.head(self.norm(x)).float()  # (B, T, V)
        if targets is None:
            return logits, None
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
        if loss_mask is None:
            return logits, nll.mean()
        m = loss_mask.flatten().to(nll.dtype)
        return logits, (nll * m).sum() / m.sum().clamp_min(1.0)

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True, repeats: int = 1, return_logits: bool = False):
        """Sample up to max_new_tokens after the prompts idx (B, T0); returns (B * repeats, T0 + n).

        temperature 0 means greedy. With stop_token, a row that has produced it keeps emitting it
        (so the batch stays rectangular) and generation ends once every row has stopped.
        use_cache=True runs the prompts once (prefill), then one token per row per step against the
        KV cache; use_cache=False re-runs the whole sequence at every step. Both compute the same
        function. Once the sequence outgrows max_seq_len, the oldest tokens are cut off and the cache
        cannot follow (its RoPE positions would shift): generation goes on without it.
        repeats > 1 continues each prompt `repeats` times (rows i * repeats + j): with the cache the
        prompt is run once and its cache copied, the way GRPO's groups share their prompt.
        return_logits=True also returns the logits of every step, (B * repeats, n, V), before temperature.
        Runs in eval mode (no token dropping in MoE layers) and restores the model's mode after, under
        torch.inference_mode (less overhead per operation than no_grad; the results are ordinary tensors).

        Every argument is checked first (a GenerationArgumentError, both a ValueError and a TypeError,
        naming it): max_new_tokens an integer >= 0 (0 returns the prompts as they are), temperature a
        finite number >= 0, top_k None or an integer in [1, vocab_size], stop_token None or a token id.
        """
        check_generate_args("generate", max_new_tokens, temperature, top_k, repeats, self.cfg.vocab_size)
        if stop_token is not None and not (_is_int(stop_token) and 0 <= stop_token < self.cfg.vocab_size):
            raise GenerationArgumentError(f"generate(stop_token={stop_token!r}): expected None or a token id "
                                          f"in [0, {self.cfg.vocab_size - 1}]")
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[1] < 1:
            shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
            raise GenerationArgumentError(f"generate: idx has shape {shape}: expected a tensor (batch, prompt length >= 1)")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise GenerationArgumentError(f"generate: idx has dtype {idx.dtype}: expected integer token ids")
        was_training = self.training
        if was_training:  # (walking the modules costs time: only when the mode must change)
            self.eval()
        try:
            with torch.inference_mode():
                out = self._generate(idx, max_new_tokens, temperature, top_k, stop_token, generator, use_cache,
                                     repeats, return_logits)
        finally:
            if was_training:
                self.train()
        # inference tensors cannot enter autograd later (GRPO trains on these tokens): hand back plain copies
        return tuple(t.clone() for t in out) if return_logits else out.clone()

    def _generate(self, idx, max_new_tokens, temperature, top_k, stop_token, generator, use_cache, repeats,
                  return_logits):
        L = self.cfg.max_seq_len
        # a cache for the longest sequence this call can produce (the cut-off beyond L goes on without it)
        cache = self.new_cache(min(L, idx.shape[1] + max_new_tokens)) if use_cache and idx.shape[1] <= L else None
        if repeats > 1 and cache is not None:  # prefill once per prompt, then copy its cache
            last = self(idx, cache=cache)[0][:, -1]  # (B, V)
            cache.repeat_interleave(repeats)
            last = last.repeat_interleave(repeats, dim=0)
        else:
            last = None
        idx = idx.repeat_interleave(repeats, dim=0)  # (B * repeats, T0)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        steps = []
        for _ in range(max_new_tokens):
            if last is not None:
                logits, last = last, None  # the prefill of the shared prompts already gave them
            elif cache is not None and idx.shape[1] <= L:
                logits = self(idx[:, cache.length:], cache=cache)[0][:, -1]  # the prompt, then one token per row
            else:
                cache = None  # the context outgrew max_seq_len: the cache cannot follow the cut-off
                logits = self(idx[:, -L:])[0][:, -1]  # (B, V): the next token's scores
            if return_logits:
                steps.append(logits)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                scaled = logits / temperature
                if top_k is not None:
                    kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done |= nxt == stop_token
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if stop_token is not None and bool(done.all()):
                break
        if return_logits:
            V = self.cfg.vocab_size
            return idx, torch.stack(steps, 1) if steps else idx.new_zeros(idx.shape[0], 0, V, dtype=torch.float32)
        return idx
