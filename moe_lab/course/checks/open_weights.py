"""Checkers for notebook 11 (open weights): a moe_lab weight's name in a transformers checkpoint, and
the RoPE row permutation from moe_lab's interleaved pairs to transformers' half layout.

The reference answers are moe_lab.open_weights.mapping.hf_name (architecture Ernie4_5_Moe, the
shipped model's) and moe_lab.open_weights.rope.to_half; neither needs transformers installed.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from moe_lab.course.checks.common import CheckFailed, _ok, checker
from moe_lab.open_weights.architectures import ERNIE
from moe_lab.open_weights.mapping import hf_name
from moe_lab.open_weights.rope import to_half, to_interleaved

NAMES = ["embed.weight", "norm.weight", "head.weight", "blocks.0.norm1.weight", "blocks.1.norm2.weight",
         "blocks.1.attn.proj.weight", "blocks.0.ffn.router.gate.weight", "blocks.1.ffn.router.expert_bias",
         "blocks.0.ffn.shared.w1.weight", "blocks.0.ffn.shared.w3.weight", "blocks.1.ffn.shared.w2.weight"]


@checker
def check_weight_names(hf_weight_name: Callable) -> None:
    """hf_weight_name(moe_lab name) -> the tensor's name in an Ernie4_5_Moe checkpoint (one-to-one tensors)."""
    name = "check_weight_names"
    for ours in NAMES:
        want, got = hf_name(ours, ERNIE), hf_weight_name(ours)
        if got == want:
            continue
        if not isinstance(got, str):
            raise CheckFailed(f"{name}: hf_weight_name({ours!r}) returned a {type(got).__name__}, expected a str")
        if got == want.removeprefix("model."):
            raise CheckFailed(f"{name}: {ours!r} -> {got!r}: the decoder's tensors live under 'model.' "
                              f"(only lm_head sits beside it): expected {want!r}")
        layer = re.match(r"blocks\.(\d+)\.", ours)
        if layer and not got.startswith(f"model.layers.{layer.group(1)}."):
            raise CheckFailed(f"{name}: {ours!r} -> {got!r}: block i of moe_lab is model.layers.i. in transformers: "
                              f"expected {want!r}")
        if "layernorm" in got and "layernorm" in want:
            raise CheckFailed(f"{name}: {ours!r} -> {got!r}: norm1 runs before attention (input_layernorm), norm2 "
                              f"before the feed-forward (post_attention_layernorm): expected {want!r}")
        if ".shared." in ours and "shared_experts" in got:
            raise CheckFailed(f"{name}: {ours!r} -> {got!r}: SwiGLU's w1 is the gate projection, w3 the up "
                              f"projection and w2 the down projection: expected {want!r}")
        if "router" in ours:
            raise CheckFailed(f"{name}: {ours!r} -> {got!r}: Ernie's router weight is 'mlp.gate.weight' and its "
                              f"selection bias 'mlp.moe_statics.e_score_correction_bias': expected {want!r}")
        if ours in ("head.weight", "norm.weight", "embed.weight"):
            raise CheckFailed(f"{name}: {ours!r} -> {got!r}: the embedding is model.embed_tokens, the final norm "
                              f"model.norm and the output head lm_head: expected {want!r}")
        raise CheckFailed(f"{name}: {ours!r} -> {got!r}, expected {want!r} (layer i: blocks.i. -> model.layers.i.)")
    _ok(name)


@checker
def check_half_rows(half_rows: Callable) -> None:
    """half_rows(w (n_heads * hd, d_in), n_heads) -> the rows in transformers' half layout: in each head,
    rows 0, 2, 4, ... then 1, 3, 5, ... (the half layout's number j < hd/2 is moe_lab's number 2j)."""
    name = "check_half_rows"
    H, hd, d = 3, 8, 5
    w = torch.arange(H * hd * d, dtype=torch.float32).view(H * hd, d)
    want = to_half(w, H, hd)
    got = half_rows(w.clone(), H)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{name}: return a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        raise CheckFailed(f"{name}: the result has shape {tuple(got.shape)}, expected {tuple(want.shape)}: "
                          f"reorder rows, keep every one")
    if torch.equal(got, want):
        _ok(name)
        return
    if torch.equal(got, w):
        raise CheckFailed(f"{name}: the rows are unchanged: transformers rotates pairs (j, j + hd/2), moe_lab "
                          f"pairs (2j, 2j + 1), so the rows must be reordered")
    if torch.equal(got, to_interleaved(w, H, hd)):
        raise CheckFailed(f"{name}: that is the inverse permutation (half -> interleaved): the half layout's row j "
                          f"is moe_lab's row 2j, and its row hd/2 + j is moe_lab's row 2j + 1")
    if torch.equal(got, to_half(w, 1, H * hd)):
        raise CheckFailed(f"{name}: you permuted the rows of all heads as one: reorder within each head of hd = "
                          f"{hd} rows (view the weight as (n_heads, hd, d_in))")
    odd_first = torch.cat([torch.arange(1, hd, 2), torch.arange(0, hd, 2)])
    if torch.equal(got, w.view(H, hd, d)[:, odd_first].reshape(H * hd, d)):
        raise CheckFailed(f"{name}: odd rows came first: the first half of a head holds the first number of each "
                          f"pair, rows 0, 2, 4, ...")
    raise CheckFailed(f"{name}: wrong row order: head 0 should be rows {to_half(torch.arange(hd)[:, None], 1, hd).flatten().tolist()} "
                      f"of the input")
