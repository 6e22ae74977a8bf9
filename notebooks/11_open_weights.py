# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 11 · Open weights: out to Hugging Face `transformers`, and real MoE checkpoints in
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/11_open_weights.ipynb)
#
# DeepSeek's models changed the field because their weights are open: a folder on the Hugging Face
# Hub with a `config.json`, a `model.safetensors` and a tokenizer, that anyone loads with
# `transformers` and adapts. The course's model so far lives only in `moe_lab`. Here it goes out:
# exported to an architecture of `transformers` that computes *exactly* the same function, with the
# same answers; and open MoE models come in: a DeepSeek-V3-architecture model becomes a `moe_lab`
# model whose experts run on the course's own Triton kernels.
#
# **What you will learn**
# - what an open-weights folder holds (config, safetensors, tokenizer, generation config, model card) and what engines read from it
# - how to pick an architecture that holds a model exactly, and why an approximate export is refused
# - the name of every `moe_lab` weight in a `transformers` checkpoint, and the two RoPE layouts with the row permutation between them
# - how to import a DeepSeek-V3-architecture model and run its experts on the course's back-ends
#
# **Prerequisites**: notebooks 02 (RoPE), 03-04 (the MoE layer and the shipped checkpoint), 06 (the
# expert back-ends) and 10 (MLA). Needs `transformers` and `tokenizers` (`pip install -e ".[hub]"`;
# Colab has both). **Time to run**: CPU (2 cores): 9 s to 10 s · GPU: not yet measured.
#
# The optional Hub section needs a network: it was not run here.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. Export the shipped checkpoint
#
# `moe_lab.open_weights.export` writes a folder that `transformers` loads with no custom code. It
# first chooses the architecture: the shipped model has multi-head attention with RoPE on
# interleaved pairs, a softmax router with DeepSeek-V3's selection bias (aux-loss-free balancing),
# weights renormalised over the top 2, and one shared expert. `Ernie4_5_MoeForCausalLM` computes
# exactly that: its router adds `e_score_correction_bias` to the softmax probabilities for the
# *selection* only, as `moe_lab` does. (`python -m moe_lab export CHECKPOINT DIR` does the same from a shell.)

# %%
import json
import tempfile
from pathlib import Path

import torch

from moe_lab.course import checks
from moe_lab.training.checkpoint import load_checkpoint, shipped_checkpoint
from moe_lab.open_weights import choose_architecture, export

ckpt = shipped_checkpoint()
ours, figures = load_checkpoint(ckpt)
ours.eval()
print("architecture:", choose_architecture(ours.cfg).name)
work = Path(tempfile.mkdtemp(prefix="moe-lab-11-"))
out = export(ckpt, work / "moe-lab-moe")
for f in sorted(out.iterdir()):
    print(f"{f.name:24s} {f.stat().st_size:>9,} bytes")
config = json.loads((out / "config.json").read_text())
print({k: config[k] for k in ("architectures", "hidden_size", "moe_num_experts", "moe_k",
                              "moe_num_shared_experts", "moe_intermediate_size", "rope_parameters",
                              "tie_word_embeddings")})

# %% [markdown]
# ## 2. The same answers through `transformers`
#
# Load the folder the way anyone would, with `AutoModelForCausalLM` and `pipeline`, then compare
# with `moe_lab` on held-out additions: the logits first, then the greedy answers. The prompt is a
# newline then the problem; `generation_config.json` stops at the newline that ends an answer.

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from moe_lab.data import course_task
from moe_lab.training.evaluation import solve

hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(out)
x = torch.tensor([tok("\n347+589=639\n12+7=91\ndef f(x):\n    return x")["input_ids"]])
with torch.no_grad():
    gap = (hf_model(x).logits - ours(x)[0]).abs().max().item()
print(f"{type(hf_model).__name__}: largest logit difference {gap:.1e} "
      f"(logits up to {ours(x)[0].abs().max().item():.1f})")
assert gap < 1e-5

task = course_task()
problems = task.problems(60, "heldout", 1234)
pipe = pipeline("text-generation", model=str(out), dtype=torch.float32)
theirs = [r[0]["generated_text"] for r in pipe(["\n" + p.prompt for p in problems], max_new_tokens=6,
                                                return_full_text=False)]
mine = solve(ours, problems)
assert theirs == mine
right = sum(task.verify(c, p) for c, p in zip(theirs, problems))
for p, a in list(zip(problems, theirs))[:4]:
    print(f"{p.prompt}{a!r:8} {'right' if task.verify(a, p) else 'wrong (expected ' + p.answer + ')'}")
print(f"transformers and moe_lab give the same {len(problems)} answers; {right} are right")

# %% [markdown]
# On all 500 held-out problems of `moe_lab.training.evaluation.exact_match`, both answer 66.0 % right, with
# no completion differing (`python -m moe_lab export-agreement`; README, "Open weights").
#
# ## 3. The model card
#
# `README.md` is what the Hub shows: what the model is, how it was trained, its measured figures
# (read from the checkpoint's metadata, never typed in), how to use it, its license. Note which
# figures belong to *these* weights: the course ships the snapshot kept when 65 % of a check set was
# first right (the start of GRPO in notebook 08), not the end of the run.

# %%
card = (out / "README.md").read_text()
print(card[: card.index("## Use")])

# %% [markdown]
# Publishing is one call, shown here and not run (it needs a Hub account and a token):
#
# ```python
# from huggingface_hub import HfApi
# HfApi(token="hf_...").upload_folder(folder_path=out, repo_id="YOUR_NAME/moe-lab-moe", repo_type="model")
# ```
#
# ## 4. Every weight has a name
#
# The folder's `model.safetensors` holds the same numbers as the checkpoint, under `transformers`'
# names, layer `i` of `moe_lab` (`blocks.i.`) being `model.layers.i.`. Most tensors map one to one;
# three kinds change shape:
# - `attn.qkv` (3d, d) is split into `q_proj`, `k_proj`, `v_proj`;
# - the routed experts, stacked in `moe_lab` as `w1, w3 (E, d, f)` and `w2 (E, f, d)` for `x @ w`,
#   become one tensor per expert, `mlp.experts.e.gate_proj / up_proj (f, d)` and `down_proj (d, f)`,
#   transposed because `nn.Linear` computes `x @ W.T` (the names that transformers 4.x and 5.x both load);
# - with tied embeddings there is no `lm_head.weight`: `tie_word_embeddings` says to reuse the embedding.
#
# **Exercise 1.** Write the `transformers` name (architecture `Ernie4_5_Moe`) of each one-to-one
# tensor: the embedding, the final norm, the output head, the two norms of a block (`norm1` before
# attention, `norm2` before the feed-forward), the attention output `attn.proj`, the router's
# `gate` and `expert_bias` (Ernie calls the bias `mlp.moe_statics.e_score_correction_bias`), and
# the shared expert's `w1, w3, w2` (SwiGLU's gate, up and down projections).

# %%
import re


def hf_weight_name(name: str) -> str:
    # BEGIN SOLUTION
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", name).groups()
    rest = {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight",
            "attn.proj.weight": "self_attn.o_proj.weight", "ffn.router.gate.weight": "mlp.gate.weight",
            "ffn.router.expert_bias": "mlp.moe_statics.e_score_correction_bias",
            "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
            "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
            "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight"}[rest]
    return f"model.layers.{i}.{rest}"
    # END SOLUTION


checks.check_weight_names(hf_weight_name)  # the same as moe_lab.open_weights.mapping.hf_name

# %% [markdown]
# The experts, read back from the exported file: expert 3's gate projection in layer 1 is `w1[3]` transposed.

# %%
from safetensors.torch import load_file

tensors = load_file(out / "model.safetensors")
layer = ours.moe_layers()[1]
assert torch.equal(tensors["model.layers.1.mlp.experts.3.gate_proj.weight"], layer.w1[3].detach().t())
assert torch.equal(tensors["model.layers.1.mlp.experts.3.down_proj.weight"], layer.w2[3].detach().t())
print(len(tensors), "tensors; model.layers.1.mlp.moe_statics.e_score_correction_bias =",
      tensors["model.layers.1.mlp.moe_statics.e_score_correction_bias"].flatten().numpy().round(3))

# %% [markdown]
# ## 5. Two RoPE layouts
#
# RoPE rotates a head's query and key in pairs of numbers. `moe_lab` (like DeepSeek's own code and
# Ernie) pairs neighbours, $(2i, 2i+1)$; Llama-style code in `transformers` (`rotate_half`: Mixtral,
# Glm4Moe) pairs $(i, i + d/2)$. Attention only uses $q \cdot k$, which does not change when both
# vectors are reordered the same way. So a model runs exactly in the other layout once the rows of
# its query and key projections are reordered head by head: the half layout's number $j < d/2$ is
# the interleaved number $2j$, its number $d/2 + j$ the interleaved $2j + 1$. Values and the output
# projection stay as they are.
#
# **Exercise 2.** Reorder the rows of a query or key weight `w (n_heads * hd, d_in)` from the
# interleaved layout to the half layout: in each head, rows $0, 2, 4, \dots$ then $1, 3, 5, \dots$

# %%
def half_rows(w, n_heads):
    # BEGIN SOLUTION
    hd = w.shape[0] // n_heads
    order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # (hd,)
    return w.view(n_heads, hd, -1)[:, order].reshape(w.shape)
    # END SOLUTION


checks.check_half_rows(half_rows)  # the same as moe_lab.open_weights.rope.to_half

# %% [markdown]
# The export applies it where the architecture needs it. A `moe_lab` model with a sigmoid router
# (DeepSeek-V3's) and multi-head attention goes to `Glm4MoeForCausalLM`, which rotates halves: its
# `q_proj` is our query rows reordered as in exercise 2 (`moe_lab.open_weights.rope.to_half`), and the logits agree.

# %%
from dataclasses import replace

from moe_lab.model.transformer import Transformer
from moe_lab.open_weights.rope import to_half

torch.manual_seed(0)
sig = Transformer(replace(ours.cfg, moe=replace(ours.cfg.moe, router="sigmoid", routed_scaling=2.5))).eval()
glm_dir = export(sig, work / "glm")
glm = AutoModelForCausalLM.from_pretrained(glm_dir, dtype=torch.float32).eval()
q_ours = sig.blocks[0].attn.qkv.weight[: sig.cfg.d_model]
assert torch.equal(glm.model.layers[0].self_attn.q_proj.weight,
                   to_half(q_ours.detach(), sig.cfg.n_heads, sig.cfg.d_model // sig.cfg.n_heads))
with torch.no_grad():
    print(type(glm).__name__,
          f"largest logit difference {(glm(x).logits - sig(x)[0]).abs().max().item():.1e}")

# %% [markdown]
# ## 6. What has no exact counterpart is refused
#
# The export never approximates. Notebook 10's MLA model keeps the course's softmax router with a
# selection bias: `DeepseekV2` (MLA, softmax) has no selection bias and `DeepseekV3` (MLA, bias)
# scores with a sigmoid. The refusal names the field and why, before anything is written.

# %%
from moe_lab.open_weights import NoCounterpart

mla_cfg = replace(ours.cfg, attention="mla", kv_rank=32, rope_dim=8, norm_eps=1e-6)
try:
    export(Transformer(mla_cfg), work / "refused")
except NoCounterpart as err:
    print("refused:", err)
assert not (work / "refused").exists()
print("with a sigmoid router it goes to",
      choose_architecture(replace(mla_cfg, moe=replace(mla_cfg.moe, router="sigmoid"))).name)

# %% [markdown]
# ## 7. Import a DeepSeek-V3-architecture model and run it on the course's kernels
#
# The other way: `from_transformers(folder or model)` builds a `moe_lab` `Transformer` that computes
# what the `transformers` model computes. Here `transformers` itself builds a tiny model of
# DeepSeek-V3's architecture (MLA with low-rank queries, sigmoid router with selection bias, a
# shared expert, a dense first layer), with random weights: the structure of the real one at a
# size that runs anywhere. Its experts then run on every back-end of notebook 06, `triton`
# included (through Triton's interpreter on a CPU).

# %%
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from moe_lab.model import expert_backends as B
from moe_lab.open_weights import from_transformers

torch.manual_seed(0)
ds_config = DeepseekV3Config(vocab_size=99, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                             qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
                             max_position_embeddings=64)
ds = DeepseekV3ForCausalLM(ds_config).eval()
with torch.no_grad():
    for n, b in ds.named_buffers():
        if "e_score_correction_bias" in n:
            b.normal_(0, 0.02)  # a trained model's selection bias is not zero
ds.save_pretrained(work / "tiny-deepseek-v3")
imported = from_transformers(work / "tiny-deepseek-v3")
print(imported.cfg.attention, imported.cfg.moe.router, imported.cfg.moe.balance, "dense first layers:",
      imported.cfg.n_dense_layers)
ids = torch.randint(0, 99, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    reference = ds(ids).logits
    # the model is on the CPU
    for backend in [n for n in B.names() if B.status(n, "cpu", torch.float32) is None]:
        imported.set_backend(backend)
        gap = (imported(ids)[0] - reference).abs().max().item()
        print(f"{backend:10s} largest logit difference to transformers {gap:.1e}")
        assert gap < 1e-5
print("expert load per MoE layer (tokens per expert):", [s.load.tolist() for s in imported.routing_stats()])

# %% [markdown]
# ## 8. Optional: a real open MoE from the Hub (Colab)
#
# Where the Hub is reachable, this section loads a real, trained MoE and runs it through the same
# import. The choice: **`Isotonic/TinyMixtral-4x248M-MoE`**, a Mixtral-architecture model of 4
# experts (top 2) built from TinyMistral-248M models, about 0.7 B parameters: 2.8 GB in float32, so it
# fits a free Colab session's 12 GB of RAM (and its T4) with room for two copies, where DeepSeek-V2-Lite
# (16 B), Moonlight (16 B) or ERNIE-4.5-21B-A3B would not. Mixtral is a supported architecture: its
# grouped-query attention is expanded to multi-head attention (each key-value head repeated for its
# group) and its `rotate_half` RoPE is permuted to `moe_lab`'s pairs. If its config has a sliding
# window, the import's context is kept within it, where the window changes nothing. Without network
# the section says so and does nothing; a download or import that fails prints why.

# %%
import socket


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


REAL_MODEL = "Isotonic/TinyMixtral-4x248M-MoE"
if not hub_reachable():
    print(f"The Hugging Face Hub is not reachable from here: section 8 ({REAL_MODEL}) is skipped.")
else:
    try:
        real_tok = AutoTokenizer.from_pretrained(REAL_MODEL)
        real = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).eval()
        context = min(256, getattr(real.config, "sliding_window", None) or 256)
        real_ours = from_transformers(real, max_seq_len=context)
        text = ("The Mixture-of-Experts layer sends each token to a few experts chosen by a router, "
                "so a model can hold many parameters while each token uses only some of them.")
        real_ids = real_tok(text, return_tensors="pt")["input_ids"][:, :context]
        with torch.no_grad():
            gap = (real(real_ids).logits - real_ours(real_ids)[0]).abs().max().item()
        print(f"{REAL_MODEL}: {real_ids.shape[1]} tokens, largest logit difference {gap:.1e}")
        import matplotlib.pyplot as plt

        loads = torch.stack([s.load for s in real_ours.routing_stats()])  # (layers, experts)
        plt.imshow(loads.float(), aspect="auto", cmap="viridis")
        plt.xlabel("expert"), plt.ylabel("layer"), plt.colorbar(label="tokens routed")
        plt.title(f"{REAL_MODEL}: expert load on one sentence")
        plt.show()
        layer = real_ours.moe_layers()[0]
        with torch.no_grad():  # the first MoE layer's input: embedding, then block 0's attention
            h = real_ours.embed(real_ids)[0]
            h = h + real_ours.blocks[0].attn(real_ours.blocks[0].norm1(h[None]))[0]
            xin = real_ours.blocks[0].norm2(h)
            r = layer.router(xin)
            outs = {n: B.run_experts(n, xin, r.expert_idx, r.weights, layer.w1, layer.w3, layer.w2)
                    for n in B.names() if B.status(n, "cpu") is None}
        for n, y in outs.items():
            print(f"{n:10s} largest difference to reference {(y - outs['reference']).abs().max().item():.1e}")
    except Exception as err:  # an optional section never fails the notebook: say why it stopped
        print(f"section 8 stopped: {type(err).__name__}: {err}")

# %% [markdown]
# ## 9. Where this notebook simplifies
#
# - **Float32 only.** The export writes float32 (the course's CPU dtype); a real release would also
#   ship bfloat16 weights, which change logits by bfloat16's rounding, not the function.
# - **Five architectures.** Each was read in `transformers` 5.x and is checked by the tests with
#   tiny models that `transformers` builds itself. Features `moe_lab` lacks are refused on import:
#   QK-norm, sliding windows shorter than the context, partial rotary embeddings, RoPE scaling
#   (YaRN), biases, group-limited routing, gated shared experts (Qwen2-MoE), other architectures.
# - **DeepSeek-V3's multi-token-prediction layer** is not part of the forward pass and is not imported.
# - **The real model of section 8 was not run here** (no network where the course is tested).
#
# ## Summary
# - An open-weights folder is `config.json` + `model.safetensors` + tokenizer + generation config + model card;
#   engines also read fields `transformers` ignores (`scoring_func`, `topk_method`), so the export writes them.
# - The course's model is `Ernie4_5_MoeForCausalLM` exactly: the same logits (within float32 rounding) and the
#   same answers through `pipeline` (66.0 % of 500 held-out additions either way).
# - Each `moe_lab` weight has a `transformers` name; experts are split per expert and transposed.
# - RoPE comes in two layouts; permuting query and key rows per head moves a model between them exactly.
# - Configurations without an exact counterpart are refused, naming the field; imports refuse missing features by name.
# - An imported DeepSeek-V3-architecture model runs on every expert back-end of the course with the same logits.
#
# ## Papers and further reading
# - DeepSeek-AI. *DeepSeek-V3 technical report* (2024): the architecture imported in section 7, and its open release.
# - DeepSeek-AI. *DeepSeek-V2* (2024): MLA and DeepSeekMoE.
# - Jiang et al. *Mixtral of Experts* (2024): the Mixtral architecture.
# - Baidu. *ERNIE 4.5 technical report* (2025): the architecture the course's model is exported to.
# - Su et al. *RoFormer: Enhanced Transformer with Rotary Position Embedding* (2021).
# - Wolf et al. *Transformers: State-of-the-Art Natural Language Processing* (2020).
