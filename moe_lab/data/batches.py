"""Batches for language-model training (notebooks 01, 02, 04).

A language model learns to predict the next token. A batch is `Batch(x, y, mask, source)`:

    x       (B, T) int64    input ids, B rows of T tokens
    y       (B, T) int64    targets: y[:, t] is the token that follows x[:, t] (x shifted left by one)
    mask    (B, T) float32  1.0 where the loss on y counts, 0.0 where it is ignored
    source  (B,)   int64    which source each row came from (an index into Mixture.names)

Sources of rows:

- TextSource: random windows of a text (the stdlib corpus); the loss counts everywhere.
- TaskSource: rows of whole arithmetic problems, "\\n23*47=1801\\n5*62=013\\n...", ending in padding.
  The loss counts on the answers (and the newline that ends each) only: the operands are random, so
  predicting them teaches nothing and would drown the signal of the answers.
- Mixture: each row drawn from one source with a fixed probability.

Every sample is determined by a `torch.Generator`, so a seeded run sees the same batches.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from moe_lab.data.corpus import load_corpus
from moe_lab.data.tasks import ArithmeticTask
from moe_lab.data.tokenizer import TOKENIZER, CharTokenizer

SPLITS = ("train", "val")


class Batch(NamedTuple):
    x: Tensor  # (B, T) int64 input ids
    y: Tensor  # (B, T) int64 target ids: x shifted left by one
    mask: Tensor  # (B, T) float32, 1 where the loss counts
    source: Tensor  # (B,) int64 index of the source of each row


def _check_request(split: str, batch_size: int, seq_len: int) -> None:
    """Errors for a bad split or size, shared by every source."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")


class TextSource:
    """Random windows of a text; the last `val_fraction` of it is kept for validation.

    The text is encoded once. A row is seq_len + 1 consecutive tokens from a random start:
    the first seq_len are x, the last seq_len are y. The split is by position (not by random
    windows), so no validation character is ever trained on.
    """

    def __init__(self, text: str, tokenizer: CharTokenizer = TOKENIZER, val_fraction: float = 0.1):
        if not 0 < val_fraction < 1:
            raise ValueError(f"TextSource(val_fraction={val_fraction!r}): expected a number strictly between 0 and 1")
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
        cut = int(len(ids) * (1 - val_fraction))
        self.data = {"train": ids[:cut], "val": ids[cut:]}

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        """(x, y, mask) of batch_size random windows of the split; mask is all ones."""
        _check_request(split, batch_size, seq_len)
        data = self.data[split]  # (N,)
        if len(data) < seq_len + 2:
            raise ValueError(f"seq_len={seq_len}: the {split} part of the text is too short, {len(data)} tokens; "
                             f"expected at least seq_len + 2 = {seq_len + 2} (use a longer text or a smaller seq_len)")
        # starts in [0, N - T - 1): the very last window is never drawn (kept as is so that seeded
        # runs reproduce the shipped checkpoint's batches)
        start = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)  # (B,)
        rows = data[start[:, None] + torch.arange(seq_len + 1)]  # (B, T+1)
        return rows[:, :-1], rows[:, 1:], torch.ones(batch_size, seq_len)


class TaskSource:
    r"""Rows packed with whole problems: training problems for "train", held-out ones for "val".

    A row (seq_len + 1 tokens before the shift) is a newline, then whole problem lines while they
    fit, then padding. For `ArithmeticTask("mul")` with seq_len = 21:

        ids    \n  2  3  *  4  7  =  1  8  0  1 \n  5  *  6  2  =  0  1  3 \n pad
        mask    0  0  0  0  0  0  0  1  1  1  1  1  0  0  0  0  0  1  1  1  1   0

    The leading newline makes every problem, the first included, follow a newline, as at
    evaluation (moe_lab.training.evaluation prompts "\n23*47="). After the shift, x is ids[:-1], y is
    ids[1:] and the mask is mask[1:]: it belongs to the predicted token. With
    answer_only_loss=False the loss counts on the whole problem text (never on padding).
    """

    def __init__(self, task: ArithmeticTask, tokenizer: CharTokenizer = TOKENIZER, answer_only_loss: bool = True):
        self.task, self.tok, self.answer_only_loss = task, tokenizer, answer_only_loss

    def _row(self, rng: random.Random, split: str, seq_len: int) -> tuple[list[int], list[float]]:
        """One row of seq_len + 1 ids and the loss mask of each id."""
        task_split = "train" if split == "train" else "heldout"
        prompt_weight = 0.0 if self.answer_only_loss else 1.0
        ids, mask = [self.tok.newline_id], [0.0]  # the row starts at a problem boundary
        while True:
            p = self.task.sample(rng, task_split)
            prompt, answer = self.tok.encode(p.prompt), self.tok.encode(p.answer + "\n")
            if len(ids) + len(prompt) + len(answer) > seq_len + 1:
                break  # this problem does not fit whole: the row ends here
            ids += prompt + answer
            mask += [prompt_weight] * len(prompt) + [1.0] * len(answer)
        pad = seq_len + 1 - len(ids)  # the tail past the last whole problem: padding, no loss
        return ids + [self.tok.pad_id] * pad, mask + [0.0] * pad

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        """(x, y, mask) of batch_size rows of whole problems; mask 1 on answers (and their newline)."""
        _check_request(split, batch_size, seq_len)
        if seq_len < self.task.max_line_len:
            raise ValueError(f"seq_len={seq_len}: too short for one problem of {self.task}, expected at least "
                             f"{self.task.max_line_len} (the longest problem line)")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))  # Python's rng, seeded from the generator
        rng = random.Random(seed)
        rows, masks = zip(*(self._row(rng, split, seq_len) for _ in range(batch_size)))
        ids = torch.tensor(rows, dtype=torch.long)  # (B, T+1)
        mask = torch.tensor(masks, dtype=torch.float32)  # (B, T+1)
        return ids[:, :-1], ids[:, 1:], mask[:, 1:]  # x, y, mask: (B, T) each


class Mixture:
    """Draw each row from one source with probability proportional to its weight.

    `names` lists the sources in the order given; Batch.source indexes it. The rows of one source
    are sampled together, then put in their places.
    """

    def __init__(self, sources: dict, weights: Optional[dict] = None):
        if not sources:
            raise ValueError("Mixture(sources={}): expected at least one source")
        weights = {name: 1.0 for name in sources} if weights is None else weights
        if set(weights) != set(sources):
            raise ValueError(f"Mixture weights={weights}: expected one weight for each source of {list(sources)}")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"Mixture weights[{name!r}]={w!r}: expected a non-negative number")
        if sum(weights.values()) <= 0:
            raise ValueError(f"Mixture weights={weights}: expected at least one positive weight")
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.probs = torch.tensor([float(weights[n]) for n in self.names]) / sum(weights.values())  # (S,)

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """A Batch whose row i comes from source `names[source[i]]`."""
        _check_request(split, batch_size, seq_len)
        which = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)  # (B,)
        x = torch.empty(batch_size, seq_len, dtype=torch.long)  # (B, T)
        y = torch.empty_like(x)  # (B, T)
        mask = torch.empty(batch_size, seq_len, dtype=torch.float32)  # (B, T)
        for s, source in enumerate(self.sources):
            rows = (which == s).nonzero().flatten()  # (rows of source s,)
            if len(rows):
                x[rows], y[rows], mask[rows] = source.sample(split, len(rows), seq_len, generator)
        return Batch(x, y, mask, which)


def batch_fn(mixture: Mixture, batch_size: int, seq_len: int, seed: int = 0, device="cpu"):
    """A `split -> Batch` function for moe_lab.training.loop.train, with its own seeded generator per split.

    The "val" generator is separate from the "train" one, so evaluating more or less often does
    not change the training batches.
    """
    gens = {s: torch.Generator().manual_seed(seed + i) for i, s in enumerate(SPLITS)}

    def batches(split: str) -> Batch:
        if split not in gens:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        b = mixture.sample(split, batch_size, seq_len, gens[split])
        return Batch(*(t.to(device) for t in b))

    return batches


def course_task() -> ArithmeticTask:
    """The task family notebooks 04 and 08 evaluate (and GRPO rewards): 3-digit addition, reversed answers."""
    return ArithmeticTask(op="add", n_digits=3)


def course_training_task() -> ArithmeticTask:
    """What notebook 04 trains on: additions whose operands have 1, 2 or 3 digits, equally often.

    Short problems are learned first and carry the model to the long ones (a curriculum by mixture).
    The held-out split is a property of the operand pair, so held-out 3-digit pairs of course_task()
    are never trained on.
    """
    return ArithmeticTask(op="add", n_digits=3, mixed_lengths=True)


def course_mixture(task: Optional[ArithmeticTask] = None, code_weight: float = 0.2) -> Mixture:
    """The course's training data: stdlib code and arithmetic problems, rows drawn 20 / 80 by default.

    20 % code rather than 40 %: with 40 %, whether the cpu preset learned 3-digit addition within its
    steps depended on the seed and the thread count (4 seeds on one CPU: 94, 97, 18 and 4 % held-out
    exact match after 1500 steps); with 20 % every run did (README, "Figures")."""
    if not 0 <= code_weight <= 1:
        raise ValueError(f"code_weight={code_weight}: expected a number in [0, 1]")
    task = task or course_training_task()
    return Mixture({"code": TextSource(load_corpus()), "arith": TaskSource(task)},
                   {"code": code_weight, "arith": 1 - code_weight})
