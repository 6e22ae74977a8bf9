"""Multi-head latent attention (MLA), DeepSeek-V2 section 2.1 (kept in DeepSeek-V3), notebook 10.

MHA caches every head's key and value: 2 * n_heads * head_dim numbers per token and layer. MLA
caches one small latent per token instead and rebuilds the keys and values from it:

    c_kv   = RMSNorm(x W_DKV)                    (B, T, d_c)     the compressed latent: CACHED
    k_C    = c_kv W_UK,  v = c_kv W_UV           (B, H, T, hd)   per-head keys and values, rebuilt
    q      = x W_Q  or  RMSNorm(x W_DQ) W_UQ     (B, H, T, hd + d_r)   (queries optionally low-rank too)

RoPE cannot act on k_C: a rotation between c_kv and the query would stop W_UK from being folded into
the query (below). So position lives in a separate, "decoupled" part: each head's query gets d_r
extra rotated numbers, and all heads share one rotated key k_R = RoPE(x W_KR) of width d_r, which
is CACHED too. A head's score is

    (q_C . k_C + q_R . k_R) / sqrt(hd + d_r)      (scaled by the full query-key width)

so the cache holds d_c + d_r numbers per token and layer (DeepSeek-V3: 512 + 64 = 576, against
2 * 128 * 128 = 32768 for MHA of its size).

The absorbed form (inference). q_C . k_C = q_C . (W_UK^h c) = (W_UK^h^T q_C) . c: the key
up-projection folds into the query projection, and the value up-projection into the output
projection (sum_h (p_h c) W_UV^h W_O^h). The heads then attend directly over the cached latent,
never rebuilding keys or values. `absorb=True` runs this form; both give the same outputs.

Weights carry the paper's names (W_DKV is `w_dkv`, ...). Shapes follow PyTorch's Linear: weight
(out_features, in_features).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moe_lab.model.layers import RMSNorm, apply_rope, attend, rope_tables


class MultiHeadLatentAttention(nn.Module):
    """MLA with RMSNorm on the latent, optional low-rank queries and a decoupled RoPE key."""

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, kv_rank: int, rope_dim: int,
                 q_rank: Optional[int] = None, rope_theta: float = 10000.0, norm_eps: float = 1e-5):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MultiHeadLatentAttention: n_heads={n_heads}: expected a divisor of d_model={d_model}")
        if rope_dim % 2:
            raise ValueError(f"MultiHeadLatentAttention: rope_dim={rope_dim}: expected an even number (RoPE rotates pairs)")
        H, hd = n_heads, d_model // n_heads
        self.n_heads, self.head_dim, self.kv_rank, self.rope_dim, self.q_rank = H, hd, kv_rank, rope_dim, q_rank
        q_width = H * (hd + rope_dim)  # every head's query: hd numbers that meet k_C, rope_dim that meet k_R
        if q_rank:
            self.w_dq = nn.Linear(d_model, q_rank, bias=False)  # W_DQ: queries' down-projection
            self.q_norm = RMSNorm(q_rank, norm_eps)
            self.w_uq = nn.Linear(q_rank, q_width, bias=False)  # W_UQ and W_QR together
        else:
            self.w_q = nn.Linear(d_model, q_width, bias=False)
        self.w_dkv = nn.Linear(d_model, kv_rank, bias=False)  # W_DKV: down to the latent
        self.kv_norm = RMSNorm(kv_rank, norm_eps)
        self.w_uk = nn.Linear(kv_rank, H * hd, bias=False)  # W_UK: latent -> keys
        self.w_uv = nn.Linear(kv_rank, H * hd, bias=False)  # W_UV: latent -> values
        self.w_kr = nn.Linear(d_model, rope_dim, bias=False)  # W_KR: the shared RoPE key
        self.w_o = nn.Linear(H * hd, d_model, bias=False)  # W_O
        self.scale = 1.0 / math.sqrt(hd + rope_dim)  # the full query-key width
        cos, sin = rope_tables(rope_dim, max_seq_len, rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.absorb = False  # run the absorbed form (same function; switch at any time)

    # --- the pieces ------------------------------------------------------------------------------
    def query_input(self, x: Tensor) -> Tensor:
        """What the query up-projection reads: x, or the normalised query latent c_q."""
        return self.q_norm(self.w_dq(x)) if self.q_rank else x

    @property
    def q_proj(self) -> nn.Linear:
        """The query up-projection: W_UQ (with W_QR) after the query latent, or W_Q on x."""
        return self.w_uq if self.q_rank else self.w_q

    def query_weight(self) -> Tensor:
        """The query projection's weight as (H, hd + d_r, q_in): per head, hd rows for q_C then d_r for q_R."""
        return self.q_proj.weight.view(self.n_heads, self.head_dim + self.rope_dim, -1)

    def latent(self, x: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """What the cache holds for new tokens at positions pos, pos+1, ...: (c_kv (B, T, d_c), k_R (B, T, d_r))."""
        T = x.shape[1]
        c_kv = self.kv_norm(self.w_dkv(x))  # (B, T, d_c)
        k_rope = apply_rope(self.w_kr(x)[:, None], self.cos[pos:pos + T], self.sin[pos:pos + T])[:, 0]  # (B, T, d_r)
        return c_kv, k_rope

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """(W_UK folded into the query projection: (H, d_c, q_in); W_UV folded into W_O: (H, d_c, d_model))."""
        H, hd = self.n_heads, self.head_dim
        w_q_nope = self.query_weight()[:, :hd]  # (H, hd, q_in)
        w_uk = self.w_uk.weight.view(H, hd, self.kv_rank)  # (H, hd, d_c)
        w_q_latent = torch.einsum("hdc,hdi->hci", w_uk, w_q_nope)  # (H, d_c, q_in): q_latent = W_UK^T q_C
        w_uv = self.w_uv.weight.view(H, hd, self.kv_rank)  # (H, hd, d_c)
        w_o = self.w_o.weight.view(-1, H, hd)  # (d_model, H, hd)
        w_ov = torch.einsum("hdc,ehd->hce", w_uv, w_o)  # (H, d_c, d_model)
        return w_q_latent, w_ov

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, cache=None) -> Tensor:
        B, T, _ = x.shape
        H, hd, dr = self.n_heads, self.head_dim, self.rope_dim
        pos = cache.length if cache is not None else 0
        if pos + T > self.cos.shape[0]:
            raise ValueError(f"sequence length {pos + T} exceeds max_seq_len={self.cos.shape[0]}")
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]  # the new tokens' positions
        q_in = self.query_input(x)  # (B, T, q_in)
        c_kv, k_rope = self.latent(x, pos)  # (B, T, d_c), (B, T, d_r)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv=c_kv, k_rope=k_rope)  # (B, S, d_c), (B, S, d_r), S = pos + T
        S = c_kv.shape[1]
        k_r = k_rope[:, None].expand(B, H, S, dr)  # one RoPE key, shared by every head
        if not self.absorb:
            q = self.q_proj(q_in).view(B, T, H, hd + dr).transpose(1, 2)  # (B, H, T, hd + d_r)
            q_nope, q_rope = q.split([hd, dr], dim=-1)
            q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], -1)  # position only in the d_r part
            k_nope = self.w_uk(c_kv).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd): keys rebuilt from the latent
            v = self.w_uv(c_kv).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
            k = torch.cat([k_nope, k_r], -1)  # (B, H, S, hd + d_r)
            y = attend(q, k, v, pos, scale=self.scale)  # (B, H, T, hd)
            return self.w_o(y.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, d_model)
        w_q_latent, w_ov = self.absorbed_weights()
        q_latent = torch.einsum("bti,hci->bhtc", q_in, w_q_latent)  # (B, H, T, d_c)
        q_rope = torch.einsum("bti,hdi->bhtd", q_in, self.query_weight()[:, hd:])  # (B, H, T, d_r)
        q = torch.cat([q_latent, apply_rope(q_rope, cos, sin)], -1)  # (B, H, T, d_c + d_r)
        k = torch.cat([c_kv[:, None].expand(B, H, S, self.kv_rank), k_r], -1)  # (B, H, S, d_c + d_r)
        v = c_kv[:, None].expand(B, H, S, self.kv_rank)  # (B, H, S, d_c): the latent is every head's value
        ctx = attend(q, k, v, pos, scale=self.scale)  # (B, H, T, d_c), same scale: the function is unchanged
        return torch.einsum("bhtc,hce->bte", ctx, w_ov)  # (B, T, d_model)
