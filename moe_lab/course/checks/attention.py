"""Checkers for notebook 10 (the KV cache and multi-head latent attention): the cache append, the RoPE
position offset, MLA's latent down and up projections, and the absorbed query.

Conventions of the exercises (plain matrices, `x @ w`): queries, keys and values are (B, H, T, hd);
MLA's weights are w_dkv (d_model, d_c), w_uk and w_uv (d_c, H * hd), head h owning columns
h * hd .. (h + 1) * hd.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F

from moe_lab.course.checks.common import CheckFailed, _compare, _ok, checker
from moe_lab.model import layers


def _tuple(name: str, got, n: int, what: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise CheckFailed(f"{name}: return {n} values ({what}); got {type(got).__name__}"
                          + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""))
    for i, t in enumerate(got):
        if not isinstance(t, torch.Tensor):
            raise CheckFailed(f"{name}: value {i} of ({what}) should be a torch.Tensor, got {type(t).__name__}")
    return tuple(got)


# --------------------------------------------------------------------------------------------------
# The KV cache
# --------------------------------------------------------------------------------------------------
@checker
def check_cache_append(attend_with_cache: Callable) -> None:
    """attend_with_cache(q, k_new, v_new, k_cache, v_cache) -> (out, k_cache, v_cache): one decode step.

    q, k_new, v_new (B, H, 1, hd): the new token; k_cache, v_cache (B, H, S, hd): the S tokens before
    it. The cache grows to S + 1 (new entries last, along the time axis, dim 2) and the new query
    attends over all S + 1 keys with softmax(q k^T / sqrt(hd)).
    """
    name = "check_cache_append"
    g = torch.Generator().manual_seed(10)
    B, H, S, hd = 2, 3, 5, 4
    q, k_new, v_new = (torch.randn(B, H, 1, hd, generator=g) for _ in range(3))
    k_cache, v_cache = torch.randn(B, H, S, hd, generator=g), torch.randn(B, H, S, hd, generator=g)
    k_all, v_all = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
    expected = F.scaled_dot_product_attention(q, k_all, v_all)
    try:
        result = attend_with_cache(q, k_new, v_new, k_cache.clone(), v_cache.clone())
    except RuntimeError as e:  # torch.cat along another axis: the shapes fit only along dim 2
        wrong_axis = re.search(r"Sizes of tensors must match except in dimension (\d+)", str(e))
        if wrong_axis:
            raise CheckFailed(f"{name}: torch.cat joined the cache {(B, H, S, hd)} and the new key {(B, H, 1, hd)} along "
                              f"dim {wrong_axis.group(1)}, where their sizes differ: append along the time axis, dim 2 "
                              f"(the positions), giving {(B, H, S + 1, hd)}") from None
        raise
    out, k_got, v_got = _tuple(name, result, 3, "out, k_cache, v_cache")
    if k_got.shape == (B, H, S, hd):
        raise CheckFailed(f"{name}: the returned cache did not grow (still {S} positions): append the new key and "
                          f"value, so the next step can attend to this token")
    if k_got.shape != k_all.shape or v_got.shape != v_all.shape:
        raise CheckFailed(f"{name}: the caches have shapes {tuple(k_got.shape)} and {tuple(v_got.shape)}, expected "
                          f"{tuple(k_all.shape)} each: append along the time axis (dim 2, the positions)")
    if torch.allclose(k_got, torch.cat([k_new, k_cache], 2)):
        raise CheckFailed(f"{name}: the new key went before the cached ones: append at the end (position S), "
                          f"so position t of the cache is token t")
    if torch.allclose(k_got, torch.cat([k_cache, k_new], 2)) and torch.allclose(v_got, torch.cat([v_cache, k_new], 2)):
        raise CheckFailed(f"{name}: the value cache received the new key: append v_new to v_cache")
    _compare(name, k_got, k_all, what="key cache")
    _compare(name, v_got, v_all, what="value cache")
    if isinstance(out, torch.Tensor) and out.shape == expected.shape:
        if torch.allclose(out, F.scaled_dot_product_attention(q, k_cache, v_cache), atol=1e-5):
            raise CheckFailed(f"{name}: the new token attended only to the cached tokens: attend over the cache "
                              f"after appending, so the token sees itself too (as in the full causal forward)")
        if torch.allclose(out, F.scaled_dot_product_attention(q, k_all, v_all, scale=1.0), atol=1e-5):
            raise CheckFailed(f"{name}: the scores are not scaled: softmax(q k^T / sqrt(head_dim))")
    _compare(name, out, expected, what="attention output")
    _ok(name)


@checker
def check_rope_offset(rope_new_tokens: Callable) -> None:
    """rope_new_tokens(x (B, H, T, hd), cos, sin, n_cached) -> x rotated at positions n_cached .. n_cached + T - 1."""
    name = "check_rope_offset"
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, 8, generator=g)
    cos, sin = layers.rope_tables(8, 32)
    n = 9
    expected = layers.apply_rope(x, cos[n:n + 4], sin[n:n + 4])
    got = rope_new_tokens(x.clone(), cos, sin, n)
    if isinstance(got, torch.Tensor) and got.shape == x.shape:
        if torch.allclose(got, layers.apply_rope(x, cos[:4], sin[:4]), atol=1e-5):
            raise CheckFailed(f"{name}: the new tokens were rotated as positions 0..3, as if they came first; they "
                              f"follow {n} cached tokens, so their positions are {n}..{n + 3}: offset the tables by n_cached")
        for off in (n - 1, n + 1):
            if torch.allclose(got, layers.apply_rope(x, cos[off:off + 4], sin[off:off + 4]), atol=1e-5):
                raise CheckFailed(f"{name}: off by one: the first new token's position is n_cached={n} (positions "
                                  f"0..{n - 1} are cached), you used {off}")
        if torch.allclose(got, layers.apply_rope(x, cos[n:n + 1].expand(4, -1), sin[n:n + 1].expand(4, -1)), atol=1e-5):
            raise CheckFailed(f"{name}: every new token got position {n}: token i of the chunk sits at n_cached + i")
    _compare(name, got, expected)
    _ok(name)


# --------------------------------------------------------------------------------------------------
# Multi-head latent attention
# --------------------------------------------------------------------------------------------------
def mla_keys_values_reference(x, w_dkv, norm_weight, w_uk, w_uv, n_heads, eps=1e-5):
    """(c_kv (B, T, d_c), k (B, H, T, hd), v (B, H, T, hd)): RMSNorm(x @ w_dkv), then the up-projections."""
    B, T, _ = x.shape
    c = x @ w_dkv  # (B, T, d_c)
    c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    k = (c @ w_uk).view(B, T, n_heads, -1).transpose(1, 2)  # (B, H, T, hd)
    v = (c @ w_uv).view(B, T, n_heads, -1).transpose(1, 2)
    return c, k, v


@checker
def check_mla_kv(mla_keys_values: Callable) -> None:
    """mla_keys_values(x, w_dkv, norm_weight, w_uk, w_uv, n_heads) -> (c_kv, k, v): down, RMSNorm, up per head."""
    name = "check_mla_kv"
    g = torch.Generator().manual_seed(12)
    B, T, d, dc, H, hd = 2, 5, 12, 6, 3, 4
    x = torch.randn(B, T, d, generator=g)
    w_dkv = torch.randn(d, dc, generator=g) * 0.5
    norm_weight = torch.rand(dc, generator=g) + 0.5
    w_uk, w_uv = torch.randn(dc, H * hd, generator=g), torch.randn(dc, H * hd, generator=g)
    c_exp, k_exp, v_exp = mla_keys_values_reference(x, w_dkv, norm_weight, w_uk, w_uv, H)
    c, k, v = _tuple(name, mla_keys_values(x, w_dkv, norm_weight, w_uk, w_uv, H), 3, "c_kv, k, v")
    if c.shape == c_exp.shape:
        down = x @ w_dkv  # (B, T, d_c) before the norm
        rms = down * torch.rsqrt(down.pow(2).mean(-1, keepdim=True) + 1e-5)
        if torch.allclose(c, down, atol=1e-5):
            raise CheckFailed(f"{name}: the latent c_kv is not normalised: DeepSeek-V2 applies RMSNorm (with its weight) to "
                              f"x @ w_dkv before the up-projections, and caches the normalised latent")
        if any(torch.allclose(c, F.layer_norm(down, (dc,), weight=w, eps=1e-5), atol=1e-4) for w in (norm_weight, None)):
            raise CheckFailed(f"{name}: the latent was normalised with LayerNorm, not RMSNorm: RMSNorm does not subtract "
                              f"the mean, it divides by the root mean square, x * rsqrt(mean(x**2) + eps) * norm_weight "
                              f"(notebook 02), as DeepSeek-V2 does on the latent")
        if torch.allclose(c, rms, atol=1e-5):
            raise CheckFailed(f"{name}: RMSNorm without its weight: multiply the normalised latent by norm_weight "
                              f"(its learned scale per latent number), x * rsqrt(mean(x**2) + eps) * norm_weight")
    _compare(name, c, c_exp, what="latent c_kv")
    if k.shape == (B, T, H, hd):
        raise CheckFailed(f"{name}: k has shape {(B, T, H, hd)}: move the heads before the positions, (B, H, T, hd)")
    if k.shape == k_exp.shape:
        if torch.allclose(k, v_exp, atol=1e-5) and torch.allclose(v, k_exp, atol=1e-5):
            raise CheckFailed(f"{name}: keys and values are swapped: k = c_kv @ w_uk, v = c_kv @ w_uv")
        wrong_split = (c_exp @ w_uk).view(B, T, hd, H).permute(0, 3, 1, 2)
        if torch.allclose(k, wrong_split, atol=1e-5):
            raise CheckFailed(f"{name}: the heads are split the wrong way: head h owns columns h*hd..(h+1)*hd of "
                              f"c_kv @ w_uk, so view the result as (B, T, H, hd), not (B, T, hd, H)")
        if torch.allclose(k, (c_exp @ w_uk).view(B, H, T, hd), atol=1e-5):
            raise CheckFailed(f"{name}: the heads were split with view(B, H, T, hd): a view only re-reads the memory, "
                              f"which is laid out (B, T, H * hd), so it mixes tokens and heads; view as (B, T, H, hd), "
                              f"then transpose(1, 2) to (B, H, T, hd)")
    _compare(name, k, k_exp, what="key tensor k")
    _compare(name, v, v_exp, what="value tensor v")
    _ok(name)


@checker
def check_absorbed_query(absorb_query: Callable) -> None:
    """absorb_query(q_nope (B, H, T, hd), w_uk (d_c, H * hd)) -> q_latent (B, H, T, d_c) with q_latent . c = q_nope . (c @ w_uk_h)."""
    name = "check_absorbed_query"
    g = torch.Generator().manual_seed(13)
    B, H, T, hd, dc = 2, 3, 4, 5, 7
    q = torch.randn(B, H, T, hd, generator=g)
    w_uk = torch.randn(dc, H * hd, generator=g)
    expected = torch.einsum("bhtd,chd->bhtc", q, w_uk.view(dc, H, hd))
    got = absorb_query(q.clone(), w_uk.clone())
    if isinstance(got, torch.Tensor):
        if got.shape == (B, H, T, H * hd) or got.shape == (B, H, T, hd):
            raise CheckFailed(f"{name}: q_latent has shape {tuple(got.shape)}: it lives in the latent space, so its last "
                              f"dimension is d_c={dc} (multiply by head h's block of w_uk transposed)")
        summed = expected.sum(1, keepdim=True)  # (B, 1, T, d_c)
        if got.shape in ((B, T, dc), (B, 1, T, dc)) or (got.shape == expected.shape
                                                        and torch.allclose(got, summed.expand_as(got), atol=1e-4)):
            raise CheckFailed(f"{name}: the heads were summed: every head keeps its own latent query, (B, H, T, d_c); "
                              f"head h's query meets only head h's keys, so multiply it by head h's block of w_uk alone")
        if got.shape == expected.shape:
            bad_view = torch.einsum("bhtd,hcd->bhtc", q, w_uk.reshape(H, dc, hd))
            if torch.allclose(got, bad_view, atol=1e-4):
                raise CheckFailed(f"{name}: w_uk was reshaped to (H, d_c, hd), which mixes the heads' columns: head h "
                                  f"owns columns h*hd..(h+1)*hd, so view w_uk as (d_c, H, hd)")
            columns_hd_h = torch.einsum("bhtd,cdh->bhtc", q, w_uk.view(dc, hd, H))
            if torch.allclose(got, columns_hd_h, atol=1e-4):
                raise CheckFailed(f"{name}: w_uk's columns were read as (hd, H), so head h took every H-th column; head h "
                                  f"owns the contiguous block h*hd..(h+1)*hd: view w_uk as (d_c, H, hd)")
            factor = (got * expected).sum() / expected.pow(2).sum()  # got = factor * expected?
            if not torch.isclose(factor, torch.tensor(1.0), atol=1e-3) and torch.allclose(got, factor * expected, atol=1e-4):
                what = " = 1/sqrt(hd): the scale was folded in" if math.isclose(factor, hd ** -0.5, rel_tol=1e-3) else ""
                raise CheckFailed(f"{name}: q_latent is the right one times {factor.item():.3g}{what}. The absorbed query only "
                                  f"moves q_nope into the latent space, so that q_latent . c_kv equals q_nope . k exactly; "
                                  f"the scale 1/sqrt(hd + d_r) is applied once, in attention, to the whole score")
    _compare(name, got, expected, atol=1e-4, what="absorbed query")
    c = torch.randn(B, 6, dc, generator=g)  # the property that matters: scores against the latent are unchanged
    k = (c @ w_uk).view(B, 6, H, hd).transpose(1, 2)
    _compare(name, got @ c[:, None].transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-3,
             what="score matrix q_latent . c_kv (it must equal q_nope . k)")
    _ok(name)
