"""The building blocks of a modern decoder (notebook 02): RMSNorm, rotary embeddings, causal
self-attention and the SwiGLU feed-forward.

Papers: RMSNorm (Zhang & Sennrich 2019), RoFormer / RoPE (Su et al. 2021), "Attention Is All You
Need" (Vaswani et al. 2017), GLU variants / SwiGLU (Shazeer 2020). Llama and DeepSeek use the same
four pieces.
"""
from __future__ import annotations

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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with RoPE and a causal mask, through PyTorch's fused SDPA."""

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

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        if T > self.cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cos.shape[0]}")
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        q, k = apply_rope(q, self.cos[:T], self.sin[:T]), apply_rope(k, self.cos[:T], self.sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
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
