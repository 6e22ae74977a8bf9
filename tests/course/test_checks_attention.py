"""Cases for the checkers of notebook 10 (moe_lab.course.checks.attention), run by tests/course/test_checks.py's generic tests:
the right answer passes, each plausible wrong answer fails with a message naming the mistake, a stub is
"not implemented yet"."""
import torch
import torch.nn.functional as F

from moe_lab.course import checks
from moe_lab.course.checks.attention import mla_keys_values_reference, mla_scores_reference
from moe_lab.model.layers import apply_rope


def attend_right(q, k_new, v_new, k_cache, v_cache):
    k, v = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
    return F.scaled_dot_product_attention(q, k, v), k, v


def attend_variant(order="append", grow=True, include_new=True, scale=None, v_from_k=False):
    def f(q, k_new, v_new, k_cache, v_cache):
        new_v = k_new if v_from_k else v_new
        if not grow:
            k, v = k_cache, v_cache
        elif order == "prepend":
            k, v = torch.cat([k_new, k_cache], 2), torch.cat([new_v, v_cache], 2)
        else:
            k, v = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, new_v], 2)
        keys, vals = (k, v) if include_new else (k_cache, v_cache)
        return F.scaled_dot_product_attention(q, keys, vals, scale=scale), k, v
    return f


def rope_right(x, cos, sin, n_cached):
    T = x.shape[-2]
    return apply_rope(x, cos[n_cached:n_cached + T], sin[n_cached:n_cached + T])


def rope_at(offset):
    return lambda x, cos, sin, n: apply_rope(x, cos[n + offset:n + offset + x.shape[-2]], sin[n + offset:n + offset + x.shape[-2]])


def attend_along(dim):
    """torch.cat along another axis than time: the shapes only fit along dim 2, so torch raises."""
    def f(q, k_new, v_new, k_cache, v_cache):
        k, v = torch.cat([k_cache, k_new], dim), torch.cat([v_cache, v_new], dim)
        return F.scaled_dot_product_attention(q, k, v), k, v
    return f


def mla_kv_variant(norm="rms", swap=False, split="right", transpose=True):
    def f(x, w_dkv, norm_weight, w_uk, w_uv, n_heads, eps=1e-5):
        B, T, _ = x.shape
        c = x @ w_dkv
        if norm == "rms":
            c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
        elif norm == "rms_no_weight":
            c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
        elif norm == "layer":
            c = F.layer_norm(c, c.shape[-1:], weight=norm_weight, eps=eps)
        elif norm == "layer_no_weight":
            c = F.layer_norm(c, c.shape[-1:], eps=eps)
        a, b = (w_uv, w_uk) if swap else (w_uk, w_uv)
        if split == "wrong":
            k = (c @ a).view(B, T, -1, n_heads).permute(0, 3, 1, 2)
            v = (c @ b).view(B, T, -1, n_heads).permute(0, 3, 1, 2)
        elif split == "view_bhtd":  # the heads' axis first in a view: reinterprets the memory, mixes tokens and heads
            k, v = (c @ a).view(B, n_heads, T, -1), (c @ b).view(B, n_heads, T, -1)
        else:
            k, v = (c @ a).view(B, T, n_heads, -1), (c @ b).view(B, T, n_heads, -1)
            if transpose:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
        return c, k, v
    return f


def absorb_right(q, w_uk):
    H, hd = q.shape[1], q.shape[3]
    return torch.einsum("bhtd,chd->bhtc", q, w_uk.view(w_uk.shape[0], H, hd))


def absorb_columns_as_hd_h(q, w_uk):
    """w_uk's columns read as (hd, H): column d * H + h taken for head h's number d."""
    H, hd = q.shape[1], q.shape[3]
    return torch.einsum("bhtd,cdh->bhtc", q, w_uk.view(w_uk.shape[0], hd, H))


def absorb_heads_summed(keepdim):
    def f(q, w_uk):
        summed = absorb_right(q, w_uk).sum(1, keepdim=True)  # (B, 1, T, d_c): every head's latent query added up
        return summed if keepdim else summed.expand(-1, q.shape[1], -1, -1)
    return f


def absorb_scaled(factor):
    return lambda q, w_uk: absorb_right(q, w_uk) * factor(q)


def mla_scores_variant(scale="full", rotate_q=True, rotate_k=True, rope_on_latent=False, rope_part=True,
                       latent_part=True, split="right", key="shared", softmax=False):
    """MLA's scores and shared RoPE key, right by default; each argument makes one plausible mistake."""
    def f(q, k, x, w_kr, cos, sin):
        hd = k.shape[-1]
        dr = q.shape[-1] - hd
        q_nope, q_rope = q.split([hd, dr], -1) if split == "right" else q.split([dr, hd], -1)[::-1]
        k_rope = x @ w_kr
        if rotate_k:
            k_rope = apply_rope(k_rope, cos, sin)
        if rotate_q:
            q_rope = apply_rope(q_rope, cos, sin)
        if rope_on_latent:  # position put on the part that meets the keys rebuilt from the latent
            q_nope, k = apply_rope(q_nope, cos, sin), apply_rope(k, cos, sin)
        k_heads = k_rope[:, None].expand(-1, q.shape[1], -1, -1)  # (B, H, T, d_r)
        if key == "split":  # one key per head: the d_r numbers shared out among the heads
            k_rope = (x @ w_kr).view(x.shape[0], x.shape[1], q.shape[1], -1).transpose(1, 2)
            k_heads = apply_rope(k_rope, cos, sin)
        scores = 0
        if latent_part:
            scores = scores + q_nope @ k.transpose(-1, -2)
        if rope_part:
            scores = scores + q_rope @ k_heads.transpose(-1, -2)
        if scale == "per part":
            scores = q_nope @ k.transpose(-1, -2) / hd ** 0.5 + q_rope @ k_heads.transpose(-1, -2) / dr ** 0.5
        else:
            scores = scores * {"full": (hd + dr) ** -0.5, "hd": hd ** -0.5, "dr": dr ** -0.5, "none": 1.0,
                               "times": (hd + dr) ** 0.5, "no root": 1 / (hd + dr), "odd": 0.3}[scale]
        if softmax:
            scores = scores.softmax(-1)
        if key == "per head":  # the shared key copied for every head, as if each head had its own
            k_rope = k_heads
        elif key == "head axis":
            k_rope = k_rope[:, None]
        return scores, k_rope
    return f


CASES = {
    "check_cache_append": (attend_right, [
        (attend_variant(grow=False), "did not grow"),
        (attend_variant(order="prepend"), "before the cached ones"),
        (attend_variant(include_new=False), "only to the cached tokens"),
        (attend_variant(scale=1.0), "not scaled"),
        (attend_variant(v_from_k=True), "value cache received the new key"),
        (lambda *a: attend_right(*a)[:2], "return 3 values"),
        (attend_along(3), "along dim 3.*time axis, dim 2"),
        (attend_along(-1), "along dim 3.*time axis, dim 2"),
        (attend_along(1), "along dim 1.*time axis, dim 2"),
        (attend_along(0), "along dim 0.*time axis, dim 2"),
    ]),
    "check_rope_offset": (rope_right, [
        (lambda x, cos, sin, n: apply_rope(x, cos[:x.shape[-2]], sin[:x.shape[-2]]), "as if they came first"),
        (rope_at(1), "off by one"),
        (rope_at(-1), "off by one"),
        (lambda x, cos, sin, n: apply_rope(x, cos[n:n + 1], sin[n:n + 1]), "every new token got position"),
    ]),
    "check_mla_kv": (mla_keys_values_reference, [
        (mla_kv_variant(norm=None), "not normalised"),
        (mla_kv_variant(norm="layer"), "LayerNorm.*RMSNorm"),
        (mla_kv_variant(norm="layer_no_weight"), "LayerNorm.*RMSNorm"),
        (mla_kv_variant(norm="rms_no_weight"), "RMSNorm without its weight"),
        (mla_kv_variant(swap=True), "swapped"),
        (mla_kv_variant(split="wrong"), "split the wrong way"),
        (mla_kv_variant(split="view_bhtd"), r"view\(B, H, T, hd\)"),
        (mla_kv_variant(transpose=False), "move the heads before the positions"),
        # any other wrong keys or values: the message reads as a sentence ("the keys is wrong" did not)
        (lambda *a: (lambda c, k, v: (c, k + 0.1, v))(*mla_keys_values_reference(*a)), "the key tensor k is wrong at index"),
        (lambda *a: (lambda c, k, v: (c, k, v + 0.1))(*mla_keys_values_reference(*a)), "the value tensor v is wrong at index"),
    ]),
    "check_absorbed_query": (absorb_right, [
        (lambda q, w: torch.einsum("bhtd,hcd->bhtc", q, w.reshape(q.shape[1], w.shape[0], q.shape[3])), "mixes the heads"),
        (lambda q, w: absorb_right(q, w).sum(1), "heads were summed"),
        (lambda q, w: q.repeat(1, 1, 1, q.shape[1]), "latent space"),
        (absorb_columns_as_hd_h, r"\(hd, H\)"),
        (absorb_heads_summed(keepdim=True), "heads were summed"),
        (absorb_heads_summed(keepdim=False), "heads were summed"),
        (absorb_scaled(lambda q: q.shape[-1] ** -0.5), r"1/sqrt\(hd\): the scale was folded in"),
        (absorb_scaled(lambda q: (q.shape[-1] + 2) ** -0.5), r"scale.*attention"),
        (absorb_scaled(lambda q: 2.0), r"times 2\b"),
        (lambda q, w: absorb_right(q, w) + 0.1, "wrong at index"),
    ]),
    "check_mla_scores": (mla_scores_reference, [
        (mla_scores_variant(), None),  # placeholder removed below: the right answer must pass
        (mla_scores_variant(scale="hd"), "scale without d_r"),
        (mla_scores_variant(scale="dr"), r"sqrt\(d_r\) = sqrt\(4\), the width of the RoPE part alone"),
        (mla_scores_variant(scale="none"), "not scaled"),
        (mla_scores_variant(scale="times"), "multiplied by sqrt"),
        (mla_scores_variant(scale="no root"), "square root"),
        (mla_scores_variant(scale="odd"), r"scaled by 0.3\b"),
        (mla_scores_variant(scale="per part"), "each part was scaled by its own width"),
        (mla_scores_variant(rope_on_latent=True), "RoPE on the latent"),
        (mla_scores_variant(rope_on_latent=True, rope_part=False), "RoPE on the latent"),
        (mla_scores_variant(key="per head"), "one key per head"),
        (mla_scores_variant(key="split"), "one key per head"),
        (mla_scores_variant(key="head axis"), "without the head axis"),
        (mla_scores_variant(rotate_q=False), "q_rope was not rotated"),
        (mla_scores_variant(rotate_k=False), "not rotated"),
        (mla_scores_variant(rope_part=False), "miss the RoPE part"),
        (mla_scores_variant(latent_part=False), "miss q_nope . k"),
        (mla_scores_variant(split="wrong"), "split the wrong way"),
        (mla_scores_variant(softmax=True), "softmax"),
        (lambda *a: (mla_scores_reference(*a)[0] + 0.1, mla_scores_reference(*a)[1]), "the score matrix is wrong at index"),
    ]),
}
CASES["check_mla_scores"][1].pop(0)


def test_the_attention_checkers_are_exported():
    assert {"check_cache_append", "check_rope_offset", "check_mla_kv", "check_absorbed_query",
            "check_mla_scores"} <= set(checks.__all__)


def test_the_mla_scores_checker_passes_the_variant_helper_unchanged(capsys):
    """mla_scores_variant() with no mistake is right: each wrong case above differs from it in one argument only."""
    checks.check_mla_scores(mla_scores_variant())
    assert "correct" in capsys.readouterr().out
