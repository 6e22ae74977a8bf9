"""Import a transformers MoE model into moe_lab: the same function as a moe_lab `Transformer`.

    from moe_lab.open_weights import from_transformers
    model = from_transformers("path/to/folder")      # or a loaded transformers model
    model.set_backend("triton")                      # the course's expert back-ends on its experts

Supported: DeepseekV3ForCausalLM, Glm4MoeForCausalLM, Ernie4_5_MoeForCausalLM, MixtralForCausalLM and
DeepseekV2ForCausalLM (top_k = 1), with what moe_lab's model computes: RoPE in either layout (half-
layout query and key rows are permuted to moe_lab's interleaved pairs, moe_lab.open_weights.rope),
grouped-query attention (expanded to multi-head attention by repeating each key-value head),
MLA with or without low-rank queries, dense first layers, shared experts, selection biases and
routed scaling. Refused, naming the feature (moe_lab.open_weights.architectures.model_config): QK-norm,
sliding windows shorter than the context, partial rotary embeddings, RoPE scaling (YaRN, ...),
projection biases, group-limited routing, MoE layers that are not every layer after the dense ones,
a gated shared expert or any other architecture (Qwen2-MoE, OLMoE, ...). Multi-token-prediction
layers (DeepSeek-V3's MTP) are not part of the forward pass and are not imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from moe_lab.model.transformer import Transformer
from moe_lab.open_weights.architectures import ARCHITECTURES, model_config, rope_settings
from moe_lab.open_weights.mapping import from_hf_state


def _rope_layout(config, arch) -> str:
    if arch.model_type == "deepseek_v3":
        return "interleaved" if getattr(config, "rope_interleave", True) else "half"
    return arch.rope


def from_transformers(source, max_seq_len: Optional[int] = None, backend: str = "sorted"):
    """A moe_lab Transformer (eval mode, float32) computing what `source` computes.

    source: a folder with config.json and weights, or a loaded transformers model. The config is
    checked before any weight is read. max_seq_len: the positions moe_lab builds RoPE tables for
    (default: the model's max_position_embeddings, at most 4096). backend: the experts' back-end."""
    import torch

    if isinstance(source, (str, Path)):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(source))
        model_config(config, max_seq_len)  # refuse before reading any weight
        source = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    config = getattr(source, "config", None)
    if config is None or not hasattr(source, "state_dict"):
        raise TypeError(f"from_transformers(source={type(source).__name__}): expected a folder or a transformers model")
    cfg = model_config(config, max_seq_len)
    from dataclasses import replace

    cfg = replace(cfg, moe=replace(cfg.moe, backend=backend))
    arch = ARCHITECTURES[config.model_type]
    state = from_hf_state(source.state_dict(), cfg, arch, config.num_key_value_heads or cfg.n_heads,
                          _rope_layout(config, arch))
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model.eval()


def rope_theta(config) -> float:
    """The RoPE base of a transformers config, 4.x or 5.x."""
    return float(rope_settings(config).get("rope_theta", 10000.0))
