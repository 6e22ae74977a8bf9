"""The weights: each moe_lab tensor and its name in a transformers checkpoint, both ways.

moe_lab (moe_lab.model)                  transformers (on disk, per layer i: model.layers.i.)
embed.weight                             model.embed_tokens.weight
blocks.i.norm1 / norm2                   input_layernorm / post_attention_layernorm
blocks.i.attn.qkv  (3d, d): q, k, v      self_attn.q_proj, k_proj, v_proj (q, k rows permuted
                                         to the half RoPE layout for Mixtral and Glm4Moe)
blocks.i.attn.proj                       self_attn.o_proj
MLA: w_q | w_dq, q_norm, w_uq            self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
     w_dkv and w_kr, stacked             self_attn.kv_a_proj_with_mqa  (kv_rank + rope_dim rows)
     kv_norm                             self_attn.kv_a_layernorm
     w_uk and w_uv, per head [k; v]      self_attn.kv_b_proj  (heads * 2 * head_dim rows)
     w_o                                 self_attn.o_proj
dense ffn w1, w3, w2                     mlp.gate_proj, up_proj, down_proj
router.gate, router.expert_bias          mlp.gate.weight, the selection bias (Ernie: mlp.moe_statics.
                                         e_score_correction_bias, shape (1, E))
experts.w1[e], w3[e]  (d, f)             mlp.experts.e.gate_proj, up_proj  (f, d): transposed
experts.w2[e]  (f, d)                    mlp.experts.e.down_proj  (d, f): transposed
shared.w1, w3, w2                        mlp.shared_experts.gate_proj, up_proj, down_proj
norm.weight, head.weight                 model.norm.weight, lm_head.weight (absent when tied)

Mixtral names its MoE block `block_sparse_moe` and its experts' projections w1 (gate), w3 (up),
w2 (down). transformers 5.x keeps the experts of a loaded model fused (`experts.gate_up_proj`
(E, 2f, d), `experts.down_proj` (E, d, f)) and converts the per-expert files when loading; the
import reads both forms.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from moe_lab.open_weights.architectures import Architecture
from moe_lab.open_weights.rope import to_half, to_interleaved


def hf_name(name: str, arch: Architecture) -> str:
    """A moe_lab parameter's transformers name (one tensor to one tensor; experts and attention are split
    by to_hf_tensors). Used by the notebook's exercise; raises KeyError for a name it does not know."""
    rules = [
        (r"embed\.weight", "model.embed_tokens.weight"), (r"norm\.weight", "model.norm.weight"),
        (r"head\.weight", "lm_head.weight"),
        (r"blocks\.(\d+)\.norm1\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"blocks\.(\d+)\.norm2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"blocks\.(\d+)\.attn\.proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
        (r"blocks\.(\d+)\.attn\.w_o\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
        (r"blocks\.(\d+)\.attn\.w_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
        (r"blocks\.(\d+)\.attn\.w_dq\.weight", r"model.layers.\1.self_attn.q_a_proj.weight"),
        (r"blocks\.(\d+)\.attn\.q_norm\.weight", r"model.layers.\1.self_attn.q_a_layernorm.weight"),
        (r"blocks\.(\d+)\.attn\.w_uq\.weight", r"model.layers.\1.self_attn.q_b_proj.weight"),
        (r"blocks\.(\d+)\.attn\.kv_norm\.weight", r"model.layers.\1.self_attn.kv_a_layernorm.weight"),
        (r"blocks\.(\d+)\.ffn\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
        (r"blocks\.(\d+)\.ffn\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
        (r"blocks\.(\d+)\.ffn\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
        (r"blocks\.(\d+)\.ffn\.router\.gate\.weight", rf"model.layers.\1.{arch.moe_prefix}.gate.weight"),
        (r"blocks\.(\d+)\.ffn\.shared\.w1\.weight", r"model.layers.\1.mlp.shared_experts.gate_proj.weight"),
        (r"blocks\.(\d+)\.ffn\.shared\.w3\.weight", r"model.layers.\1.mlp.shared_experts.up_proj.weight"),
        (r"blocks\.(\d+)\.ffn\.shared\.w2\.weight", r"model.layers.\1.mlp.shared_experts.down_proj.weight"),
    ]
    if arch.bias_key:
        rules.append((r"blocks\.(\d+)\.ffn\.router\.expert_bias", rf"model.layers.\1.{arch.bias_key}"))
    for pattern, target in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise KeyError(f"hf_name: {name!r} has no one-to-one transformers name in {arch.name} (fused or split tensors "
                   f"such as attn.qkv and experts.w1 are mapped by to_hf_tensors)")


def expert_name(layer: int, e: int, which: int, arch: Architecture) -> str:
    """On-disk name of expert e's gate (which=0), up (1) or down (2) projection in layer `layer`."""
    return f"model.layers.{layer}.{arch.moe_prefix}.experts.{e}.{arch.expert_names[which]}.weight"


def to_hf_tensors(model, arch: Architecture) -> dict[str, Tensor]:
    """Every tensor of a moe_lab Transformer under its transformers name, float32 and contiguous."""
    cfg = model.cfg
    H, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {}
    for name, t in state.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", name)
        if name == "head.weight" and cfg.tie_embeddings:
            continue
        if m is None:
            out[hf_name(name, arch)] = t
            continue
        i, rest, p = int(m.group(1)), m.group(2), f"model.layers.{m.group(1)}."
        if rest == "attn.qkv.weight":
            q, k, v = t.split(cfg.d_model)  # (d, d) each
            if arch.rope == "half":
                q, k = to_half(q, H, hd), to_half(k, H, hd)
            out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                        p + "self_attn.v_proj.weight": v})
        elif rest in ("attn.w_dkv.weight", "attn.w_kr.weight"):
            if rest == "attn.w_dkv.weight":
                out[p + "self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([t, state[f"blocks.{i}.attn.w_kr.weight"]])
        elif rest in ("attn.w_uk.weight", "attn.w_uv.weight"):
            if rest == "attn.w_uk.weight":
                wk, wv = t.view(H, hd, -1), state[f"blocks.{i}.attn.w_uv.weight"].view(H, hd, -1)
                out[p + "self_attn.kv_b_proj.weight"] = torch.cat([wk, wv], 1).reshape(H * 2 * hd, -1)
        elif rest in ("ffn.experts.w1", "ffn.experts.w3", "ffn.experts.w2"):
            which = {"w1": 0, "w3": 1, "w2": 2}[rest.rsplit(".", 1)[1]]
            for e in range(t.shape[0]):
                out[expert_name(i, e, which, arch)] = t[e].t()  # (d, f) -> (f, d), (f, d) -> (d, f)
        elif rest == "ffn.router.expert_bias":
            if arch.bias_key:
                bias = t if cfg.moe.balance == "aux_free" else torch.zeros_like(t)  # unused without aux_free
                out[p + arch.bias_key] = bias[None] if arch.model_type == "ernie4_5_moe" else bias
        else:
            out[hf_name(name, arch)] = t
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# transformers -> moe_lab
# --------------------------------------------------------------------------------------------------
def _experts(state: dict, prefix: str, E: int) -> tuple[Tensor, Tensor, Tensor]:
    """(gate (E, f, d), up (E, f, d), down (E, d, f)) of one MoE block, fused (transformers 5) or per expert (4)."""
    if prefix + "experts.gate_up_proj" in state:
        gate, up = state[prefix + "experts.gate_up_proj"].chunk(2, dim=1)  # (E, 2f, d) -> 2 x (E, f, d)
        return gate, up, state[prefix + "experts.down_proj"]
    names = [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")]
    found = []
    for a, b in names:
        key = next(n for n in (a, b) if prefix + f"experts.0.{n}.weight" in state)
        found.append(torch.stack([state[prefix + f"experts.{e}.{key}.weight"] for e in range(E)]))
    return tuple(found)


def from_hf_state(state: dict, cfg, arch: Architecture, n_kv_heads: int, rope: str) -> dict[str, Tensor]:
    """A moe_lab state dict from a transformers model's state dict (names as a loaded model has them).

    n_kv_heads < n_heads (grouped-query attention) is expanded to multi-head attention by repeating each
    key-value head for its group: the same function. rope: the source's layout of the rotated numbers."""
    state = {re.sub(r"\.block_sparse_moe\.", ".mlp.", k): v.detach().float().cpu() for k, v in state.items()}
    H, d = cfg.n_heads, cfg.d_model
    hd = d // H
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    out["head.weight"] = state.get("lm_head.weight", out["embed.weight"]) if not cfg.tie_embeddings else out["embed.weight"]
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "norm1.weight"] = state[p + "input_layernorm.weight"]
        out[q + "norm2.weight"] = state[p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        if cfg.attention == "mha":
            wq, wk, wv = state[a + "q_proj.weight"], state[a + "k_proj.weight"], state[a + "v_proj.weight"]
            if n_kv_heads != H:  # (kv * hd, d) -> (H * hd, d): each key-value head serves H / kv query heads
                wk, wv = (w.view(n_kv_heads, 1, hd, d).expand(-1, H // n_kv_heads, -1, -1).reshape(H * hd, d)
                          for w in (wk, wv))
            if rope == "half":
                wq, wk = to_interleaved(wq, H, hd), to_interleaved(wk, H, hd)
            out[q + "attn.qkv.weight"] = torch.cat([wq, wk, wv])
            out[q + "attn.proj.weight"] = state[a + "o_proj.weight"]
        else:
            dr, dc = cfg.rope_dim, cfg.kv_rank
            if cfg.q_rank:
                out[q + "attn.w_dq.weight"] = state[a + "q_a_proj.weight"]
                out[q + "attn.q_norm.weight"] = state[a + "q_a_layernorm.weight"]
                wq, qname = state[a + "q_b_proj.weight"], "attn.w_uq.weight"
            else:
                wq, qname = state[a + "q_proj.weight"], "attn.w_q.weight"
            kva = state[a + "kv_a_proj_with_mqa.weight"]  # (dc + dr, d)
            wkr = kva[dc:]
            if rope == "half":  # DeepseekV3 with rope_interleave=False: the rope part of each head, and k_R
                wq, wkr = to_interleaved(wq, H, dr, start=hd), to_interleaved(wkr, 1, dr)
            out[q + qname] = wq
            out[q + "attn.w_dkv.weight"], out[q + "attn.w_kr.weight"] = kva[:dc], wkr
            out[q + "attn.kv_norm.weight"] = state[a + "kv_a_layernorm.weight"]
            kvb = state[a + "kv_b_proj.weight"].view(H, 2 * hd, dc)
            out[q + "attn.w_uk.weight"] = kvb[:, :hd].reshape(H * hd, dc)
            out[q + "attn.w_uv.weight"] = kvb[:, hd:].reshape(H * hd, dc)
            out[q + "attn.w_o.weight"] = state[a + "o_proj.weight"]
        m = p + "mlp."
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[q + f"ffn.{ours}.weight"] = state[m + f"{theirs}.weight"]
            continue
        out[q + "ffn.router.gate.weight"] = state[m + "gate.weight"]
        bias = next((v for k, v in state.items() if k.startswith(m) and k.endswith("e_score_correction_bias")), None)
        out[q + "ffn.router.expert_bias"] = (bias.reshape(-1) if bias is not None else torch.zeros(cfg.moe.n_experts))
        gate, up, down = _experts(state, m, cfg.moe.n_experts)
        out[q + "ffn.experts.w1"] = gate.transpose(1, 2).contiguous()  # (E, f, d) -> (E, d, f)
        out[q + "ffn.experts.w3"] = up.transpose(1, 2).contiguous()
        out[q + "ffn.experts.w2"] = down.transpose(1, 2).contiguous()  # (E, d, f) -> (E, f, d)
        if cfg.moe.n_shared:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[q + f"ffn.shared.{ours}.weight"] = state[m + f"shared_experts.{theirs}.weight"]
    return out
