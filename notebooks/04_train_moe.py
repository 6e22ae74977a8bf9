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
# # 04 · Train an MoE transformer, and compare it with a dense one honestly
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/04_train_moe.ipynb)
#
# Put the MoE layer of notebook 03 into the transformer of notebook 02 and train it next to a dense
# model that uses **the same compute per token** (equal active parameters), on the same data, for
# the same steps. Then look inside: does balancing work, and what do experts specialise in?
#
# **What you will learn**
# - how to compare dense and MoE fairly: equal active parameters, per step *and* per second
# - what expert load looks like during training, with and without DeepSeek-V3's bias balancing
# - which tokens each expert prefers
# - the wall-clock price of dispatching tokens to experts: the motivation for the kernels of 05–07
#
# **Prerequisites**: notebooks 02 and 03. **Time to run**: CPU (2 cores): 3 min 18 s to 3 min 30 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. Two models with equal active parameters
#
# The MoE has 8 routed experts (top-2) plus a shared expert; `dense_twin` gives the dense model a
# SwiGLU as wide as what one token uses in the MoE (2 routed + 1 shared expert). Per token both do
# the same feed-forward FLOPs; the MoE has several times the parameters to choose from.

# %%
from dataclasses import replace
import torch
from moe_lab.core.config import preset
from moe_lab.model import Transformer

p = preset(rt.mode)
configs = {"dense": p.dense, "moe": p.moe,
           "moe, no balancing": replace(p.moe, moe=replace(p.moe.moe, balance="none"))}
for name, cfg in configs.items():
    m = Transformer(cfg)
    print(f"{name:>18}: {m.n_params():>9,} parameters, {m.n_params(active=True):>9,} active per token")
dense_active = Transformer(p.dense).n_params()
moe_active = Transformer(p.moe).n_params(active=True)
assert abs(moe_active - dense_active) / dense_active < 0.05  # equal active size (the router adds a little)

# %% [markdown]
# Two pieces of the training loop `moe_lab.training.loop.train` are yours to rewrite first; the checker
# compares them with the library's (`lr_at` and the model's masked loss), which the training below uses.
#
# **Exercise: the learning-rate schedule.** Linear warm-up, then cosine decay (`cfg` is a
# `TrainConfig`). Step `s < warmup_steps` (counting from 0) trains at `lr * (s + 1) / warmup_steps`,
# so the first step already learns and step `warmup_steps - 1` reaches `lr`. After that, with
# `progress = (s - warmup_steps) / (steps - warmup_steps)`, clamped to at most 1 (steps past the
# end stay at the minimum), the rate is `lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * progress)))`.

# %%
import math
from moe_lab.course import checks


def lr_schedule(step, cfg):
    # BEGIN SOLUTION
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    # END SOLUTION


checks.check_lr_schedule(lr_schedule)  # the same as moe_lab.training.loop.lr_at

# %% [markdown]
# **Exercise: the masked loss.** The language-model loss is the cross-entropy of the targets `y`
# (B, T) under the logits (B, T, V), averaged over the positions where `mask` (B, T) is 1 (for
# arithmetic: the answers). A mask with no 1 at all gives 0, not a division by zero.

# %%
import torch.nn.functional as F


def masked_loss(logits, y, mask):
    # BEGIN SOLUTION
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
    m = mask.flatten().to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1.0)
    # END SOLUTION


checks.check_masked_loss(masked_loss)  # the same as the loss of moe_lab.model.Transformer.forward

# %% [markdown]
# ## 2. Train all three on the same batches
#
# Data: Python source and additions (notebook 01), drawn 20 / 80. The additions mix operands of
# 1, 2 and 3 digits equally (`course_training_task()`): short problems are learned first and carry
# the model towards long ones. Each model sees exactly
# the same batches (same seed). Training times exclude evaluation.
#
# While the MoE trains, an `AccuracySnapshot` looks in now and then: it asks the model 200
# *training* problems and keeps a copy of its weights the first time it gets 65 % of them right.
# Section 7 explains why GRPO (notebook 08) starts from that snapshot rather than from the end.

# %%
from moe_lab.data import batch_fn, course_mixture, course_task
from moe_lab.training.recipe import AccuracySnapshot
from moe_lab.training.loop import train

mixture, task = course_mixture(), course_task()
models, histories = {}, {}
for name, cfg in configs.items():
    runtime.seed_everything(0)
    models[name] = Transformer(cfg).to(rt.device)
    batches = batch_fn(mixture, p.train.batch_size, p.train.seq_len, seed=0, device=rt.device)
    if name == "moe":
        snapshot = AccuracySnapshot(models[name], task)  # (see section 7)
    histories[name] = train(models[name], batches, p.train, desc=name,
                            on_step=snapshot if name == "moe" else None)
for name, h in histories.items():
    print(f"{name:>18}: val loss {h.final_val_loss:.3f}, {h.time[-1]:.0f} s, "
          f"{1000 * h.time[-1] / len(h.step):.0f} ms/step")

# %% [markdown]
# ## 3. Per step and per second
#
# Per step, the MoE should win: same compute per token, more parameters. Per second is another
# story on this hardware: the dispatch (routing, sorting, gathering, one small matmul per expert)
# costs time that the dense model does not pay.

# %%
import matplotlib.pyplot as plt
from moe_lab.course.plots import plot_loss_curves

pair = {k: histories[k] for k in ("dense", "moe")}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
plot_loss_curves(pair, x="step", ax=ax1, title="validation loss per step")
plot_loss_curves(pair, x="time", ax=ax2, title="validation loss per second of training")
plt.show()
dense_h, moe_h = histories["dense"], histories["moe"]
wins = sum(m < d for m, d in zip(moe_h.val_loss, dense_h.val_loss))
print(f"MoE lower at {wins} of {len(moe_h.val_loss)} evaluations; final {moe_h.final_val_loss:.3f} vs dense "
      f"{dense_h.final_val_loss:.3f}")
print(f"time per step: MoE {moe_h.time[-1] / len(moe_h.step) * 1000:.0f} ms vs dense "
      f"{dense_h.time[-1] / len(dense_h.step) * 1000:.0f} ms")
assert moe_h.final_val_loss < dense_h.final_val_loss  # per step, the MoE wins at equal active parameters
# (the wall-clock comparison is shown, not asserted: timings depend on what else the machine is doing)

# %% [markdown]
# ## 4. Expert load, with and without balancing
#
# `History.load` recorded, at every step, how many assignments each expert got in each layer. The
# imbalance (max load / mean load; 1 is perfect) with DeepSeek-V3's bias rule and without:

# %%
import numpy as np
from moe_lab.course.plots import imbalance_curve, plot_balance_comparison

plot_balance_comparison({"no balancing": histories["moe, no balancing"],
                         "aux-loss-free bias": histories["moe"]}, layer=0)
plt.show()
from moe_lab.course.plots import load_fractions, plot_expert_load

last = {name: torch.stack(histories[name].load[-50:]).sum(0) for name in ("moe, no balancing", "moe")}
vmax = max(load_fractions(l).max().item() for l in last.values())  # one colour scale for both panels
fig, axes = plt.subplots(1, 2, figsize=(12, 2.5), layout="constrained")
for ax, (name, load) in zip(axes, last.items()):  # load: (layers, E), the last 50 steps
    plot_expert_load(load, ax=ax, title=f"{name}: load per layer, last 50 steps", vmax=vmax)
plt.show()
tail = len(moe_h.step) // 2
imb_none = imbalance_curve(histories["moe, no balancing"])[tail:].mean()
imb_bias = imbalance_curve(histories["moe"])[tail:].mean()
print(f"mean imbalance over the second half: no balancing {imb_none:.2f}, bias balancing {imb_bias:.2f}")
assert imb_bias < imb_none  # the bias rule balances the experts

# %% [markdown]
# ## 5. What do experts specialise in?
#
# Route a batch of code and a batch of arithmetic through the trained MoE and count, per expert of
# the last layer, which kinds of characters it receives.

# %%
from moe_lab.data import TOKENIZER

moe = models["moe"].eval()
kinds = {"digit": str.isdigit, "letter": str.isalpha, "space": lambda c: c == " ",
         "newline": lambda c: c == "\n", "operator / =": lambda c: c in "+=*-",
         "other punctuation": lambda c: True}
g = torch.Generator().manual_seed(123)
batch = mixture.sample("val", 64, p.train.seq_len, g)
with torch.no_grad():
    moe(batch.x.to(rt.device))
layer = moe.moe_layers()[-1]
chars = [TOKENIZER.decode([i], skip_special=False) for i in batch.x.flatten().tolist()]
kind_of = [next(k for k, test in kinds.items() if test(c)) for c in chars]
E = layer.cfg.n_experts
table = np.zeros((len(kinds), E))
for kind, row in zip(kind_of, layer.last_routing.expert_idx.cpu().tolist()):
    for e in row:
        if e >= 0:
            table[list(kinds).index(kind), e] += 1
share = table / table.sum(1, keepdims=True)  # per kind of character: which experts it goes to
fig, ax = plt.subplots(figsize=(7, 3))
im = ax.imshow(share, cmap="magma", aspect="auto")
ax.set_xticks(range(E))
ax.set_yticks(range(len(kinds)), labels=list(kinds))
ax.set_xlabel("expert (last layer)")
ax.set_title("where each kind of character is routed")
plt.colorbar(im, ax=ax, label="share of its assignments")
plt.show()
digit_top = share[0].max()
apart = 0.5 * np.abs(share[0] - share[1]).sum()  # total variation: 0 = the same experts, 1 = none in common
print(f"the expert digits prefer takes {digit_top:.0%} of their assignments (uniform routing: {1 / E:.0%}); "
      f"digits and letters are routed {apart:.0%} apart (total variation; 0 = the same experts)")
assert apart > 0.3  # digits and letters go to different experts (0.47-0.70 in 4 runs of this recipe, README)

# %% [markdown]
# ## 6. The price of dispatch: loop versus sorted
#
# Both back-ends compute the same function (notebook 03). Time a training step of the MoE with each:

# %%
import time


def step_time(model, backend, n=5):
    model.train()
    model.set_backend(backend)
    b = batch_fn(mixture, p.train.batch_size, p.train.seq_len, seed=1, device=rt.device)
    times = []
    for i in range(n + 1):
        x, y, mask, _ = b("train")
        t0 = time.perf_counter()
        loss = model(x, y, mask)[1] + model.balance_loss()
        loss.backward()
        if rt.on_gpu:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        model.zero_grad()
    return sorted(times)[len(times) // 2]


t_ref, t_sorted = step_time(moe, "reference"), step_time(moe, "sorted")
t_dense = step_time(models["dense"], "sorted")  # the dense model has no experts: the back-end is ignored
print(f"forward + backward: MoE with a loop over experts {t_ref * 1000:.0f} ms, MoE sorted "
      f"{t_sorted * 1000:.0f} ms, dense {t_dense * 1000:.0f} ms")
print(f"here the loop takes {t_ref / t_sorted:.2f}x the sorted back-end's time, "
      f"and the sorted MoE {t_sorted / t_dense:.2f}x the dense model's")
moe.set_backend(p.moe.moe.backend)
fig, ax = plt.subplots(figsize=(6, 2.2))
ax.barh(["MoE, loop over experts", "MoE, sorted", "dense"], [1000 * t for t in (t_ref, t_sorted, t_dense)],
        color=["C1", "C0", "C2"])
ax.invert_yaxis()
ax.set_xlabel("forward + backward, ms per training step (median of 5)")
ax.set_ylabel("model, back-end")
ax.set_title("the price of dispatch")
plt.show()

# %% [markdown]
# Read the two ratios printed above: they are this machine's, measured now. At this teaching size
# each expert's matmul is tiny and the step is dominated by overheads (indexing, many small kernel
# calls), so how much sorting saves depends on the CPU and on what else it runs (one 2-core CPU
# under load measured 108 ms for the loop and 80 ms sorted): shown here, not asserted. The MoE stays
# behind the dense model (during training above, on the README's 2-core CPU: 74 vs 50 ms per step).
# That gap is the motivation for notebooks 05–07:
# fuse the gather, the expert matmuls with their SwiGLU, and the weighted combine into a few Triton
# kernels, and measure where the time goes.
#
# ## 7. Exact match on held-out problems, and the checkpoint for GRPO
#
# Greedy answers to 300 held-out **3-digit** additions (`course_task()`, the family GRPO will use),
# whose operand pairs the model never saw. The answers print reversed, e.g. `38+88=621 ✓`: the
# course writes every answer least-significant digit first (126 becomes `621`, notebook 01), the order
# in which a carry is computed, so the model never has to emit a digit that depends on carries it
# has not written yet. The last column reads the answer back the usual way.

# %%
from moe_lab.training.evaluation import exact_match, solve

acc = exact_match(moe, task, n=300)
problems = task.problems(6, "heldout", seed=7)
for prob, completion in zip(problems, solve(moe, problems)):
    mark = "✓" if task.verify(completion, prob) else "✗"
    print(f"{prob.prompt}{completion.strip():<6} {mark} (true answer {prob.answer}, that is "
          f"{prob.answer[::-1]})")
print(f"held-out exact match at the end of training: {acc:.0%}")
if rt.mode != "ci":  # 10 runs of this recipe (5 seeds x 1 and 2 threads) ended at 78-100 % (README)
    assert acc >= 0.5, f"held-out exact match {acc:.0%} < 50%"

# %% [markdown]
# A model that solves nearly everything leaves reinforcement learning nothing to learn from: GRPO
# learns from groups of answers in which some are right and some wrong (notebook 08). So GRPO starts
# from the snapshot taken when the model first answered 65 % of the check set right. The curve
# shows why a snapshot *by accuracy* and not a fixed number of steps: the rise is steep, and *when*
# it comes changes with the seed, the number of threads and the CPU (a step count that lands at
# 70 % on one machine can land at 30 % on another); the snapshot lands at the same height of the
# rise wherever it comes. Only training problems are used to choose it: held-out ones stay unseen.

# %%
checks_at = snapshot.checks
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot([s for s, _ in checks_at], [a for _, a in checks_at], "o-", ms=3,
        label="check set: 200 training problems")
ax.axhline(snapshot.target, color="grey", ls=":", lw=1, label=f"target {snapshot.target:.0%}")
if snapshot.step is not None:
    ax.axvline(snapshot.step, color="C3", lw=1, label=f"snapshot for GRPO (step {snapshot.step})")
ax.plot([p.train.steps], [acc], "s", color="C2", label=f"held-out, end of training ({acc:.0%})")
ax.set(xlabel="optimiser step", ylabel="greedy exact match", title="3-digit additions: a steep rise")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Save the snapshot (one safetensors file holding the weights, with the config and these figures in
# its metadata, written atomically: a crash never leaves half a file) and check the file is the model:

# %%
from moe_lab.core import paths
from moe_lab.training.checkpoint import load_checkpoint, save_checkpoint

if snapshot.step is not None:
    start = snapshot.model_copy()
    start_acc = exact_match(start, task, n=300)
    print(f"snapshot at step {snapshot.step}: held-out exact match {start_acc:.0%} (end of training "
          f"{acc:.0%})")
    figures_04 = {"snapshot_step": snapshot.step, "heldout_exact_match": start_acc, "mode": rt.mode}
    path = save_checkpoint(paths.runs_path(f"moe_04_{rt.mode}.safetensors"), start, extra=figures_04)
    reloaded, extra = load_checkpoint(path, expected=p.moe)
    # the checkpoint is the model
    assert exact_match(reloaded, task, n=100) == exact_match(start, task, n=100)
    # often right, and room for GRPO: 10 runs (5 seeds x 1 and 2 threads) gave 55-72 % (README)
    if rt.mode != "ci":
        assert 0.45 <= start_acc < 0.8, f"snapshot's held-out exact match {start_acc:.0%}: expected 45-80 %"
else:  # the ci preset is too short to reach the target
    print(f"the check set never reached {snapshot.target:.0%} in {p.train.steps} steps (last checks: "
          f"{checks_at[-3:]})")

# %% [markdown]
# The course's own training command, `python -m moe_lab train --preset cpu --out
# data/checkpoints/moe_cpu.safetensors`, does exactly what this notebook did for the MoE (same preset, seed
# 0, same batches, same snapshot rule) and ships its snapshot: notebook 08 starts from that file, so it
# works even if this notebook was never run. It ships inside the package too (`pip install` puts the
# repository's `data/` in `moe_lab/_data/`), so a notebook opened alone on Colab finds it; where it is
# missing, notebook 08 runs the same command itself. Is your snapshot the shipped one? Only if your
# run took the same steps: the rise comes at a step that changes with the CPU and the thread count
# (880 to 1910 in the README's 10 runs; the shipped one was trained with 2 threads, and
# `runtime.setup()` gives this notebook 1 on a CPU), so the cell compares them instead of assuming.
# `shipped_checkpoint()` finds it (an earlier `.pt` one too). Check it is what it claims:

# %%
from moe_lab.training.checkpoint import shipped_checkpoint

shipped_path = shipped_checkpoint("moe_cpu")
if shipped_path is not None:
    shipped, figures = load_checkpoint(shipped_path, expected=preset("cpu").moe)
    shipped_acc = exact_match(shipped, task, n=300)
    print(f"shipped checkpoint: snapshot at step {figures['snapshot_step']} of {figures['steps']}, "
          f"recorded held-out exact match {figures['heldout_exact_match']:.0%}, "
          f"measured now {shipped_acc:.0%}")
    assert 0.45 <= shipped_acc < 0.8
    if snapshot.step is not None:
        mine, theirs = start.state_dict(), shipped.state_dict()
        same = mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k]) for k in mine)
        print(f"your snapshot (step {snapshot.step}) and the shipped one (step {figures['snapshot_step']}): "
              f"{'the same weights' if same else 'different weights'}")
else:  # a copy of the course without data/checkpoints/
    print("no shipped checkpoint: notebook 08 will run the course's training command itself")

# %% [markdown]
# ## Summary
# - At equal active parameters the MoE reaches a lower validation loss per step than the dense model.
# - Per second it pays for dispatch: at this size neither the loop nor the sorted back-end closes the gap; fused kernels are next.
# - DeepSeek-V3's bias rule keeps expert load balanced without an auxiliary loss.
# - Experts specialise: digits and letters are routed to largely different experts.
# - The trained model solves most held-out 3-digit additions; the snapshot taken when it first solved 65 % of a
#   check set, at the same height of a steep rise on any machine, leaves room for GRPO (notebook 08) and is saved.
#
# ## Papers and further reading
# - Fedus, Zoph, Shazeer. *Switch Transformers* (2021): quality per step vs per second.
# - Dai et al. *DeepSeekMoE* (2024): expert specialisation with fine-grained and shared experts.
# - DeepSeek-AI. *DeepSeek-V3 technical report* (2024): auxiliary-loss-free balancing at scale.
# - Clark et al. *Unified scaling laws for routed language models* (2022).
