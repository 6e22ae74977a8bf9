"""Supervised fine-tuning on verified completions: the part of distillation (and of expert
iteration) that trains (notebook 12, moe_lab.studies.distillation).

DeepSeek-R1 (DeepSeek-AI 2025, section 2.3.3 and 4.1) fine-tunes on samples that a verifier accepts
("rejection sampling"): `verified_dataset` keeps the right, well-formed, distinct completions;
`completion_batch` lays them out as at generation with a mask on the completion tokens only;
`sft_loss` is the masked cross-entropy; `SFTLearner` takes AdamW steps of it through the course's
one update (moe_lab.training.loop.optimizer_step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from moe_lab.data.tasks import ArithmeticTask, Problem
from moe_lab.data.tokenizer import TOKENIZER
from moe_lab.training.loop import optimizer_step


@dataclass
class SFTConfig:
    """Supervised fine-tuning on verified completions (distill and expert_iteration)."""

    batch_size: int = 64  # completions per optimiser step (distill)
    lr: float = 1e-3  # AdamW learning rate, constant after the warm-up
    warmup_steps: int = 10
    grad_clip: float = 1.0
    prompts_per_step: int = 32  # expert iteration: problems sampled per step (as GRPO's preset)
    group_size: int = 8  # expert iteration: samples per problem (as GRPO's preset)
    temperature: float = 0.7  # expert iteration: sampling temperature (as GRPO's preset)


def verified_dataset(task: ArithmeticTask, problems: Sequence[Problem], completions: Sequence[Sequence[str]]) -> list:
    """Rejection sampling: the (problem, completion) pairs the verifier accepts, each distinct pair once.

    completions[i] holds the samples of problems[i]. A sample is kept when its answer is right
    (task.verify) and it is well formed (task.format_ok: digits then exactly one newline, so the
    student also learns to stop). A problem whose samples are all wrong contributes nothing; one
    sampled right 8 times contributes its completion once (easy problems would otherwise dominate).
    """
    if len(problems) != len(completions):
        raise ValueError(f"verified_dataset: {len(problems)} problems but {len(completions)} lists of completions: "
                         f"expected one list per problem")
    out, seen = [], set()
    for p, samples in zip(problems, completions):
        for c in samples:
            if task.verify(c, p) and task.format_ok(c) and (p.prompt, c) not in seen:
                seen.add((p.prompt, c))
                out.append((p, c))
    return out


def completion_batch(pairs: Sequence[tuple], tok=TOKENIZER, device="cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(x, y, mask) of (problem, completion) pairs, laid out as at generation: newline, prompt, completion.

    Rows are right-padded; mask[r, t] is 1 where the target y[r, t] is a completion token (the
    answer and its newline) and 0 on the prompt and the padding, the convention of
    moe_lab.data.batches.TaskSource and of GRPO's Rollouts.completion_mask.
    """
    if not pairs:
        raise ValueError("completion_batch: no pairs given")
    rows, starts = [], []
    for p, c in pairs:
        prompt = [tok.newline_id] + tok.encode(p.prompt)
        rows.append(prompt + tok.encode(c))
        starts.append(len(prompt))
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros(len(rows), L - 1)  # (B, L-1): one per target
    for r, (row, p0) in enumerate(zip(rows, starts)):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, p0 - 1: len(row) - 1] = 1.0  # targets ids[p0 .. len-1]: the completion
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask.to(device)


def sft_loss(model, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy of the completion tokens only (the prompt's operands are given, not learned)."""
    logits = model(x)[0]  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
    m = mask.flatten().to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1.0)


class SFTLearner:
    """AdamW steps of sft_loss on batches of verified pairs (the course's optimizer_step does the update)."""

    def __init__(self, model, cfg: SFTConfig):
        self.model, self.cfg, self.updates = model, cfg, 0
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.device = next(model.parameters()).device

    def step(self, pairs: Sequence[tuple]) -> float:
        model, cfg = self.model, self.cfg
        model.train()
        loss = sft_loss(model, *completion_batch(pairs, device=self.device))
        lr = cfg.lr * min(1.0, (self.updates + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        optimizer_step(model, self.opt, loss, lr, cfg.grad_clip, update_router_biases=False)  # as GRPO: biases frozen
        self.updates += 1
        return float(loss.detach())
