"""Which transformers architecture holds a moe_lab model exactly, its config.json, and the way back.

A moe_lab MoE model is exported only to an architecture that computes the same function (logits
within float32 rounding), never to an approximation. The counterparts (transformers 5.x code read):

    attention  router                      transformers class          RoPE layout
    mha        softmax, selection bias     Ernie4_5_MoeForCausalLM     interleaved (as moe_lab)
               and/or shared experts, or dense first layers
    mha        softmax, neither            MixtralForCausalLM          half: q/k rows permuted
    mha        sigmoid (+ bias)            Glm4MoeForCausalLM          half: q/k rows permuted
    mla        sigmoid (+ bias)            DeepseekV3ForCausalLM       interleaved (rope_interleave=True)
    mla        softmax, top_k = 1, no bias DeepseekV2ForCausalLM       interleaved (complex rotation)

Facts these rest on. Ernie4_5_Moe's router takes the softmax, adds `e_score_correction_bias` to the
probabilities for the selection only, and renormalises the k chosen (as moe_lab's softmax router
with balance="aux_free"); Mixtral's renormalises the top k of the softmax; DeepseekV3's and
Glm4Moe's take sigmoid scores, bias for selection only, `norm_topk_prob`, `routed_scaling_factor`
(as moe_lab's sigmoid router) and group-limited selection (n_group = topk_group = 1 here: no
limit); DeepseekV2's keeps the raw softmax probabilities of the top k (it ignores norm_topk_prob),
which moe_lab does only for top_k = 1. Shared experts are one SwiGLU of width
n_shared_experts * moe_intermediate_size in all of them (moe_lab: n_shared * d_shared). The latent
RMSNorms of DeepseekV2/V3 (q_a_layernorm, kv_a_layernorm) have a fixed eps of 1e-6.

Everything else is refused, naming the field and why (`NoCounterpart`): e.g. MLA with a softmax
router and a selection bias (the course's MLA study model) has none: DeepseekV2 has no selection
bias and DeepseekV3 scores with a sigmoid. Fields that inference engines read and transformers
ignores (`scoring_func`, `topk_method`, `moe_layer_freq`, ...) are written too.

The way back (`model_config`) reads a transformers config of these five architectures into a moe_lab
ModelConfig and refuses what moe_lab cannot compute (QK-norm, sliding windows, partial rotary,
RoPE scaling such as YaRN, biases, group-limited routing, ...), naming the feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moe_lab.core.config import ModelConfig, MoEConfig
from moe_lab.data.tokenizer import TOKENIZER

LATENT_NORM_EPS = 1e-6  # DeepseekV2/V3: q_a_layernorm and kv_a_layernorm are built with this eps, whatever the config


class NoCounterpart(ValueError):
    """A model or config that has no exact counterpart on the other side; the message names the field and why."""


@dataclass(frozen=True)
class Architecture:
    """One transformers architecture the course exports to and imports from."""

    name: str  # the class in config.json's "architectures"
    model_type: str  # config.json's "model_type"
    attention: str  # "mha" or "mla" (moe_lab's names)
    router: str  # "softmax" or "sigmoid"
    rope: str  # "interleaved" (pairs 2i, 2i+1, as moe_lab) or "half" (pairs i, i + d/2: rotate_half)
    moe_prefix: str  # the MoE block's name in a layer, on disk
    expert_names: tuple  # on-disk names of (gate, up, down) of one expert
    bias_key: Optional[str]  # the selection bias, relative to a layer, on disk; None = the router has none
    dense_first: bool  # whether the first layers may be dense
    shared: bool  # whether it has shared experts


ERNIE = Architecture("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", "mha", "softmax", "interleaved", "mlp",
                     ("gate_proj", "up_proj", "down_proj"), "mlp.moe_statics.e_score_correction_bias", True, True)
MIXTRAL = Architecture("MixtralForCausalLM", "mixtral", "mha", "softmax", "half", "block_sparse_moe",
                       ("w1", "w3", "w2"), None, False, False)
GLM4_MOE = Architecture("Glm4MoeForCausalLM", "glm4_moe", "mha", "sigmoid", "half", "mlp",
                        ("gate_proj", "up_proj", "down_proj"), "mlp.gate.e_score_correction_bias", True, True)
DEEPSEEK_V3 = Architecture("DeepseekV3ForCausalLM", "deepseek_v3", "mla", "sigmoid", "interleaved", "mlp",
                           ("gate_proj", "up_proj", "down_proj"), "mlp.gate.e_score_correction_bias", True, True)
DEEPSEEK_V2 = Architecture("DeepseekV2ForCausalLM", "deepseek_v2", "mla", "softmax", "interleaved", "mlp",
                           ("gate_proj", "up_proj", "down_proj"), None, True, True)
ARCHITECTURES = {a.model_type: a for a in (ERNIE, MIXTRAL, GLM4_MOE, DEEPSEEK_V3, DEEPSEEK_V2)}


# --------------------------------------------------------------------------------------------------
# moe_lab -> transformers
# --------------------------------------------------------------------------------------------------
def _refuse(field: str, value, why: str) -> None:
    raise NoCounterpart(f"ModelConfig.{field}={value!r} has no exact counterpart in transformers: {why}")


def choose_architecture(cfg: ModelConfig) -> Architecture:
    """The architecture that computes exactly what `cfg` does, or NoCounterpart naming the field and why."""
    m = cfg.moe
    if cfg.ffn != "moe":
        _refuse("ffn", cfg.ffn, "the export writes Mixture-of-Experts architectures; a dense model is a Llama, "
                "which this module does not write")
    if cfg.n_dense_layers >= cfg.n_layers:
        _refuse("n_dense_layers", cfg.n_dense_layers, f"every one of the {cfg.n_layers} layers is dense: no MoE layer")
    if m.shared_width % m.d_expert:
        _refuse("moe.d_shared", m.d_shared, f"the shared experts' width n_shared * d_shared = {m.shared_width} must be a "
                f"multiple of d_expert={m.d_expert} (transformers sizes them n_shared_experts * moe_intermediate_size)")
    bias = m.balance == "aux_free"  # the selection bias takes part in routing only with aux-loss-free balancing
    if cfg.attention == "mla":
        if cfg.norm_eps != LATENT_NORM_EPS:
            _refuse("norm_eps", cfg.norm_eps, f"DeepseekV2/V3 build their latent RMSNorms (q_a_layernorm, "
                    f"kv_a_layernorm) with eps={LATENT_NORM_EPS} whatever the config, so an MLA model exports exactly "
                    f"only with norm_eps={LATENT_NORM_EPS}")
        if m.router == "sigmoid":
            return DEEPSEEK_V3
        if bias:
            _refuse("moe.balance", m.balance, "MLA with a softmax router and a selection bias: DeepseekV2 (MLA, "
                    "softmax) has no selection bias and DeepseekV3 (MLA, bias) scores with a sigmoid; use "
                    "router='sigmoid' (DeepseekV3) or balance='aux_loss' with top_k=1 (DeepseekV2)")
        if m.top_k > 1:
            _refuse("moe.top_k", m.top_k, "DeepseekV2's router keeps the raw softmax probabilities of the top k "
                    "(transformers ignores norm_topk_prob) while moe_lab's softmax router renormalises them for "
                    "top_k > 1; only top_k=1 agrees")
        return DEEPSEEK_V2
    if m.router == "sigmoid":
        return GLM4_MOE
    if m.top_k == 1:
        _refuse("moe.top_k", 1, "with top_k=1 moe_lab's softmax router keeps the raw probability (Switch), while "
                "Ernie4_5_Moe and Mixtral renormalise it to 1")
    if m.routed_scaling != 1.0:
        _refuse("moe.routed_scaling", m.routed_scaling, "Ernie4_5_Moe and Mixtral (the MHA softmax routers) have no "
                "routed scaling factor")
    if bias or m.n_shared or cfg.n_dense_layers:
        return ERNIE
    return MIXTRAL


def _common(cfg: ModelConfig, arch: Architecture) -> dict:
    return {
        "architectures": [arch.name], "model_type": arch.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "head_dim": cfg.d_model // cfg.n_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # read by engines and by transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "initializer_range": 0.02, "use_cache": True, "dtype": "float32", "torch_dtype": "float32",
        "pad_token_id": TOKENIZER.pad_id, "bos_token_id": TOKENIZER.bos_id, "eos_token_id": TOKENIZER.eos_id,
        "num_experts_per_tok": cfg.moe.top_k,
    }


def hf_config(cfg: ModelConfig, arch: Architecture) -> dict:
    """config.json for `cfg` in `arch` (chosen by choose_architecture), engine-read fields included."""
    m, c = cfg.moe, _common(cfg, arch)
    n_shared = m.shared_width // m.d_expert
    if arch is MIXTRAL:
        c.update(intermediate_size=m.d_expert, num_local_experts=m.n_experts, sliding_window=None,
                 router_jitter_noise=0.0, router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False)
        return c
    if arch is ERNIE:
        c.update(intermediate_size=cfg.d_ff, moe_intermediate_size=m.d_expert, moe_num_experts=m.n_experts,
                 moe_k=m.top_k, moe_num_shared_experts=n_shared, moe_layer_start_index=cfg.n_dense_layers,
                 moe_layer_end_index=cfg.n_layers - 1, moe_layer_interval=1, moe_norm_min=1e-12, use_bias=False,
                 moe_use_aux_free=m.balance == "aux_free", router_aux_loss_coef=m.aux_loss_coef)
        return c
    # DeepSeek-style configs (Glm4Moe, DeepseekV3, DeepseekV2)
    c.update(intermediate_size=cfg.d_ff, moe_intermediate_size=m.d_expert, n_routed_experts=m.n_experts,
             n_shared_experts=n_shared, first_k_dense_replace=cfg.n_dense_layers, moe_layer_freq=1,
             routed_scaling_factor=m.routed_scaling, n_group=1, topk_group=1, num_nextn_predict_layers=0,
             scoring_func=m.router, norm_topk_prob=arch.router == "sigmoid" or m.top_k > 1)
    if arch is GLM4_MOE:
        c.update(topk_method="noaux_tc", use_qk_norm=False, partial_rotary_factor=1.0)
        c["rope_parameters"]["partial_rotary_factor"] = 1.0
        return c
    hd = cfg.d_model // cfg.n_heads
    c.update(kv_lora_rank=cfg.kv_rank, q_lora_rank=cfg.q_rank, qk_rope_head_dim=cfg.rope_dim, qk_nope_head_dim=hd,
             v_head_dim=hd, qk_head_dim=hd + cfg.rope_dim, head_dim=cfg.rope_dim)
    if arch is DEEPSEEK_V3:
        c.update(topk_method="noaux_tc", rope_interleave=True)
    else:
        c.update(topk_method="greedy", n_group=None, topk_group=None, mlp_bias=False)
    return c


# --------------------------------------------------------------------------------------------------
# transformers -> moe_lab
# --------------------------------------------------------------------------------------------------
def _unsupported(model_type: str, feature: str, why: str) -> None:
    raise NoCounterpart(f"{model_type}: {feature} is not supported by moe_lab's model: {why}")


def _get(c, name, default=None):
    return getattr(c, name, default) if not isinstance(c, dict) else c.get(name, default)


def rope_settings(c) -> dict:
    """The RoPE parameters of a transformers config, 5.x (rope_parameters) or 4.x (rope_theta, rope_scaling)."""
    params = dict(_get(c, "rope_parameters") or {})
    if not params:
        params = dict(_get(c, "rope_scaling") or {})
        params.setdefault("rope_theta", _get(c, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    if "partial_rotary_factor" not in params and _get(c, "partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = _get(c, "partial_rotary_factor")
    return params


def model_config(c, max_seq_len: Optional[int] = None) -> ModelConfig:
    """The moe_lab ModelConfig of a transformers config (object or dict) of a supported architecture, or
    NoCounterpart naming the feature moe_lab lacks. max_seq_len: the positions moe_lab builds RoPE tables for
    (default: max_position_embeddings, at most 4096)."""
    mt = _get(c, "model_type")
    if mt not in ARCHITECTURES:
        raise NoCounterpart(f"model_type={mt!r}: expected one of {sorted(ARCHITECTURES)} (the architectures whose "
                            f"function moe_lab's model computes exactly)")
    arch = ARCHITECTURES[mt]
    d, H = _get(c, "hidden_size"), _get(c, "num_attention_heads")
    if _get(c, "hidden_act", "silu") != "silu":
        _unsupported(mt, f"hidden_act={_get(c, 'hidden_act')!r}", "moe_lab's experts are SwiGLU (silu)")
    for flag in ("attention_bias", "use_bias", "mlp_bias"):
        if _get(c, flag):
            _unsupported(mt, f"{flag}=True", "moe_lab's projections have no biases")
    if _get(c, "use_qk_norm"):
        _unsupported(mt, "QK-norm (use_qk_norm=True)", "moe_lab's attention does not normalise queries and keys")
    rope = rope_settings(c)
    if rope.get("rope_type", "default") != "default":
        _unsupported(mt, f"RoPE scaling rope_type={rope['rope_type']!r} (YaRN, linear, dynamic, ...)",
                     "moe_lab's RoPE has one base frequency and no scaling")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        _unsupported(mt, f"partial rotary embeddings (partial_rotary_factor={rope['partial_rotary_factor']})",
                     "moe_lab rotates every number of a head")
    max_pos = _get(c, "max_position_embeddings")
    L = max_seq_len or min(max_pos, 4096)
    window = _get(c, "sliding_window")
    if window is not None and window < L:
        _unsupported(mt, f"a sliding window of {window} tokens", f"moe_lab attends over the whole context (a window "
                     f"at least as long as max_seq_len={L} would change nothing)")
    E = _get(c, "num_local_experts") or _get(c, "n_routed_experts") or _get(c, "moe_num_experts")
    k = _get(c, "num_experts_per_tok") or _get(c, "moe_k")
    scaling = float(_get(c, "routed_scaling_factor", 1.0) or 1.0)
    n_dense, n_shared = 0, 0
    n_group, topk_group = _get(c, "n_group"), _get(c, "topk_group")
    if n_group and topk_group and n_group > 1 and topk_group < n_group:
        _unsupported(mt, f"group-limited routing (n_group={n_group}, topk_group={topk_group})",
                     "moe_lab's router chooses among all experts")
    if arch is MIXTRAL:
        d_expert = _get(c, "intermediate_size")
        d_ff = d_expert
        if k == 1:
            _unsupported(mt, "num_experts_per_tok=1", "Mixtral renormalises the one weight to 1, moe_lab keeps "
                         "the raw probability for top_k=1")
    elif arch is ERNIE:
        d_expert, d_ff = _get(c, "moe_intermediate_size"), _get(c, "intermediate_size")
        n_shared = _get(c, "moe_num_shared_experts") or 0
        n_dense = _get(c, "moe_layer_start_index")
        end, interval = _get(c, "moe_layer_end_index"), _get(c, "moe_layer_interval")
        if interval != 1 or end not in (-1, _get(c, "num_hidden_layers") - 1):
            _unsupported(mt, f"MoE layers every {interval} layers up to {end}", "moe_lab's MoE layers run from "
                         "n_dense_layers to the last layer, every layer")
        if k == 1:
            _unsupported(mt, "moe_k=1", "Ernie renormalises the one weight to 1, moe_lab keeps the raw probability "
                         "for top_k=1")
    else:
        d_expert, d_ff = _get(c, "moe_intermediate_size"), _get(c, "intermediate_size")
        n_shared, n_dense = _get(c, "n_shared_experts") or 0, _get(c, "first_k_dense_replace") or 0
        if (_get(c, "moe_layer_freq", 1) or 1) != 1:
            _unsupported(mt, f"moe_layer_freq={_get(c, 'moe_layer_freq')}", "moe_lab's MoE layers are every layer "
                         "from n_dense_layers on")
        if arch.router == "sigmoid" and not _get(c, "norm_topk_prob"):
            _unsupported(mt, "norm_topk_prob=False", "moe_lab's sigmoid router always renormalises the chosen scores")
        if arch is DEEPSEEK_V2:
            if _get(c, "topk_method", "greedy") != "greedy":
                _unsupported(mt, f"topk_method={_get(c, 'topk_method')!r} (group-limited routing)",
                             "moe_lab's router chooses among all experts")
            if k > 1:
                _unsupported(mt, f"num_experts_per_tok={k} with a softmax router that does not renormalise",
                             "DeepseekV2 keeps the raw softmax probabilities of the top k; moe_lab renormalises them "
                             "for top_k > 1")
    hd = _get(c, "head_dim") if arch.attention == "mha" else None
    if d % H or (hd is not None and hd != d // H):
        _unsupported(mt, f"head_dim={hd} with hidden_size={d}, {H} heads", "moe_lab's heads are hidden_size / heads wide")
    kv = _get(c, "num_key_value_heads") or H
    if H % kv:
        _unsupported(mt, f"num_key_value_heads={kv}", f"a divisor of num_attention_heads={H} (grouped-query attention)")
    mla = {}
    if arch.attention == "mla":
        if kv != H:
            _unsupported(mt, f"num_key_value_heads={kv} != num_attention_heads={H}", "MLA rebuilds every head's key")
        if _get(c, "qk_nope_head_dim") != d // H or _get(c, "v_head_dim") != d // H:
            _unsupported(mt, f"qk_nope_head_dim={_get(c, 'qk_nope_head_dim')}, v_head_dim={_get(c, 'v_head_dim')}",
                         f"moe_lab's MLA heads are hidden_size / heads = {d // H} wide for keys and values")
        if _get(c, "rms_norm_eps") != LATENT_NORM_EPS:
            _unsupported(mt, f"rms_norm_eps={_get(c, 'rms_norm_eps')}", f"moe_lab uses one eps for every RMSNorm and "
                         f"transformers builds the latent ones with {LATENT_NORM_EPS}")
        mla = dict(attention="mla", kv_rank=_get(c, "kv_lora_rank"), q_rank=_get(c, "q_lora_rank"),
                   rope_dim=_get(c, "qk_rope_head_dim"))
    bias = arch.bias_key is not None
    moe = MoEConfig(n_experts=E, top_k=k, d_expert=d_expert, n_shared=n_shared, router=arch.router,
                    routed_scaling=scaling, balance="aux_free" if bias else "aux_loss")
    return ModelConfig(vocab_size=_get(c, "vocab_size"), d_model=d, n_layers=_get(c, "num_hidden_layers"), n_heads=H,
                       max_seq_len=L, d_ff=d_ff, ffn="moe", n_dense_layers=n_dense, moe=moe,
                       rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=float(_get(c, "rms_norm_eps")),
                       tie_embeddings=bool(_get(c, "tie_word_embeddings", False)), **mla)
