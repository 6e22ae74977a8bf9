"""The KV cache of autoregressive generation (notebook 10), and what it costs in memory.

Without a cache, generating token t re-runs the whole prefix: every layer recomputes the keys and
values of tokens 0..t-1, which have not changed (attention is causal). With a cache, the prompt is
run once (the *prefill*), each layer keeps what later tokens will attend to, and every further
step runs only the one new token per row (the *decode*), appending its entries to the cache.

What a layer keeps depends on its attention:

    multi-head attention (MHA)    keys and values of every head            2 * n_heads * head_dim per token
    grouped-query (GQA)           keys and values of n_kv_heads groups      2 * n_kv_heads * head_dim
    multi-query (MQA)             one key and one value head                2 * head_dim
    multi-head latent (MLA)       the compressed latent c_kv and the        kv_rank + rope_dim
                                  shared RoPE key (DeepSeek-V2, section 2.1)

`cache_bytes_per_token` computes these for a whole model; `DEEPSEEK_V3` holds DeepSeek-V3's
published sizes (its config.json) for comparison.

The cache here is a *static* one, as inference engines use: each tensor is allocated once for the
longest sequence of the call (at most the model's max_seq_len) and filled left to right, so a decode step copies only the new
token's entries (concatenating would copy the whole cache at every step). Every tensor it holds has
its time axis at dim -2: (B, H, T, head_dim) for MHA keys and values, (B, T, d) for MLA's latent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

AttentionKind = Literal["mha", "gqa", "mqa", "mla"]


class LayerCache:
    """One attention layer's cache: named tensors appended along their time axis (dim -2).

    `append(k=..., v=...)` writes the new entries after those already held and returns the full
    tensors (the old entries followed by the new ones), ready to attend over.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"LayerCache(capacity={capacity}): expected a positive number of positions")
        self.capacity = capacity  # positions the buffers hold (the longest sequence it was made for)
        self.length = 0  # positions filled so far: the position of the next token
        self.buffers: dict[str, Tensor] = {}

    def append(self, **new: Tensor) -> tuple[Tensor, ...]:
        """Write each new tensor (..., T, d) after the cached entries of the same name; return the full ones."""
        T = next(iter(new.values())).shape[-2]
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache full: {self.length} cached + {T} new positions exceed its capacity "
                             f"{self.capacity} (the positions it was created for)")
        out = []
        for name, t in new.items():
            if t.shape[-2] != T:
                raise ValueError(f"LayerCache.append: {name} has {t.shape[-2]} new positions, expected {T}")
            buf = self.buffers.get(name)
            if buf is None:  # first append: allocate for the whole capacity
                buf = t.new_empty(*t.shape[:-2], self.capacity, t.shape[-1])
                self.buffers[name] = buf
            elif buf.shape[:-2] != t.shape[:-2] or buf.shape[-1] != t.shape[-1]:
                raise ValueError(f"LayerCache.append: {name} has shape {tuple(t.shape)}, the cache holds "
                                 f"{tuple(buf.shape[:-2])} x T x {buf.shape[-1]}")
            buf[..., self.length:end, :] = t
            out.append(buf[..., :end, :])
        self.length = end
        return tuple(out)

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times in place (row i becomes rows i*repeats .. i*repeats + repeats-1)."""
        for name, buf in self.buffers.items():
            B, rest = buf.shape[0], buf.shape[1:]
            new = buf.new_empty(B, repeats, *rest)  # a full-capacity buffer, row i's copies side by side ...
            new[..., :self.length, :] = buf[:, None, ..., :self.length, :]  # ... filled so far, in one broadcast copy
            self.buffers[name] = new.view(B * repeats, *rest)

    def nbytes(self) -> int:
        """Bytes of the filled part (what a dynamically grown cache would hold)."""
        return sum(b[..., :self.length, :].numel() * b.element_size() for b in self.buffers.values())


class KVCache:
    """The caches of every layer of a model, plus the position the next token will have."""

    def __init__(self, n_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far (per row): the RoPE position of the next token."""
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def repeat_interleave(self, repeats: int) -> None:
        """Copy each row's cache `repeats` times: G samples of one prompt share its prefill."""
        for layer in self.layers:
            layer.repeat_interleave(repeats)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Bytes per cached token per row, measured on the tensors held."""
        rows = next((b.shape[0] for b in self.layers[0].buffers.values()), 0)
        return self.nbytes() / (self.length * rows) if self.length and rows else 0.0


# --------------------------------------------------------------------------------------------------
# What a cache costs
# --------------------------------------------------------------------------------------------------
def cache_elements_per_token(kind: AttentionKind, n_heads: int, head_dim: int, n_kv_heads: Optional[int] = None,
                             kv_rank: Optional[int] = None, rope_dim: Optional[int] = None) -> int:
    """Numbers one layer caches per token: see the table of the module docstring.

    kind "gqa" needs n_kv_heads (a divisor of n_heads); "mla" needs kv_rank and rope_dim.
    """
    if kind == "mha":
        return 2 * n_heads * head_dim
    if kind == "mqa":
        return 2 * head_dim
    if kind == "gqa":
        if not n_kv_heads or n_heads % n_kv_heads:
            raise ValueError(f"cache_elements_per_token(kind='gqa', n_kv_heads={n_kv_heads!r}): expected a divisor "
                             f"of n_heads={n_heads}")
        return 2 * n_kv_heads * head_dim
    if kind == "mla":
        if not kv_rank or rope_dim is None:
            raise ValueError(f"cache_elements_per_token(kind='mla'): needs kv_rank and rope_dim, got "
                             f"kv_rank={kv_rank!r}, rope_dim={rope_dim!r}")
        return kv_rank + rope_dim
    raise ValueError(f"cache_elements_per_token(kind={kind!r}): expected one of 'mha', 'gqa', 'mqa', 'mla'")


def cache_bytes_per_token(kind: AttentionKind, n_layers: int, n_heads: int, head_dim: int, bytes_per_element: int = 2,
                          n_kv_heads: Optional[int] = None, kv_rank: Optional[int] = None,
                          rope_dim: Optional[int] = None) -> int:
    """Bytes a whole model caches per token of context: layers x elements per layer x element size."""
    if n_layers < 1 or bytes_per_element < 1:
        raise ValueError(f"cache_bytes_per_token: n_layers={n_layers}, bytes_per_element={bytes_per_element}: "
                         "expected positive integers")
    return n_layers * bytes_per_element * cache_elements_per_token(kind, n_heads, head_dim, n_kv_heads, kv_rank, rope_dim)


@dataclass(frozen=True)
class AttentionSizes:
    """The sizes that decide a model's KV cache."""

    name: str
    n_layers: int
    n_heads: int
    head_dim: int  # per-head width of keys and values (MHA/GQA/MQA); MLA's value/"nope" width
    kv_rank: int  # MLA's d_c
    rope_dim: int  # MLA's decoupled RoPE key width d_h^R
    n_kv_heads: int  # the GQA comparison's key/value heads
    bytes_per_element: int  # 2 for bf16 / fp16, 4 for float32


# DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3; paper section 2.1.1): 61 layers, 128 heads,
# qk_nope_head_dim = v_head_dim = 128, kv_lora_rank = 512, qk_rope_head_dim = 64, cache in bf16.
# The GQA line uses 8 key/value groups, as Llama-3-70B does, for comparison.
DEEPSEEK_V3 = AttentionSizes("DeepSeek-V3", n_layers=61, n_heads=128, head_dim=128, kv_rank=512, rope_dim=64,
                             n_kv_heads=8, bytes_per_element=2)


def sizes_of(cfg, name: str = "course model", bytes_per_element: int = 4, n_kv_heads: Optional[int] = None) -> AttentionSizes:
    """The AttentionSizes of a ModelConfig (its MLA fields whatever its attention; GQA with n_heads // 2 groups)."""
    return AttentionSizes(name, cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.kv_rank, cfg.rope_dim,
                          n_kv_heads or max(1, cfg.n_heads // 2), bytes_per_element)


def cache_table(sizes: AttentionSizes) -> list[dict]:
    """One row per attention kind: bytes per token, and relative to MHA."""
    rows = []
    mha = cache_bytes_per_token("mha", sizes.n_layers, sizes.n_heads, sizes.head_dim, sizes.bytes_per_element)
    for kind, label in (("mha", "MHA"), ("gqa", f"GQA ({sizes.n_kv_heads} groups)"), ("mqa", "MQA"), ("mla", "MLA")):
        b = cache_bytes_per_token(kind, sizes.n_layers, sizes.n_heads, sizes.head_dim, sizes.bytes_per_element,
                                  n_kv_heads=sizes.n_kv_heads, kv_rank=sizes.kv_rank, rope_dim=sizes.rope_dim)
        rows.append({"model": sizes.name, "attention": label, "kind": kind, "bytes_per_token": b,
                     "vs_mha": b / mha})
    return rows
