"""The model card (README.md) of an exported model: what it is, how it was trained, its measured
figures (from the checkpoint's metadata, never invented), how to run it, and its license."""
from __future__ import annotations

import json
from typing import Optional

from moe_lab.core.config import ModelConfig
from moe_lab.open_weights.architectures import Architecture

LICENSE = "mit"  # the course's own license (pyproject.toml): the weights are the course's work

_FIGURES = [  # (metadata key, what it means, format); keys a checkpoint lacks are left out
    ("heldout_exact_match", "held-out 3-digit additions answered exactly (500 problems, greedy): these weights", "{:.1%}"),
    ("val_loss", "validation loss (nats per token): these weights", "{:.4f}"),
    ("snapshot_step", "optimiser step at which these weights were kept (the first check that reached the "
                      "snapshot target: the starting point of the course's GRPO)", "{}"),
    ("final_heldout_exact_match", "held-out exact match of the same run at its last step (not these weights)", "{:.1%}"),
    ("final_val_loss", "validation loss of the same run at its last step (not these weights)", "{:.4f}"),
    ("steps", "optimiser steps of the run", "{}"), ("train_seconds", "training time (s)", "{}"),
    ("threads", "CPU threads", "{}"), ("torch", "torch", "{}"), ("date", "date", "{}"),
]


def model_card(cfg: ModelConfig, arch: Architecture, extra: Optional[dict], n_params: int, n_active: int,
               repo_id: str = "YOUR_NAME/moe-lab-moe") -> str:
    """README.md text with the Hub's YAML header."""
    extra = dict(extra or {})
    m = cfg.moe
    rows = [f"| {what} | {fmt.format(extra[key])} |" for key, what, fmt in _FIGURES if key in extra]
    figures = ("| figure | value |\n|---|---|\n" + "\n".join(rows)) if rows else \
        "No figures were recorded with this model (its checkpoint's metadata holds none)."
    training = extra.get("command")
    trained = (f"Trained with `{training}`; evaluated on: {extra.get('task', 'the course task')}. The "
               f"checkpoint's metadata is reproduced at the end of this card.") if training else \
        "No training record came with this model (exported from a model built in memory, or a checkpoint without one)."
    meta = {k: v for k, v in extra.items() if k != "checks"}
    router = {"softmax": "softmax top-k, weights renormalised over the chosen experts",
              "sigmoid": "sigmoid scores, weights renormalised over the chosen experts (DeepSeek-V3)"}[m.router]
    bias = " plus a per-expert selection bias (DeepSeek-V3's auxiliary-loss-free balancing; it picks experts, it never weights them)" \
        if m.balance == "aux_free" else ""
    return f"""---
license: {LICENSE}
library_name: transformers
pipeline_tag: text-generation
tags: [moe, mixture-of-experts, moe-lab, {arch.model_type}]
---

# moe-lab Mixture-of-Experts model ({arch.name})

A small Mixture-of-Experts language model trained from scratch in the moe-lab course (a Jupyter
course that builds an MoE LM, its Triton kernels and GRPO). It is exported from `moe_lab` to the
`{arch.name}` architecture of `transformers`, which computes the same function: logits agree with
`moe_lab`'s within float32 rounding and greedy answers are identical (checked by the course's tests).
No custom code is needed.

## What it is
- {cfg.n_layers} layers, width {cfg.d_model}, {cfg.n_heads} heads ({'multi-head latent attention' if cfg.attention == 'mla' else 'multi-head attention'}),
  RoPE (theta {cfg.rope_theta:g}), RMSNorm, SwiGLU experts; context of {cfg.max_seq_len} tokens (what it was trained for).
- MoE: {m.n_experts} routed experts of width {m.d_expert}, top-{m.top_k}, {m.n_shared} shared expert(s),
  first {cfg.n_dense_layers} layer(s) dense; router: {router}{bias}.
- {n_params:,} parameters, {n_active:,} active per token.
- Tokenizer: one id per character (99 ids: `<pad>`, `<bos>`, `<eos>`, newline, printable ASCII); text with
  other characters is refused.

## Training
{trained} The data: Python standard-library source code and arithmetic problems, whose answers are
written least-significant digit first (`347+589=639` means 936).

## Measured figures
{figures}

## Use
```python
from transformers import pipeline
pipe = pipeline("text-generation", model="{repo_id}")
print(pipe("\\n347+589=", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"])
```
A prompt starts with a newline and the answer ends with one (the generation config stops there).

## Limits
A teaching model: it adds 3-digit numbers (reversed answers) and writes Python-looking text; it knows
nothing else, and nothing about the world. Not for any real use.

## License
MIT, as the course.

## Checkpoint metadata
```json
{json.dumps(meta, indent=2)}
```
"""
