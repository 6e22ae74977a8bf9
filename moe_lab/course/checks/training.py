"""Checkers for notebook 04 (training): the learning-rate schedule and the masked language-model loss."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from moe_lab.core.config import TrainConfig
from moe_lab.course.checks.common import CheckFailed, _compare, _ok, checker
from moe_lab.training.loop import lr_at


@checker
def check_lr_schedule(schedule: Callable) -> None:
    """schedule(step, cfg) -> linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    cfg = TrainConfig(steps=60, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
    got = [float(schedule(s, cfg)) for s in range(cfg.steps + 5)]
    expected = [lr_at(s, cfg) for s in range(cfg.steps + 5)]
    bad = [s for s, (a, b) in enumerate(zip(got, expected)) if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)]
    if not bad:
        _ok("check_lr_schedule")
        return
    s = bad[0]
    hint = ""
    if s == 0 and got[0] == 0.0:
        hint = "; a rate of 0 wastes the first step: warm up with (step + 1) / warmup_steps"
    elif s == 0 and math.isclose(got[0], cfg.lr, rel_tol=1e-6):
        hint = "; there is no warm-up: the first warmup_steps steps rise linearly to lr"
    elif s >= cfg.warmup_steps and math.isclose(got[cfg.steps], 0.0, abs_tol=1e-12):
        hint = "; the cosine must end at lr * min_lr_ratio, not at 0"
    elif s >= cfg.steps and all(s2 >= cfg.steps for s2 in bad):
        hint = "; every step up to steps-1 is right: from `steps` on, clamp progress to 1 (the rate stays at the minimum)"
    elif s >= cfg.warmup_steps:
        p = (s - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
        if math.isclose(got[s], cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - p)), rel_tol=1e-6):
            hint = "; that decays linearly: use the cosine 0.5 * (1 + cos(pi * progress))"
    raise CheckFailed(f"check_lr_schedule: with steps={cfg.steps}, warmup_steps={cfg.warmup_steps}, lr={cfg.lr}, "
                      f"min_lr_ratio={cfg.min_lr_ratio}: step {s} gives {got[s]:.6g}, expected {expected[s]:.6g} "
                      f"({len(bad)} of {len(got)} steps differ){hint}")


@checker
def check_masked_loss(loss_fn: Callable) -> None:
    """loss_fn(logits (B, T, V), y (B, T), mask (B, T)) -> mean cross-entropy over the positions where mask is 1."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, 11, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.zeros(3, 6)
    mask[0, 2:5] = 1.0
    mask[2, 1] = 1.0  # 4 positions count; row 1 has none
    nll = F.cross_entropy(logits.detach().flatten(0, 1), y.flatten(), reduction="none").view(3, 6)
    expected = (nll * mask).sum() / mask.sum()
    got = loss_fn(logits, y, mask)
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        raise CheckFailed(f"check_masked_loss: the loss should be a scalar tensor, got "
                          f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    if torch.allclose(got.detach(), nll.mean(), atol=1e-5):
        raise CheckFailed("check_masked_loss: this is the mean over every position: the mask is ignored (the loss "
                          "should count only where mask is 1)")
    if torch.allclose(got.detach(), (nll * mask).mean(), atol=1e-5):
        raise CheckFailed("check_masked_loss: masked positions are zeroed but you divide by every position; divide "
                          "by the number of positions that count, mask.sum()")
    _compare("check_masked_loss", got.detach(), expected, what="loss")
    if not got.requires_grad:
        raise CheckFailed("check_masked_loss: the loss carries no gradient to the logits: did you detach it or use .item()?")
    empty = loss_fn(logits.detach(), y, torch.zeros(3, 6))
    if not torch.isfinite(torch.as_tensor(empty)).all() or float(empty) != 0.0:
        raise CheckFailed(f"check_masked_loss: with an all-zero mask the loss is {float(empty)}, expected 0 (clamp the "
                          f"count to at least 1 instead of dividing by zero)")
    _ok("check_masked_loss")
