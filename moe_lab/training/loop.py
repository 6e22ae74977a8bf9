"""The training loop (notebooks 02 and 04): AdamW, linear warm-up then cosine decay, gradient
clipping, periodic evaluation, and a history for plots.

One step:  1. sample a batch  2. forward (+ the routers' balance loss)  3. backward
           4. clip the gradient norm  5. AdamW step at the scheduled learning rate
           6. DeepSeek-V3 bias update of aux-loss-free routers  7. log loss, time and expert load

The course's own recipe on top of this loop (the snapshot GRPO starts from, the `train` command)
is moe_lab.training.recipe.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from moe_lab.core.config import TrainConfig

BatchFn = Callable[[str], tuple]  # split ("train" / "val") -> (x, y, mask, ...) on the model's device


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of a step: linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains), as in GPT-2 / nanoGPT."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@dataclass
class History:
    """What happened during training, step by step, ready to plot."""

    step: list = field(default_factory=list)  # optimiser step of each train record
    train_loss: list = field(default_factory=list)  # language-model loss of that step's batch
    aux_loss: list = field(default_factory=list)  # routers' balance + z-loss of that step
    lr: list = field(default_factory=list)
    time: list = field(default_factory=list)  # seconds since the start (training only, no evals)
    load: list = field(default_factory=list)  # per step: (n_moe_layers, E) assignments per expert
    eval_step: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    eval_time: list = field(default_factory=list)  # training seconds elapsed at each evaluation

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else float("nan")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["load"] = [l.tolist() for l in self.load]
        return d


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: BatchFn, n_batches: int, split: str = "val") -> float:
    """Mean masked loss over n_batches batches of a split; leaves the model in its previous mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(n_batches):
        x, y, mask = batches(split)[:3]
        total += float(model(x, y, mask)[1])
    model.train(was_training)
    return total / n_batches


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
                   grad_clip: float = 0.0, update_router_biases: bool = True) -> None:
    """Steps 3 to 6 of every update of the course (pre-training here, GRPO, notebook 06): set the
    learning rate, backward, clip the gradient norm (grad_clip > 0), take the optimiser step, then
    DeepSeek-V3's bias rule of aux-loss-free routers (a no-op for other balancing, and for a model
    without MoE layers). The gradients stay in .grad until the next step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if update_router_biases and hasattr(model, "update_router_biases"):
        model.update_router_biases()


def train_step(model: torch.nn.Module, batch, opt: torch.optim.Optimizer, lr: float, grad_clip: float = 0.0):
    """One language-model update on a batch (x, y, mask): forward, the routers' balance loss, then
    optimizer_step. Returns (loss, aux) as tensors (detached)."""
    x, y, mask = batch[:3]
    _, loss = model(x, y, mask)
    has_moe = hasattr(model, "moe_layers") and bool(model.moe_layers())
    aux = model.balance_loss() if has_moe else torch.zeros((), device=loss.device)
    optimizer_step(model, opt, loss + aux, lr, grad_clip, update_router_biases=has_moe)
    return loss.detach(), aux.detach()


def train(model: torch.nn.Module, batches: BatchFn, cfg: TrainConfig, progress: bool = True,
          desc: str = "train", on_step: Optional[Callable[[int, "History"], None]] = None) -> History:
    """Train model for cfg.steps steps on batches("train"), evaluating on batches("val")."""
    if isinstance(cfg, TrainConfig):
        cfg.check()  # again: a field changed since construction (cfg.lr = nan) is named before any step
    opt = make_optimizer(model, cfg)
    hist = History()
    has_moe = hasattr(model, "moe_layers") and bool(model.moe_layers())
    model.train()
    elapsed = 0.0
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        # 1. a batch, 2. forward + balance loss, 3-6. backward, clip, update, bias rule
        loss, aux = train_step(model, batches("train"), opt, lr, cfg.grad_clip)
        loss_value = loss.item()  # syncs with the device, so the step time is real
        elapsed += time.perf_counter() - t0
        hist.step.append(step)  # 7. log
        hist.train_loss.append(loss_value)
        hist.aux_loss.append(aux.item())
        hist.lr.append(lr)
        hist.time.append(elapsed)
        if has_moe:
            hist.load.append(torch.stack([s.load for s in model.routing_stats()]))  # (layers, E)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hist.eval_step.append(step + 1)
            hist.val_loss.append(evaluate(model, batches, cfg.eval_batches))
            hist.eval_time.append(elapsed)
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{hist.val_loss[-1]:.3f}")
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {step}: lower the learning rate")
        if on_step is not None:
            on_step(step, hist)
    return hist
