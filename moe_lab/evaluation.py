"""Solving task problems with a model: batched generation and exact-match accuracy (notebooks 04, 08).

Prompts are grouped by length and each group is generated as one batch, so no prompt needs
padding: the model sees exactly what it saw in training (a newline, then the problem).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

from moe_lab.data.tasks import ArithmeticTask, Problem
from moe_lab.data.tokenizer import TOKENIZER


@torch.no_grad()
def solve(model, problems: Sequence[Problem], temperature: float = 0.0, top_k: Optional[int] = None,
          generator: Optional[torch.Generator] = None, max_new_tokens: Optional[int] = None, tok=TOKENIZER) -> list[str]:
    """The model's completion (text after the prompt, up to and including the first newline) of each problem."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_new = max_new_tokens or max(len(p.answer) for p in problems) + 2
    by_len = defaultdict(list)
    for i, p in enumerate(problems):
        by_len[len(p.prompt)].append(i)
    out: list[str] = [""] * len(problems)
    for _, idxs in sorted(by_len.items()):
        prompts = torch.tensor([[tok.newline_id] + tok.encode(problems[i].prompt) for i in idxs], device=device)
        seqs = model.generate(prompts, max_new, temperature=temperature, top_k=top_k,
                              stop_token=tok.newline_id, generator=generator)
        for i, row in zip(idxs, seqs[:, prompts.shape[1]:].tolist()):
            text = tok.decode(row, skip_special=False)  # exactly what was written: "97<pad>5" is not "975"
            out[i] = text[: text.index("\n") + 1] if "\n" in text else text
    model.train(was_training)
    return out


def exact_match(model, task: ArithmeticTask, n: int = 200, seed: int = 1234, split: str = "heldout") -> float:
    """Fraction of n problems (fixed by seed) the model answers exactly, greedily."""
    problems = task.problems(n, split, seed)
    completions = solve(model, problems)
    return sum(task.verify(c, p) for c, p in zip(completions, problems)) / n


@torch.no_grad()
def sampled_accuracy(model, task: ArithmeticTask, problems: Sequence[Problem], k: int = 8, temperature: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> tuple[float, float]:
    """Sample k answers per problem: (share of samples that are right, pass@k = share of problems with >= 1 right).

    pass@k is what reinforcement learning can harvest: a problem the model sometimes solves gives a
    group with both right and wrong answers, hence a learning signal; greedy accuracy is what it aims
    to raise (notebook 08).
    """
    if k < 1:
        raise ValueError(f"sampled_accuracy(k={k}): expected an integer >= 1")
    if temperature <= 0:
        raise ValueError(f"sampled_accuracy(temperature={temperature}): expected a number > 0 (0 would be greedy)")
    repeated = [p for p in problems for _ in range(k)]
    completions = solve(model, repeated, temperature=temperature, generator=generator)
    right = torch.tensor([task.verify(c, p) for c, p in zip(completions, repeated)], dtype=torch.float32).view(-1, k)
    return float(right.mean()), float(right.amax(1).mean())
