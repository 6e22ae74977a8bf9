"""The building blocks of a modern decoder (notebook 02): RMSNorm, rotary embeddings, causal
self-attention and the SwiGLU feed-forward.

Papers: RMSNorm (Zhang & Sennrich 2019), RoFormer / RoPE (Su et al. 2021), "Attention Is All You
Need" (Vaswani et al. 2017), GLU variants / SwiGLU (Shazeer 2020). Llama and DeepSeek use the same
four pieces.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32 for stability, return in the input's dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2): angle = position * theta^(-2i/head_dim)."""
    if head_dim % 2:
        raise ValueError(f"rope_tables: head_dim={head_dim}: expected an even number (RoPE rotates pairs)")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of every head by its position's angle.

    x: (B, H, T, hd); cos, sin: (T, hd/2). The dot product of two rotated vectors then depends only
    on the distance between their positions.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, hd/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, hd/2, 2)
    return out.flatten(-2)  # (B, H, T, hd), pairs interleaved back


def causal_mask(n_new: int, n_cached: int, device=None) -> Tensor:
    """(n_new, n_cached + n_new) boolean mask, True where attention is allowed: the query at position
    n_cached + i sees every cached key and the new keys up to itself."""
    q_pos = torch.arange(n_cached, n_cached + n_new, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(n_cached + n_new, device=device)[None, :]  # (1, S)
    return k_pos <= q_pos  # (T, S)


def attend(q: Tensor, k: Tensor, v: Tensor, n_cached: int, scale: Optional[float] = None) -> Tensor:
    """Causal attention of T new queries over S = n_cached + T keys: (B, H, T, dq) x (B, H, S, dq) -> (B, H, T, dv).

    Without a cache (n_cached = 0) this is the usual causal mask; one new query (a decode step) may
    see every key, so it needs no mask at all; otherwise the mask is offset by the cached positions.
    """
    T = q.shape[-2]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if n_cached == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, n_cached, q.device), scale=scale)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with RoPE and a causal mask, through PyTorch's fused SDPA.

    With a `cache` (a moe_lab.model.kv_cache.LayerCache), the new tokens take the positions after
    the cached ones (RoPE is offset by cache.length), their keys and values are appended to the
    cache, and the new queries attend over everything cached (notebook 10).
    """

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, rope_theta: float = 10000.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: n_heads={n_heads}: expected a divisor of d_model={d_model}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rope_tables(self.head_dim, max_seq_len, rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        B, T, C = x.shape
        pos = cache.length if cache is not None else 0  # position of the first new token
        if pos + T > self.cos.shape[0]:
            raise ValueError(f"sequence length {pos + T} exceeds max_seq_len={self.cos.shape[0]}")
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]  # the new tokens' positions, not 0..T-1
        q, k = apply_rope(qkv[:2], cos, sin).unbind(0)  # rotate queries and keys in one call: (B, H, T, hd) each
        v = qkv[2]
        if cache is not None:
            k, v = cache.append(k=k, v=v)  # (B, H, pos + T, hd): the cached keys and values, then the new ones
        y = attend(q, k, v, pos)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class SwiGLU(nn.Module):
    """The gated feed-forward of Llama/DeepSeek: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)  # gate projection
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)  # up projection
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)  # down projection

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
