"""Checkers for notebook 10 (the KV cache and multi-head latent attention): the cache append, the RoPE
position offset, MLA's latent down and up projections, its decoupled RoPE key and scaled scores, and
the absorbed query.

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


def mla_scores_reference(q, k, x, w_kr, cos, sin):
    """(scores (B, H, T, T) before the mask and softmax, k_rope (B, T, d_r)): MLA's decoupled RoPE and its scale.

    q (B, H, T, hd + d_r): each head's query, its first hd numbers (q_nope) meeting the keys rebuilt
    from the latent, its last d_r (q_rope, not yet rotated) meeting the shared RoPE key; k (B, H, T, hd);
    x (B, T, d_model); w_kr (d_model, d_r); cos, sin (T, d_r / 2), the tables of positions 0..T-1.
    """
    hd = k.shape[-1]
    q_nope, q_rope = q.split([hd, q.shape[-1] - hd], dim=-1)
    k_rope = layers.apply_rope(x @ w_kr, cos, sin)  # (B, T, d_r): one key per token, shared by every head
    q_rope = layers.apply_rope(q_rope, cos, sin)
    scores = q_nope @ k.transpose(-1, -2) + q_rope @ k_rope[:, None].transpose(-1, -2)  # (B, H, T, T)
    return scores / q.shape[-1] ** 0.5, k_rope


def _mla_score_inputs(seed: int, hd: int, dr: int):
    g = torch.Generator().manual_seed(seed)
    B, H, T, d = 2, 2, 5, 10  # d_r = 4 splits over H = 2 heads: "one key per head" shows as a shape, not a torch error
    q = torch.randn(B, H, T, hd + dr, generator=g)
    k = torch.randn(B, H, T, hd, generator=g)
    x = torch.randn(B, T, d, generator=g)
    w_kr = torch.randn(d, dr, generator=g) * 0.5
    cos, sin = layers.rope_tables(dr, 64)
    return q, k, x, w_kr, cos[:T].clone(), sin[:T].clone()


def _mla_score_variants(q, k, x, w_kr, cos, sin) -> dict:
    """The scores of plausible wrong answers, unscaled (each may come with any scale)."""
    hd, dr = k.shape[-1], q.shape[-1] - k.shape[-1]
    rope = lambda t: layers.apply_rope(t, cos, sin)  # noqa: E731
    mT = lambda t: t.transpose(-1, -2)  # noqa: E731
    q_nope, q_rope = q.split([hd, dr], dim=-1)
    k_raw = (x @ w_kr)[:, None]  # (B, 1, T, d_r), shared by the heads
    variants = {
        "right": q_nope @ mT(k) + rope(q_rope) @ mT(rope(k_raw)),
        "q_rope not rotated": q_nope @ mT(k) + q_rope @ mT(rope(k_raw)),
        "k_rope not rotated": q_nope @ mT(k) + rope(q_rope) @ mT(k_raw),
        "nothing rotated": q_nope @ mT(k) + q_rope @ mT(k_raw),
        "no RoPE part": q_nope @ mT(k),
        "no latent part": rope(q_rope) @ mT(rope(k_raw)),
    }
    if hd == dr:  # mistakes whose shapes only fit when hd == d_r
        variants["RoPE on the latent"] = rope(q_nope) @ mT(rope(k)) + rope(q_rope) @ mT(rope(k_raw))
        variants["RoPE on the latent only"] = rope(q_nope) @ mT(rope(k)) + q_rope @ mT(k_raw)
        variants["RoPE on the latent instead"] = rope(q_nope) @ mT(rope(k))
        variants["q split the wrong way"] = q[..., dr:] @ mT(k) + rope(q[..., :dr]) @ mT(rope(k_raw))
    return variants


def _scale_mistake(factor: float, hd: int, dr: int) -> str:
    """What the learner's scale was, in words, or "" when it is 1/sqrt(hd + d_r)."""
    def near(a, b):
        return math.isclose(a, b, rel_tol=1e-3)
    full = (hd + dr) ** -0.5
    if near(factor, full):
        return ""
    if near(factor, hd ** -0.5) and hd != dr:
        return (f"scale without d_r: the scores were divided by sqrt(hd) = sqrt({hd}), the width of q_nope alone; a score "
                f"is one dot product over all hd + d_r = {hd + dr} numbers of the query and key, so divide by "
                f"sqrt(hd + d_r)")
    if near(factor, dr ** -0.5):
        return (f"the scores were divided by sqrt(d_r) = sqrt({dr}), the width of the RoPE part alone; a score is one dot "
                f"product over all hd + d_r = {hd + dr} numbers, so divide by sqrt(hd + d_r)")
    if near(factor, 1.0):
        return "the scores are not scaled: divide them by sqrt(hd + d_r), the full query-key width"
    if near(factor, (hd + dr) ** 0.5):
        return "the scores were multiplied by sqrt(hd + d_r): divide by it"
    if near(factor, 1 / (hd + dr)):
        return "the scores were divided by hd + d_r: divide by its square root"
    return f"the scores were scaled by {factor:.4g}; expected 1/sqrt(hd + d_r) = 1/sqrt({hd + dr}) = {full:.4g}"


_VARIANT_MESSAGES = {
    "q_rope not rotated": "the query's RoPE part q_rope was not rotated: rotate it with the same tables as the key, so "
                          "q_rope . k_rope depends on the distance between the two positions",
    "k_rope not rotated": "the shared key x @ w_kr was not rotated: k_rope = RoPE(x @ w_kr)",
    "nothing rotated": "nothing was rotated: RoPE acts on q_rope and on the shared key x @ w_kr (that is where the "
                       "position lives in MLA)",
    "no RoPE part": "the scores miss the RoPE part: add q_rope . k_rope (the only place MLA carries position) to "
                    "q_nope . k",
    "no latent part": "the scores miss q_nope . k, the part that meets the keys rebuilt from the latent",
    "RoPE on the latent": "RoPE on the latent: q_nope and the keys rebuilt from the latent were rotated too. MLA keeps "
                          "position out of that part (a rotation there would stop w_uk from folding into the query, "
                          "section 7): only q_rope and the shared k_rope are rotated",
    "q split the wrong way": "q was split the wrong way round: its first hd numbers are q_nope (they meet k), its last "
                             "d_r are q_rope",
}
_VARIANT_MESSAGES["RoPE on the latent only"] = _VARIANT_MESSAGES["RoPE on the latent"]
_VARIANT_MESSAGES["RoPE on the latent instead"] = (
    "RoPE on the latent: position was put on q_nope and the keys rebuilt from the latent instead of the decoupled "
    "part; MLA rotates only q_rope and the shared key RoPE(x @ w_kr), and adds q_rope . k_rope to q_nope . k")


def _diagnose_scores(name: str, got, inputs) -> None:
    """Raise CheckFailed naming the mistake when `got` is a known wrong answer (at any scale)."""
    q, k = inputs[0], inputs[1]
    hd, dr = k.shape[-1], q.shape[-1] - k.shape[-1]
    if not isinstance(got, torch.Tensor) or got.shape != (q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
        return
    for variant, unscaled in _mla_score_variants(*inputs).items():
        factor = ((got * unscaled).sum() / unscaled.pow(2).sum()).item()
        if not torch.allclose(got, factor * unscaled, atol=1e-4, rtol=1e-4):
            continue
        if variant != "right":
            raise CheckFailed(f"{name}: {_VARIANT_MESSAGES[variant]}")
        if (mistake := _scale_mistake(factor, hd, dr)):
            raise CheckFailed(f"{name}: {mistake}")
        return
    q_nope, q_rope = q.split([hd, dr], dim=-1)
    cos, sin = inputs[4], inputs[5]
    k_rope = layers.apply_rope((inputs[2] @ inputs[3])[:, None], cos, sin)
    per_part = (q_nope @ k.transpose(-1, -2) / hd ** 0.5
                + layers.apply_rope(q_rope, cos, sin) @ k_rope.transpose(-1, -2) / dr ** 0.5)
    if torch.allclose(got, per_part, atol=1e-4, rtol=1e-4):
        raise CheckFailed(f"{name}: each part was scaled by its own width (q_nope . k by 1/sqrt(hd), q_rope . k_rope by "
                          f"1/sqrt(d_r)): add the two dot products first, then scale the sum once by 1/sqrt(hd + d_r)")


@checker
def check_mla_scores(mla_scores: Callable) -> None:
    """mla_scores(q, k, x, w_kr, cos, sin) -> (scores (B, H, T, T), k_rope (B, T, d_r)): MLA's decoupled RoPE key,
    shared by the heads, and its scores scaled by the full query-key width 1/sqrt(hd + d_r) (see mla_scores_reference)."""
    name = "check_mla_scores"
    inputs = _mla_score_inputs(14, hd=6, dr=4)  # hd != d_r: tells "sqrt(hd)" from "sqrt(d_r)"
    q, k, x, w_kr, cos, sin = inputs
    B, H, T, _ = q.shape
    dr = w_kr.shape[1]
    scores_exp, k_rope_exp = mla_scores_reference(*inputs)
    try:
        result = mla_scores(*(t.clone() for t in inputs))
    except NotImplementedError:  # a learner's stub: the decorator reports it
        raise
    except RuntimeError as e:  # some mistakes only fit when hd == d_r (RoPE on the latent, q split the wrong way)
        same_width = _mla_score_inputs(15, hd=4, dr=4)
        try:
            got = mla_scores(*(t.clone() for t in same_width))
        except RuntimeError:
            got = None
        if isinstance(got, (tuple, list)) and got:
            _diagnose_scores(name, got[0], same_width)
        raise CheckFailed(f"{name}: your function raised {type(e).__name__}: {e}. The shapes: q {tuple(q.shape)} (hd + d_r "
                          f"= 6 + 4 per head), k {tuple(k.shape)}, x {tuple(x.shape)}, w_kr {tuple(w_kr.shape)}, cos and "
                          f"sin {tuple(cos.shape)}; q_nope is q's first hd = k.shape[-1] numbers") from None
    scores, k_rope = _tuple(name, result, 2, "scores, k_rope")
    if k_rope.dim() == 4 and H in k_rope.shape[1:3]:
        raise CheckFailed(f"{name}: one key per head: k_rope has shape {tuple(k_rope.shape)}. The decoupled RoPE key is "
                          f"one key per token, RoPE(x @ w_kr) of width d_r, shared by every head; the cache holds it once, "
                          f"(B, T, d_r) = {(B, T, dr)}, and it is broadcast over the heads only in the score")
    if k_rope.shape == (B, 1, T, dr):
        raise CheckFailed(f"{name}: k_rope has shape {tuple(k_rope.shape)}: return it as the cache holds it, "
                          f"(B, T, d_r) = {(B, T, dr)}, without the head axis")
    if k_rope.shape == k_rope_exp.shape and torch.allclose(k_rope, x @ w_kr, atol=1e-5):
        raise CheckFailed(f"{name}: k_rope is x @ w_kr, not rotated: the decoupled key is RoPE(x @ w_kr), where MLA "
                          f"carries the position")
    _compare(name, k_rope, k_rope_exp, what="RoPE key k_rope")
    if isinstance(scores, torch.Tensor) and scores.shape == (B, H, T, T) and torch.isfinite(scores).all():
        if not torch.allclose(scores, scores_exp, atol=1e-4, rtol=1e-4):
            _diagnose_scores(name, scores, inputs)
            if torch.allclose(scores, scores_exp.softmax(-1), atol=1e-5):
                raise CheckFailed(f"{name}: the scores went through a softmax: return them before the mask and the "
                                  f"softmax (attention applies both)")
            same_width = _mla_score_inputs(15, hd=4, dr=4)  # mistakes that need hd == d_r to show
            try:
                got = mla_scores(*(t.clone() for t in same_width))
            except RuntimeError:
                got = None
            if isinstance(got, (tuple, list)) and got:
                _diagnose_scores(name, got[0], same_width)
    elif isinstance(scores, torch.Tensor) and scores.shape == (B, H, T, T):
        raise CheckFailed(f"{name}: the scores contain -inf or NaN: return them before the causal mask and the softmax")
    _compare(name, scores, scores_exp, atol=1e-4, what="score matrix")
    _ok(name)
