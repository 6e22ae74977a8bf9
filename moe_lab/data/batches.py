"""Batches for language-model training (notebooks 01, 02, 04).

A batch is `Batch(x, y, mask, source)`: x and y (B, T) token ids with y = x shifted left by one
(the next token to predict), mask (B, T) 1.0 where the loss counts, source (B,) which data source
each row came from. Three sources:

- TextSource: random windows of a text (the stdlib corpus); the loss counts everywhere.
- TaskSource: rows of whole arithmetic problems; the loss counts on the answers only (the
  operands are random, so predicting them teaches nothing).
- Mixture: each row drawn from one source with a fixed probability.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from moe_lab.data.tasks import ArithmeticTask
from moe_lab.data.tokenizer import TOKENIZER, CharTokenizer


class Batch(NamedTuple):
    x: Tensor  # (B, T) input ids
    y: Tensor  # (B, T) target ids: x shifted by one
    mask: Tensor  # (B, T) float, 1 where the loss counts
    source: Tensor  # (B,) index of the source of each row


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: expected 'train' or 'val'")


class TextSource:
    """Random windows of a text; the last val_fraction of it is kept for validation."""

    def __init__(self, text: str, tokenizer: CharTokenizer = TOKENIZER, val_fraction: float = 0.1):
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        cut = int(len(ids) * (1 - val_fraction))
        self.data = {"train": ids[:cut], "val": ids[cut:]}

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        _check_split(split)
        data = self.data[split]
        if len(data) < seq_len + 2:
            raise ValueError(f"the {split} text has {len(data)} tokens: too short for seq_len={seq_len}")
        start = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        rows = torch.stack([data[s: s + seq_len + 1] for s in start.tolist()])  # (B, T+1)
        return rows[:, :-1], rows[:, 1:], torch.ones(batch_size, seq_len)


class TaskSource:
    """Rows packed with whole problems (train problems for 'train', held-out ones for 'val')."""

    def __init__(self, task: ArithmeticTask, tokenizer: CharTokenizer = TOKENIZER, answer_only_loss: bool = True):
        self.task, self.tok, self.answer_only_loss = task, tokenizer, answer_only_loss

    def _row(self, rng: random.Random, split: str, seq_len: int):
        ids, mask = [self.tok.newline_id], [0.0]  # a row starts after a newline, like every problem
        while True:
            p = self.task.sample(rng, "train" if split == "train" else "heldout")
            prompt, answer = self.tok.encode(p.prompt), self.tok.encode(p.answer + "\n")
            if len(ids) + len(prompt) + len(answer) > seq_len + 1:
                break
            ids += prompt + answer
            mask += [0.0 if self.answer_only_loss else 1.0] * len(prompt) + [1.0] * len(answer)
        pad = seq_len + 1 - len(ids)  # the tail past the last whole problem: padding, no loss
        return ids + [self.tok.pad_id] * pad, mask + [0.0] * pad

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        _check_split(split)
        if seq_len < self.task.max_answer_len + 2 * self.task.n_digits + 3:
            raise ValueError(f"seq_len={seq_len} cannot hold one problem of {self.task}")
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        rows, masks = zip(*(self._row(rng, split, seq_len) for _ in range(batch_size)))
        ids, mask = torch.tensor(rows), torch.tensor(masks)  # (B, T+1)
        return ids[:, :-1], ids[:, 1:], mask[:, 1:]  # the mask belongs to the predicted token


class Mixture:
    """Draw each row from one source with probability proportional to its weight."""

    def __init__(self, sources: dict, weights: Optional[dict] = None):
        if not sources:
            raise ValueError("Mixture needs at least one source")
        weights = weights or {name: 1.0 for name in sources}
        if set(weights) != set(sources) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"Mixture weights {weights}: expected non-negative weights for exactly {sorted(sources)}")
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.probs = torch.tensor([float(weights[n]) for n in self.names]) / sum(weights.values())

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        which = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)  # (B,)
        x = torch.empty(batch_size, seq_len, dtype=torch.long)
        y, mask = torch.empty_like(x), torch.empty(batch_size, seq_len)
        for s, source in enumerate(self.sources):
            rows = (which == s).nonzero().flatten()
            if len(rows):
                x[rows], y[rows], mask[rows] = source.sample(split, len(rows), seq_len, generator)
        return Batch(x, y, mask, which)


def batch_fn(mixture: Mixture, batch_size: int, seq_len: int, seed: int = 0, device="cpu"):
    """A `split -> Batch` function for moe_lab.train.train, with its own seeded generators per split."""
    gens = {s: torch.Generator().manual_seed(seed + i) for i, s in enumerate(("train", "val"))}

    def batches(split: str) -> Batch:
        b = mixture.sample(split, batch_size, seq_len, gens[split])
        return Batch(*(t.to(device) for t in b))

    return batches


def course_task() -> ArithmeticTask:
    """The task notebooks 02, 04 and 08 share: 2-digit addition with reversed answers."""
    return ArithmeticTask(op="add", n_digits=2)


def course_mixture(task: Optional[ArithmeticTask] = None, code_weight: float = 0.4) -> Mixture:
    """The course's training data: stdlib code and arithmetic problems, rows drawn 40 / 60 by default."""
    from moe_lab.data.corpus import load_corpus

    if not 0 <= code_weight <= 1:
        raise ValueError(f"code_weight={code_weight}: expected a number in [0, 1]")
    task = task or course_task()
    return Mixture({"code": TextSource(load_corpus()), "arith": TaskSource(task)},
                   {"code": code_weight, "arith": 1 - code_weight})
