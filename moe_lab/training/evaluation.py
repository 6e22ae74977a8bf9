"""Solving task problems with a model: batched generation and exact-match accuracy (notebooks 04, 08).

Prompts are grouped by length and each group is generated as one batch, so no prompt needs
padding: the model sees exactly what it saw in training (a newline, then the problem). Generation
uses the model's KV cache (notebook 10): each group's prompts are run once, and the `repeats`
samples of one prompt share that run.
"""
from __future__ import annotations

import numbers
from collections import defaultdict
from typing import Optional, Sequence

import torch

from moe_lab.data.tasks import ArithmeticTask, Problem
from moe_lab.data.tokenizer import TOKENIZER
from moe_lab.model.transformer import GenerationArgumentError, check_generate_args


@torch.no_grad()
def generate_completions(model, problems: Sequence[Problem], repeats: int = 1, temperature: float = 0.0,
                         top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                         max_new_tokens: Optional[int] = None, tok=TOKENIZER,
                         use_cache: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every problem, `repeats` times each, in rows i * repeats + j.

    A completion stops after its first newline (included); without one it has max_new_tokens ids.
    Used by solve() (greedy answers) and moe_lab.training.grpo.sample_rollouts (groups of samples).
    use_cache=False generates without the KV cache (the same completions, more slowly).
    max_new_tokens: None (the longest answer + 2) or an integer >= 1; temperature a finite number >= 0
    (0 = greedy); top_k None or an integer in [1, vocab]. A wrong one is a GenerationArgumentError
    naming it, and the model keeps the mode it had whatever fails.
    """
    if not problems:
        raise ValueError("generate_completions: no problems given")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", tok.vocab_size)
    max_new = max(len(p.answer) for p in problems) + 2 if max_new_tokens is None else max_new_tokens
    if max_new_tokens is None or isinstance(max_new_tokens, numbers.Integral):
        check_generate_args("generate_completions", max_new, temperature, top_k, repeats, vocab, min_new_tokens=1)
    else:
        raise GenerationArgumentError(f"generate_completions(max_new_tokens={max_new_tokens!r}): expected None "
                                      "(the longest answer + 2) or an integer >= 1")
    was_training = model.training
    if was_training:  # (walking the modules costs time: only when the mode must change)
        model.eval()
    try:
        return _generate_grouped(model, problems, repeats, temperature, top_k, generator, max_new, tok, use_cache)
    finally:
        if was_training:
            model.train()


def _generate_grouped(model, problems, repeats, temperature, top_k, generator, max_new, tok, use_cache):
    """generate_completions' work: one batch per prompt length."""
    device = next(model.parameters()).device
    by_len = defaultdict(list)
    for i, p in enumerate(problems):
        by_len[len(p.prompt)].append(i)
    out: list = [None] * (len(problems) * repeats)
    for _, idxs in sorted(by_len.items()):
        prompts = torch.tensor([[tok.newline_id] + tok.encode(problems[i].prompt) for i in idxs], device=device)
        seqs = model.generate(prompts, max_new, temperature=temperature, top_k=top_k, stop_token=tok.newline_id,
                              generator=generator, use_cache=use_cache, repeats=repeats)  # (n * repeats, T0 + new)
        for r, row in enumerate(seqs.tolist()):
            prompt, completion = row[: prompts.shape[1]], row[prompts.shape[1]:]
            if tok.newline_id in completion:  # cut after the stop token (later ones are filler)
                completion = completion[: completion.index(tok.newline_id) + 1]
            out[idxs[r // repeats] * repeats + r % repeats] = (prompt, completion)
    return out


def solve(model, problems: Sequence[Problem], temperature: float = 0.0, top_k: Optional[int] = None,
          generator: Optional[torch.Generator] = None, max_new_tokens: Optional[int] = None, tok=TOKENIZER) -> list[str]:
    """The model's completion (text after the prompt, up to and including the first newline) of each problem.

    Decoded exactly as written, special tokens included: "97<pad>5" is not the answer "975"."""
    if not problems:
        return []
    rows = generate_completions(model, problems, 1, temperature, top_k, generator, max_new_tokens, tok)
    return [tok.decode(completion, skip_special=False) for _, completion in rows]


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
