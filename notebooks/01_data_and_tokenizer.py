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
# # 01 · Data: a tokenizer, verifiable tasks and a text corpus
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/01_data_and_tokenizer.ipynb)
#
# A language model sees integers. This notebook turns text into tokens, builds the course's
# *verifiable* tasks (arithmetic problems whose answers a program can check: the rewards of
# notebook 08), loads the text corpus, and packs both into training batches.
#
# **What you will learn**
# - a character-level tokenizer, and why the course uses characters rather than BPE
# - how to generate problems with a held-out split that training never sees, and verify answers
# - how batches are built: inputs, next-token targets, and a loss mask
#
# **Prerequisites**: notebook 00 (optional). **Time to run**: CPU (2 cores): 8 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. A character tokenizer
#
# The vocabulary is fixed: three special tokens (`<pad>`, `<bos>`, `<eos>`), the newline, and the 95
# printable ASCII characters. Every digit is its own token, which matters for arithmetic: a BPE
# tokenizer would merge "123" into one token in one place and "12", "3" in another. Build it:

# %%
specials = ["<pad>", "<bos>", "<eos>"]
itos = specials + ["\n"] + [chr(c) for c in range(32, 127)]
stoi = {s: i for i, s in enumerate(itos) if i >= len(specials)}

def encode(text):
    return [stoi[c] for c in text]

def decode(ids):
    return "".join(itos[i] for i in ids if i >= len(specials))

print(len(itos), "tokens;", encode("def f(x):\n"), "->", repr(decode(encode("def f(x):\n"))))

# %% [markdown]
# The same tokenizer lives in `moe_lab.data.TOKENIZER`, which also explains bad input instead of
# failing with a bare `KeyError`. Check the two agree:

# %%
from moe_lab.data import TOKENIZER

sample = "for i in range(10):\n    total += i * 2  # sum\n"
assert TOKENIZER.encode(sample) == encode(sample) and TOKENIZER.vocab_size == len(itos)
assert TOKENIZER.decode(TOKENIZER.encode(sample)) == sample
try:
    TOKENIZER.encode("naïve")
except ValueError as err:
    print("clear error:", err)

# %% [markdown]
# ## 2. Verifiable tasks: arithmetic
#
# A problem is a line `a+b=` followed by the answer and a newline. The answer is written
# **least-significant digit first** (`47+85=` → `231`, i.e. 132 reversed): the model then writes
# digits in the order it can compute them, carry by carry, as on paper. Operand pairs are split once,
# by a fixed hash, into training and held-out sets, so accuracy is always measured on problems the
# model never saw. The verifier never raises: any string gets a verdict.

# %%
import random
from moe_lab.data import ArithmeticTask

task = ArithmeticTask(op="add", n_digits=2)
rng = random.Random(0)
for _ in range(4):
    p = task.sample(rng)
    print(repr(task.line(p)), "  true value:", p.value)

for completion in [p.answer + "\n", "999\n", "", "12a\n", "9" * 50, "🙂"]:
    print(f"{completion!r:>56} -> parse {task.parse_answer(completion)!s:>5}, reward "
          f"{task.reward(completion, p)}")
assert task.reward(p.answer + "\n", p) == 1.0 and task.reward("12a\n", p) == 0.0

# %% [markdown]
# **Exercise: a problem line.** Write the training text of the addition `a + b`: the prompt
# `a+b=`, the sum written least-significant digit first, and a newline (the model's signal that
# the answer is complete). `problem_line(47, 85)` is `'47+85=231\n'`.

# %%
from moe_lab.course import checks


def problem_line(a, b):
    # BEGIN SOLUTION
    return f"{a}+{b}={str(a + b)[::-1]}\n"
    # END SOLUTION


checks.check_problem_line(problem_line)  # the same as ArithmeticTask("add").line(problem)

# %% [markdown]
# **Check yourself.** Held-out pairs never appear in training samples, and make up about
# `heldout_fraction` of all pairs:

# %%
train_pairs = {(q.a, q.b) for q in (task.sample(rng, "train") for _ in range(3000))}
heldout_pairs = {(q.a, q.b) for q in task.problems(300, "heldout")}
share = sum(task.is_heldout(a, b) for a in range(100) for b in range(100)) / 100**2
print(f"{len(train_pairs)} training pairs seen, {len(heldout_pairs)} held-out pairs; held-out share "
      f"{share:.3f}")
assert not train_pairs & heldout_pairs
assert abs(share - task.heldout_fraction) < 0.02

# %% [markdown]
# ## 3. The text corpus
#
# The corpus is Python's own standard library: present on every machine, and a fixed selection of it
# ships in `data/corpus/` so every learner trains on the same characters.

# %%
import collections
import matplotlib.pyplot as plt
from moe_lab.data import load_corpus

text = load_corpus()
counts = collections.Counter(text)
print(f"{len(text):,} characters, {len(counts)} distinct; the most common: {counts.most_common(8)}")
print(text[2000:2300])

# %%
top = counts.most_common(30)
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(range(len(top)), [c / len(text) for _, c in top])
ax.set_xticks(range(len(top)), labels=[repr(ch)[1:-1] for ch, _ in top])
ax.set_xlabel("character")
ax.set_ylabel("share of the corpus")
ax.set_title("the 30 most common characters (space dominates code)")
plt.show()
assert counts[" "] == top[0][1]  # indentation makes the space the most common character

# %% [markdown]
# ## 4. Batches: inputs, targets and a loss mask
#
# A model learns to predict the next token, so the target `y` is the input `x` shifted by one.
# For arithmetic rows the loss counts only on the answers (the operands are random: predicting
# them teaches nothing). A `Mixture` draws each row from the code or the arithmetic source.
#
# **Exercise: the shift.** A source first makes rows of `n + 1` token ids, `ids` (B, n+1), with a
# loss mask per id, `mask` (B, n+1): the mask of an id says whether *predicting that id* counts.
# Return the model's input `x`, its targets `y` and their mask, each (B, n). At position i the
# model has read `x[:, :i+1]` and predicts `y[:, i]`.

# %%
import torch


def shift_for_next_token(ids, mask):
    # BEGIN SOLUTION
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]
    # END SOLUTION


checks.check_next_token_shift(shift_for_next_token)  # the same as TaskSource.sample's last line

# %%
import torch
from moe_lab.data import Mixture, TaskSource, TextSource

mixture = Mixture({"code": TextSource(text), "arith": TaskSource(task)}, {"code": 0.6, "arith": 0.4})
g = torch.Generator().manual_seed(0)
batch = mixture.sample("train", batch_size=8, seq_len=48, generator=g)
print("x", tuple(batch.x.shape), "y", tuple(batch.y.shape), "mask", tuple(batch.mask.shape))
for row in range(3):
    name = mixture.names[int(batch.source[row])]
    chars = TOKENIZER.decode(batch.y[row], skip_special=False)
    shown = "".join(ch if m else "·" for ch, m in zip(chars, batch.mask[row]))
    print(f"{name:>5} y   : {TOKENIZER.decode(batch.y[row])!r}\n      loss: {shown!r}")
assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])  # y is x shifted by one

# %%
arith = batch.source == mixture.names.index("arith")
frac_masked = batch.mask[arith].mean().item() if arith.any() else float("nan")
print(f"arithmetic rows: {int(arith.sum())}, loss counted on {frac_masked:.0%} of their tokens")
big = mixture.sample("train", 2000, 16, torch.Generator().manual_seed(1))
share_arith = (big.source == 1).float().mean().item()
print(f"share of arithmetic rows over 2000 rows: {share_arith:.3f} (asked for 0.4)")
assert abs(share_arith - 0.4) < 0.05

# %% [markdown]
# ## Summary
# - Tokens are characters: 99 ids, digits one token each; `moe_lab.data.TOKENIZER` explains bad input.
# - `ArithmeticTask` generates problems with a fixed held-out split and verifies any string without raising.
# - The corpus is Python's standard library, shipped in `data/corpus/`.
# - A batch is `(x, y, mask, source)`: next-token targets and a mask saying where the loss counts.
#
# ## Papers and further reading
# - Lee et al. *Teaching arithmetic to small transformers* (2023): reversed answers and data formats.
# - Sennrich et al. *Neural machine translation of rare words with subword units* (2016): BPE, the tokenizer we chose not to use.
# - Cobbe et al. *Training verifiers to solve math word problems* (2021): why verifiable answers matter.
