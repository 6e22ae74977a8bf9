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
# # 02 · A dense transformer from scratch
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/02_transformer.ipynb)
#
# Build the four pieces of a modern decoder (RMSNorm, rotary position embeddings, causal attention
# and the SwiGLU feed-forward), check each against the course package, assemble them into a
# decoder-only transformer and train it: the **dense baseline** the MoE of notebooks 03–04 must beat.
#
# **What you will learn**
# - RMSNorm, RoPE, causal self-attention (through PyTorch's fused SDPA) and SwiGLU, as equations and code
# - how a pre-norm decoder block is wired, and how many parameters it has
# - a training loop: AdamW, warm-up + cosine schedule, gradient clipping, validation
#
# **Prerequisites**: notebook 01. **Time to run**: CPU (2 cores): 33 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. RMSNorm
#
# $\mathrm{RMSNorm}(x) = \dfrac{x}{\sqrt{\frac{1}{d}\sum_i x_i^2 + \epsilon}} \odot g$: LayerNorm without
# subtracting the mean and without a bias. Cheaper, and as good in practice (Zhang & Sennrich 2019).
# **Exercise**: write `rmsnorm(x, weight, eps)`, normalising over the last dimension.

# %%
import torch
import torch.nn.functional as F
from moe_lab.course import checks


def rmsnorm(x, weight, eps=1e-5):
    # BEGIN SOLUTION
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    # END SOLUTION


checks.check_rmsnorm(rmsnorm)  # the same as moe_lab.model.layers.RMSNorm

# %% [markdown]
# ## 2. Rotary position embeddings (RoPE)
#
# Attention alone cannot tell positions apart. RoPE rotates each pair of coordinates
# $(q_{2i}, q_{2i+1})$ of a query or key at position $m$ by the angle $m\,\theta^{-2i/d}$. The dot
# product of a rotated query and key then depends only on their *distance*: relative positions
# for free, with no learned parameters (Su et al. 2021). `rope_tables` gives $\cos$ and $\sin$ of every
# angle. **Exercise**: write `apply_rope`, rotating each pair $(x_{2i}, x_{2i+1})$ by its angle.

# %%
def rope_tables(head_dim, max_len, theta=10000.0):
    inv_freq = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):  # x: (B, H, T, hd); cos, sin: (T, hd/2)
    # BEGIN SOLUTION
    x1, x2 = x[..., 0::2], x[..., 1::2]  # the pairs
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, hd/2, 2)
    return rotated.flatten(-2)
    # END SOLUTION


checks.check_rope(apply_rope)  # the same as moe_lab.model.layers.apply_rope

cos, sin = rope_tables(16, 64)
q, k = torch.randn(16), torch.randn(16)
at = lambda v, m: apply_rope(v.expand(1, 1, 64, 16), cos, sin)[0, 0, m]
print("q·k at positions (10, 7):", round((at(q, 10) @ at(k, 7)).item(), 5), " at (40, 37):",
      round((at(q, 40) @ at(k, 37)).item(), 5))
assert torch.allclose(at(q, 10) @ at(k, 7), at(q, 40) @ at(k, 37), atol=1e-4)  # only the distance matters

# %% [markdown]
# ## 3. Causal self-attention
#
# Each position mixes the values of earlier positions, weighted by
# $\mathrm{softmax}(QK^\top/\sqrt{d_h})$ with the future masked out. Written out, then through
# `F.scaled_dot_product_attention` (one fused kernel: FlashAttention on GPUs):

# %%
B, H, T, hd = 2, 4, 12, 16
q, k, v = torch.randn(3, B, H, T, hd).unbind(0)
scores = q @ k.transpose(-2, -1) / hd**0.5  # (B, H, T, T)
scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
manual = scores.softmax(-1) @ v  # (B, H, T, hd)
fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
print("largest difference, manual vs SDPA:", (manual - fused).abs().max().item())
assert torch.allclose(manual, fused, atol=1e-5)

# %% [markdown]
# The package's `CausalSelfAttention` adds the query/key/value projections and RoPE. Check that it
# is causal: changing the future must not change the past.

# %%
from moe_lab.model.layers import CausalSelfAttention

attn = CausalSelfAttention(d_model=32, n_heads=4, max_seq_len=32)
x = torch.randn(1, 10, 32)
x_future_changed = x.clone()
x_future_changed[0, 6:] = torch.randn(4, 32)
with torch.no_grad():
    same_past = torch.allclose(attn(x)[0, :6], attn(x_future_changed)[0, :6], atol=1e-6)
print("past unchanged when the future changes:", same_past)
assert same_past

# %% [markdown]
# ## 4. SwiGLU feed-forward
#
# $\mathrm{FFN}(x) = \big(\mathrm{silu}(xW_1) \odot xW_3\big) W_2$: a gated MLP (Shazeer 2020) used by
# Llama and DeepSeek. In notebook 03 each *expert* will be exactly this. **Exercise**: write it.

# %%
def swiglu(x, w1, w3, w2):
    # BEGIN SOLUTION
    return (F.silu(x @ w1) * (x @ w3)) @ w2
    # END SOLUTION


checks.check_swiglu(swiglu)  # the same as moe_lab.model.layers.SwiGLU and moe_lab.model.experts.swiglu_expert

# %% [markdown]
# ## 5. The decoder
#
# A block is `x = x + attn(norm(x)); x = x + ffn(norm(x))` (pre-norm: the residual stream is never
# normalised, which keeps training stable). The model: embedding → blocks → RMSNorm → logits, with
# the output head sharing the embedding matrix. It lives in `moe_lab.model.Transformer`; the config
# comes from the course preset for this mode.

# %%
from moe_lab.core.config import preset
from moe_lab.model import Transformer

p = preset(rt.mode)
cfg = p.dense
print(cfg)
runtime.seed_everything(0)
model = Transformer(cfg).to(rt.device)
print(f"{model.n_params():,} parameters")
per_block = sum(t.numel() for t in model.blocks[0].parameters())
d, f = cfg.d_model, cfg.d_ff
assert per_block == 4 * d * d + 3 * d * f + 2 * d  # qkv + proj, w1 w3 w2, two norms

# %% [markdown]
# ## 6. Train the dense baseline
#
# Data: the mixture of notebook 01 (Python source code and 2-digit additions). The loop
# (`moe_lab.training.loop.train`): AdamW, linear warm-up then cosine decay, gradient clipping at 1.0,
# validation every `eval_every` steps.

# %%
from dataclasses import replace
from moe_lab.data import ArithmeticTask, Mixture, TaskSource, TextSource, batch_fn, load_corpus
from moe_lab.training.loop import evaluate, train

task = ArithmeticTask(op="add", n_digits=2)
mixture = Mixture({"code": TextSource(load_corpus()), "arith": TaskSource(task)}, {"code": 0.6, "arith": 0.4})
tcfg = replace(p.train, steps=p.train.steps // 2)  # half of notebook 04's run: enough to see learning
batches = batch_fn(mixture, tcfg.batch_size, tcfg.seq_len, seed=0, device=rt.device)
loss_at_start = evaluate(model, batches, tcfg.eval_batches)
history = train(model, batches, tcfg, desc="dense")
print(f"validation loss: {loss_at_start:.3f} at start -> {history.final_val_loss:.3f} "
      f"after {tcfg.steps} steps ({history.time[-1]:.0f} s)")
assert history.final_val_loss < 0.6 * loss_at_start  # it learned, far beyond guessing

# %%
import matplotlib.pyplot as plt
from moe_lab.course.plots import plot_loss_curves

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
plot_loss_curves({"dense": history}, ax=ax1)
ax2.plot(history.step, history.lr)
ax2.set_xlabel("optimiser step")
ax2.set_ylabel("learning rate")
ax2.set_title("warm-up, then cosine decay")
plt.show()

# %% [markdown]
# ## 7. What did it learn?
#
# Sample a continuation of some Python, and check a few additions greedily.

# %%
from moe_lab.data import TOKENIZER
from moe_lab.training.evaluation import exact_match

prompt = torch.tensor([TOKENIZER.encode("def ")], device=rt.device)
out = model.generate(prompt, 120, temperature=0.8, top_k=20,
                     generator=torch.Generator(device=rt.device).manual_seed(0))
print(TOKENIZER.decode(out[0]))
print(f"held-out 2-digit additions solved exactly: {exact_match(model, task, 100):.0%} "
      f"(notebook 04 trains longer)")

# %% [markdown]
# ## Summary
# - RMSNorm, RoPE, causal SDPA attention and SwiGLU: each built, then checked against `moe_lab.model.layers`.
# - A pre-norm decoder with tied embeddings is `moe_lab.model.Transformer`; `n_params()` counts its weights.
# - `moe_lab.training.loop.train` is the loop every later notebook uses; its `History` feeds the plots.
#
# ## Papers and further reading
# - Vaswani et al. *Attention is all you need* (2017).
# - Zhang & Sennrich. *Root mean square layer normalization* (2019).
# - Su et al. *RoFormer: enhanced transformer with rotary position embedding* (2021).
# - Shazeer. *GLU variants improve transformer* (2020).
# - Loshchilov & Hutter. *Decoupled weight decay regularization* (AdamW, 2019).
