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
            text = tok.decode(row)
            out[i] = text[: text.index("\n") + 1] if "\n" in text else text
    model.train(was_training)
    return out


def exact_match(model, task: ArithmeticTask, n: int = 200, seed: int = 1234, split: str = "heldout") -> float:
    """Fraction of n problems (fixed by seed) the model answers exactly, greedily."""
    problems = task.problems(n, split, seed)
    completions = solve(model, problems)
    return sum(task.verify(c, p) for c, p in zip(completions, problems)) / n
