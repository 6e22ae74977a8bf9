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
# # 12 · Distillation against RL: DeepSeek-R1's second lesson
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/12_distillation.ipynb)
#
# Notebook 08 taught DeepSeek-R1's first lesson: reinforcement learning with a verifiable reward
# makes a model better at a task it half knows. The R1 report has a second lesson, the one most
# developers acted on: for a *small* model, it paid better to fine-tune on a strong RL-trained
# teacher's answers than to run RL on the small model itself. Here you run that comparison at the
# course's scale. A student three times smaller than the course's model is improved three ways on
# the same budget: by GRPO, by distilling the GRPO-improved course model, and by learning from its
# own verified samples. Five seeds per method decide what this scale can say, and what it cannot.
#
# **What you will learn**
# - what DeepSeek-R1 distilled, into which models, and what its table of RL against distillation at 32B shows
# - the distillation loss: cross-entropy on the teacher's completion tokens only
# - rejection sampling: sample the teacher, keep what the verifier accepts, each distinct answer once
# - expert iteration: the same filter on the student's own samples
# - how to give methods a fair budget (equal seconds and an equal pool of problems) and read a spread over seeds
#
# **Prerequisites**: notebook 04 (the recipe that pre-trains the student) and notebook 08 (GRPO, the
# teacher's training and one of the three methods). A pre-trained student and the teacher's samples
# ship with the course. **Time to run**: CPU (2 cores): 1 min 28 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. The story: RL makes the teacher, distillation makes the small models
#
# DeepSeek-R1 (DeepSeek-AI, January 2025) trained its reasoning model with GRPO on verifiable math
# and code problems, then used it as a teacher. It sampled about 800,000 training examples from it
# (600,000 reasoning traces kept by rejection sampling, checked against the answers, plus 200,000
# general ones), and fine-tuned six open dense models on them, Qwen2.5 from 1.5B to 32B parameters
# and Llama 3 at 8B and 70B, with supervised fine-tuning only and no RL. The distilled
# Qwen-32B reached 72.6 % on AIME 2024 (pass@1) and 94.3 % on MATH-500. The report then asked the
# obvious question: would RL on the small model have done as well? It ran large-scale RL on
# Qwen2.5-32B-Base itself, for over 10,000 steps (DeepSeek-R1-Zero-Qwen-32B), and got 47.0 % on AIME
# 2024 and 91.6 % on MATH-500 (GPQA Diamond: 55.0 % against the distilled model's 62.1 %).
#
# Its conclusion had two halves. Distilling a stronger model into a smaller one is cheap and
# works very well; a small model trained by RL alone needs enormous compute and may still not
# match the distilled one. But pushing past the teacher still needs the teacher to get better,
# which takes RL on a large model. The report fine-tuned its distilled models without any RL stage,
# noting that RL on top could lift them further; its own R1 was trained that way round (SFT, then RL). At the course's
# scale every piece exists: the GRPO-improved model of notebook 08 is the teacher, a smaller model
# is the student, the additions are the verifiable task. What the comparison says at this scale is
# not what it says at 32B, and section 7 is about that difference.

# %% [markdown]
# ## 2. The teacher and the student
#
# The **teacher** is the course's MoE model (notebook 04's shipped checkpoint, 66.0 % held-out exact
# match) improved by notebook 08's cpu GRPO preset. Its samples of 5000 training problems (4 each, at
# GRPO's temperature 0.7) are cached in `data/records/distillation_teacher_cpu.json`, made by
# `python -m moe_lab distill teacher`: like R1's distillation data, a cost paid once, outside
# the student's budget. The **student** is `config.student_config()`: a *dense* model, as R1's
# students are dense models taught by an MoE, 48 wide instead of 64, pre-trained with notebook 04's
# recipe until its own snapshot (the first check at which it answers 65 % of a check set of training
# problems right, as the course model's snapshot), `python -m moe_lab distill student`.

# %%
import copy
import json
import random

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from moe_lab.course import checks
from moe_lab.studies import distillation
from moe_lab.training import sft
from moe_lab.core.config import notebook_sizes, preset
from moe_lab.data import TOKENIZER as tok, course_task
from moe_lab.model import Transformer

task = course_task()
sizes = notebook_sizes("12", rt.mode)
student, student_figures = distillation.load_student(device=rt.device)
cache = distillation.load_teacher_cache()
assert cache is not None, "the teacher's samples are missing: run `python -m moe_lab distill teacher`"
t = cache["teacher"]
print(f"teacher: the course model, {t['start_heldout_exact_match']:.1%} -> {t['heldout_exact_match']:.1%} "
      f"held-out exact match after {t['grpo']['steps']} GRPO steps; "
      f"its samples: {cache['sample_accuracy']:.1%} right, "
      f"pass@{cache['sampling']['k']} {cache['pass_at_k']:.1%}")
print(f"student: snapshot at step {student_figures['snapshot_step']} "
      f"({student_figures['train_seconds']:.0f} s on {student_figures['threads']} thread), "
      f"held-out exact match {student_figures['heldout_exact_match']:.1%}")
s = distillation.model_sizes(Transformer(preset("cpu").moe), student.cpu())
student.to(rt.device)
for name in ("teacher", "student"):
    z = s[name]
    print(f"{name:>8}: {z['params']:>7,} parameters, {z['active_params']:>6,} used per token, "
          f"{z['flops_per_token']:>7,.0f} forward FLOPs per token")
print(f"the student is {s['params_ratio']:.1f}x smaller in parameters, "
      f"{s['active_params_ratio']:.1f}x in parameters per token, "
      f"{s['flops_per_token_ratio']:.1f}x in FLOPs per token")

# %% [markdown]
# The student is three times smaller than the teacher, but a token of the MoE uses only two of its
# eight routed experts: per token the gap is 1.5 times. At the snapshot both models start where the
# course model started GRPO in notebook 08, about two thirds of the held-out additions right.
#
# ## 3. The distillation loss, masked to the completion
#
# Distillation here is supervised fine-tuning on the teacher's completions: the row is a newline, the
# prompt (`123+45=`), then the completion (`861\n`, the reversed answer and the stop newline), then
# padding. Only the completion is the teacher's; the operands are given and random, so learning to
# predict them teaches nothing (notebook 04's batches mask them for the same reason).
#
# **Exercise 1.** `logits (B, L-1, V)` come from `model(tokens[:, :-1])`: position $t$ predicts
# `tokens[:, t+1]`. Row $r$ has `prompt_lens[r]` tokens before its completion (the newline included)
# and `lengths[r]` real tokens. Return the mean cross-entropy over the completion tokens of the whole
# batch, the answer digits and the newline, and nothing else.

# %%
def completion_loss(logits, tokens, prompt_lens, lengths):
    # BEGIN SOLUTION
    targets = tokens[:, 1:]  # (B, L-1): target t is predicted at position t
    pos = torch.arange(targets.shape[1], device=tokens.device)[None, :]  # (1, L-1)
    mask = (pos >= prompt_lens[:, None] - 1) & (pos < lengths[:, None] - 1)  # the completion's targets
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return nll[mask].mean()
    # END SOLUTION


# the same as moe_lab.training.sft.sft_loss on completion_batch's mask
checks.check_completion_loss(completion_loss)

# %% [markdown]
# The package builds the same batch with `sft.completion_batch` (its mask is 1 exactly where
# yours selects) and takes the loss with `sft.sft_loss`. On teacher completions of real problems:

# %%
pairs = [(p, p.answer + "\n") for p in task.problems(8, "train", seed=3)]
x, y, mask = sft.completion_batch(pairs, device=rt.device)
tokens = torch.cat([x, y[:, -1:]], 1)
prompt_lens = torch.tensor([1 + len(p.prompt) for p, _ in pairs], device=rt.device)
lengths = torch.tensor([1 + len(p.prompt) + len(c) for p, c in pairs], device=rt.device)
with torch.no_grad():
    mine, package = (completion_loss(student(x)[0], tokens, prompt_lens, lengths),
                     sft.sft_loss(student, x, y, mask))
print(f"your loss {mine:.4f}, the package's {package:.4f} on {int(mask.sum())} completion tokens "
      f"of {mask.numel()} positions")
assert torch.allclose(mine, package, atol=1e-5)

# %% [markdown]
# ## 4. Rejection sampling: the verified dataset
#
# The teacher answers 92 % of held-out problems greedily, yet only about three quarters of its
# samples at temperature 0.7 are right. Fine-tuning on them unfiltered would teach the student the
# teacher's mistakes. R1 kept only samples that passed its checks; here the verifier of notebook 08
# decides. A sample goes into the dataset when its answer is right (`task.verify`) and it is well
# formed (`task.format_ok`: digits, then exactly one newline, so the student also learns to stop),
# and each distinct (problem, completion) pair goes in once: a problem the teacher got right four
# times would otherwise weigh four times as much as one it got right once.
#
# **Exercise 2.** Build the dataset: `samples[i]` holds the sampled completions of `problems[i]`;
# return the list of `(problem, completion)` pairs, in the order of the samples.

# %%
def verified_dataset(task, problems, samples):
    # BEGIN SOLUTION
    out, seen = [], set()
    for p, completions in zip(problems, samples):
        for c in completions:
            if task.verify(c, p) and task.format_ok(c) and (p.prompt, c) not in seen:
                seen.add((p.prompt, c))
                out.append((p, c))
    return out
    # END SOLUTION


checks.check_verified_dataset(verified_dataset)  # the same as moe_lab.training.sft.verified_dataset

# %% [markdown]
# On the teacher's cached samples: what the filter keeps, and what it throws away.

# %%
problems = distillation.cache_problems(cache, task)
data = verified_dataset(task, problems, cache["samples"])
kept_problems = len({p.prompt for p, _ in data})
rejected = [(p.prompt, c) for p, ss in zip(problems, cache["samples"]) for c in ss if not task.verify(c, p)]
print(f"{len(problems)} problems x {cache['sampling']['k']} samples: {len(data)} verified pairs "
      f"covering {kept_problems} problems ({kept_problems / len(problems):.1%}); "
      f"{len(rejected)} wrong samples dropped, e.g. {rejected[:3]}")
assert data == sft.verified_dataset(task, problems, cache["samples"])

# %% [markdown]
# ## 5. Three ways, one budget
#
# Each method starts from the same student and gets the same budget:
#
# - **equal seconds**: a run trains until its own clock passes `Budget.seconds`. The clock counts the
#   method's own work (sampling, the teacher's look-ups, SFT and GRPO updates), not the held-out
#   evaluations, and the step that crosses the budget finishes, so a run ends at most one step late;
# - **equal problems**: every method of a seed draws from the same pool of `Budget.problems`
#   training problems (a subset of the teacher's 5000), as often as it likes.
#
# The methods:
#
# 1. **grpo**: notebook 08's trainer and cpu preset on the student, prompts drawn from the pool;
# 2. **distill**: SFT on the verified teacher samples of the pool's problems (batches of 64, AdamW at 1e-3);
# 3. **expert_iteration**: GRPO's rollouts of the student (32 problems x 8 samples at T = 0.7), only the
#    verified ones kept (section 4's filter), one SFT step on them: learning from one's own successes,
#    without advantages or a KL penalty;
# 4. **distill_grpo**: distill for the first half of the seconds, then GRPO from the distilled student
#    (R1's own order: SFT, then RL).
#
# One seed of each, live, on a smaller budget than the record's (`notebook_sizes("12", mode)`):

# %%
budget = distillation.Budget(**sizes["live_budget"])
live = {m: distillation.run_method(m, student, cache, budget, seed=0, task=task)
        for m in distillation.METHODS}
for m, r in live.items():
    print(f"{m:>16}: {r['eval_accuracy'][0]:.1%} -> {r['eval_accuracy'][-1]:.1%} in {r['seconds']:.1f} s, "
          f"{r['updates']} updates, {r['problem_visits']:,} problem visits "
          f"from a pool of {r['distinct_problems']}")
    assert r["seconds"] >= budget.seconds and r["distinct_problems"] == budget.problems  # the budget, met

# %%
fig, ax = plt.subplots(figsize=(7, 3.8))
for m, r in live.items():
    ax.plot(r["eval_seconds"], r["eval_accuracy"], "o-", label=m)
ax.set(xlabel="training seconds", ylabel=f"held-out exact match ({budget.eval_problems} problems)",
       title=f"live: one seed per method, {budget.seconds:g} s each ({rt.mode} mode)")
ax.legend()
plt.show()

# %% [markdown]
# The methods spend their seconds very differently: an SFT step on 64 teacher completions is cheap,
# so distillation sees its pool dozens of times over while GRPO, which samples 8 answers per problem
# and runs the policy and the reference on all of them, sees each problem only a few times. Equal
# seconds is the budget a developer has; the problem visits show where it went.
#
# ## 6. The record: every method, five seeds
#
# One seed decides nothing (notebook 08 showed two GRPO runs differing by more than some effects
# they are meant to show). The record runs every method on seeds 0-4, each seed in its own process
# with one thread, the methods of a seed back to back in an order rotated by the seed, so that a
# busy machine slows them alike:
#
#     python -m moe_lab distill compare --seeds 0-4 --seconds 40 --evals 5 --problems 3000 \
#         --lock LOCKFILE --out data/records/distillation_cpu.json
#
# The seeds vary the pool, the order of the data and the sampling; the student's pre-training is
# the same shipped checkpoint for all (its own spread is not in these bands).

# %%
record = distillation.load_record()
if record is not None:
    distillation.validate_record(record)
    curves = distillation.spread_curves(record)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (m, c) in enumerate(curves.items()):
        ax.fill_between(c["seconds"], c["min"], c["max"], color=f"C{i}", alpha=0.25)
        ax.plot(c["seconds"], c["mean"], "o-", color=f"C{i}", label=f"{m} ({c['seeds']} seeds)")
    ax.axhline(record["teacher"]["heldout_exact_match"], color="gray", ls="--", lw=1, label="the teacher")
    ax.set(xlabel="training seconds (one thread)", ylabel="held-out exact match (500 problems)",
           title=f"recorded: mean and range over seeds, budget {record['budget']['seconds']:g} s, "
                 f"pool of {record['budget']['problems']} problems")
    ax.legend(loc="lower right")
    plt.show()
    for m, s in record["summary"].items():
        print(f"{m:>16}: {s['mean']:.1%} mean at the budget, "
              f"{s['min']:.1%}-{s['max']:.1%} over seeds {s['seeds']}; "
              f"problem visits {min(s['problem_visits']):,}-{max(s['problem_visits']):,}")
    order = distillation.ranking(record)
    print("ranges that do not overlap at the budget (a above b on every seed):", order or "none")
else:
    print("no recorded comparison here (data/records/ is not installed): run the command above")

# %% [markdown]
# ## 7. What this scale can and cannot say
#
# What the record supports is checked here on every seed's worst case, not on the means, so the
# sentences below stay true if the record is re-made (the cell fails otherwise):

# %%
if record is not None:
    s, teacher_acc = record["summary"], record["teacher"]["heldout_exact_match"]
    assert all(len(s[m]["final"]) >= 5 for m in distillation.METHODS)  # five seeds per method
    order = set(distillation.ranking(record))
    # 1. distillation ends above GRPO and expert iteration on every seed
    for a in ("distill", "distill_grpo"):
        assert {(a, "grpo"), (a, "expert_iteration")} <= order, (a, order)
    # 2. no ranking between those two
    assert not {("grpo", "expert_iteration"), ("expert_iteration", "grpo")} & order
    assert abs(s["distill"]["mean"] - teacher_acc) < 0.02  # 3. distillation ends near its teacher
    c = distillation.spread_curves(record)["distill"]
    first = c["seconds"][1]
    # most of its gain in the first mark
    assert c["min"][1] - c["mean"][0] > 0.5 * (s["distill"]["mean"] - c["mean"][0])
    gap = s["distill_grpo"]["mean"] - s["distill"]["mean"]
    print(f"distillation reached {c['min'][1]:.1%}-{c['max'][1]:.1%} after {first:g} s; "
          f"distill then GRPO ended {100 * gap:.1f} points above distill alone on average "
          f"(ranges {s['distill']['min']:.1%}-{s['distill']['max']:.1%} "
          f"and {s['distill_grpo']['min']:.1%}-{s['distill_grpo']['max']:.1%})")

# %% [markdown]
# Within these bounds the record (5 seeds, 40 s per run on one thread, a pool of 3000 problems) says:
#
# 1. **At equal seconds, distillation beat RL on the student.** SFT on the teacher's verified
#    answers ended at 91.0-93.4 % held-out exact match, GRPO at 85.8-88.2 % and expert iteration at
#    85.4-87.6 %: the ranges do not overlap. Distillation took most of its gain in the first 8
#    seconds (87.8-92.0 %); GRPO's mean curve is flat after 24 s, expert iteration's after 8 s.
# 2. **GRPO and expert iteration cannot be told apart** here (means 87.0 and 86.1 %, overlapping ranges).
# 3. **Distillation stopped at about the teacher's level** (mean 92.4 %, teacher 92.0 % on the same
#    500 problems). Imitation inherits the teacher's answers, and with them its ceiling.
# 4. **Distillation then GRPO, R1's own order, ended highest**: 93.6-95.4 %, above the teacher on
#    every seed. Its range sits only 0.2 points above distillation's (the mean gap is 2.1 points),
#    less than the ±2 points by which a different set of 500 held-out problems could move any of
#    these figures: a hint that RL after distillation pays, not a finding of this record.
#
# What it cannot say:
#
# - **Why distillation wins here is not why it won in R1.** R1's students imitated long reasoning
#   traces, a way of thinking the 32B model did not find by RL on its own. An addition has no
#   trace: a verified completion *is* the answer key, so the teacher contributed only *which* of the
#   pool's problems got a right answer (about 96 % of them) and nothing else. What this record measures is
#   a dense supervised signal (every answer token of 64 right answers per cheap step) against a sparse
#   one (GRPO learns from differences between the student's own sampled answers and spends most of
#   its time sampling them). That is part of R1's argument, not the interesting part.
# - **Scale.** The student is 3.0 times smaller than the teacher in parameters and 1.5 times in
#   FLOPs per token; R1 distilled a 671B-parameter MoE into 1.5B to 70B dense models, and compared
#   RL with distillation only at 32B. Whether the direction holds at other sizes is a question about
#   scale, and one student size shows no trend.
# - **Longer budgets.** After 40 s GRPO and expert iteration were flat within the noise, but a
#   different learning rate, group size or a longer run could still move them; 40 s on one thread
#   is what five seeds of four methods fit in about 15 minutes of a shared 2-core machine.
# - **The spread** is over seeds of the pool, data order and sampling, on one machine, with one
#   pre-trained student; the student's own pre-training spread (notebook 04's cliff) is not in it.
#
# ## 8. Where this notebook simplifies
#
# - **Answers, not reasoning traces.** R1's teacher wrote thousands of tokens of reasoning per
#   problem; the student imitated *how* it thinks. Here a completion is 2-5 digits and a newline.
# - **One task.** R1 distilled math, code and general data; the course has 3-digit additions.
# - **One student pre-training.** The seeds vary the pool, the data order and the sampling, not the
#   student's pre-training run, whose own cliff (notebook 04) would widen every band.
# - **Hyper-parameters.** GRPO runs notebook 08's cpu preset unchanged; SFT's learning rate (1e-3) and
#   batch (64) were set once, not tuned per method. A method tuned harder could move.
# - **The teacher's cost is outside the budget**, as R1's was: the cached samples took the teacher's
#   GRPO run and 20,000 samples, paid once for every student and seed.
#
# ## Summary
# - DeepSeek-R1 distilled its RL-trained reasoning model into six dense Qwen and Llama models by SFT on
#   about 800,000 rejection-sampled examples; at 32B the distilled model beat the same model trained by
#   large-scale RL (AIME 2024: 72.6 % against 47.0 %; MATH-500: 94.3 % against 91.6 %).
# - Distillation is SFT with the loss masked to the completion: the answer and its stop newline.
# - Rejection sampling keeps what the verifier accepts, each distinct completion once; expert iteration
#   applies the same filter to the student's own samples.
# - A fair comparison fixes the seconds and the pool of problems, and reads the result from several seeds.
# - At the course's scale (5 seeds, 40 s each): distillation 91.0-93.4 %, GRPO 85.8-88.2 %, expert iteration
#   85.4-87.6 %, distillation then GRPO 93.6-95.4 %, from the student's 65.2 % (teacher 92.0 %). Distillation
#   beat RL at equal seconds, but on answers with no reasoning trace the verified teacher completion is the
#   answer key: this is dense supervision against a sparse reward, not the transfer of a way of thinking.
#
# ## Papers and further reading
# - DeepSeek-AI. *DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via Reinforcement Learning* (2025): the
#   distilled models (section 2.4) and distillation against RL (section 4.1, its table of Qwen-32B).
# - Shao et al. *DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models* (2024): GRPO.
# - Hinton, Vinyals and Dean. *Distilling the Knowledge in a Neural Network* (2015): distillation from soft targets.
# - Anthony, Tian and Barber. *Thinking Fast and Slow with Deep Learning and Tree Search* (2017): expert iteration.
# - Zelikman et al. *STaR: Bootstrapping Reasoning With Reasoning* (2022): fine-tuning on one's own verified answers.
# - Lee et al. *Teaching Arithmetic to Small Transformers* (2023): why the answers are reversed.
