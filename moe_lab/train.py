"""The training loop (notebooks 02 and 04): AdamW, linear warm-up then cosine decay, gradient
clipping, periodic evaluation, and a history for plots.

One step:  1. sample a batch  2. forward (+ the routers' balance loss)  3. backward
           4. clip the gradient norm  5. AdamW step at the scheduled learning rate
           6. DeepSeek-V3 bias update of aux-loss-free routers  7. log loss, time and expert load

Command line (the course's own training command, used to make the shipped checkpoint):
    python -m moe_lab.train --preset cpu --out data/checkpoints/moe_cpu.safetensors
Every argument is checked before any work starts: a bad one exits at once (status 2) naming it.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from moe_lab.config import TrainConfig

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


def train(model: torch.nn.Module, batches: BatchFn, cfg: TrainConfig, progress: bool = True,
          desc: str = "train", on_step: Optional[Callable[[int, "History"], None]] = None) -> History:
    """Train model for cfg.steps steps on batches("train"), evaluating on batches("val")."""
    from tqdm.auto import tqdm

    opt = make_optimizer(model, cfg)
    hist = History()
    has_moe = hasattr(model, "moe_layers") and bool(model.moe_layers())
    model.train()
    elapsed = 0.0
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, mask = batches("train")[:3]  # 1. a batch
        _, loss = model(x, y, mask)  # 2. forward
        aux = model.balance_loss() if has_moe else torch.zeros((), device=loss.device)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()  # 3. backward
        if cfg.grad_clip > 0:  # 4. clip
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()  # 5. update
        if has_moe:
            model.update_router_biases()  # 6. aux-loss-free bias (no-op for other balancing)
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


def train_course_model(preset_name: str, out: Optional[str] = None, progress: bool = True, device: str = "cpu",
                       steps: Optional[int] = None, seed: Optional[int] = None):
    """The course's own training command: the preset's MoE on the course mixture, evaluated by exact
    match on held-out problems, saved (with its config and figures) when `out` is given."""
    import datetime
    import sys

    from moe_lab.checkpoint import check_save_path, save_checkpoint
    from moe_lab.config import preset
    from moe_lab.data import batch_fn, course_mixture, course_task
    from moe_lab.evaluation import exact_match
    from moe_lab.model import Transformer
    from moe_lab.runtime import require_device, seed_everything

    from dataclasses import replace

    p = preset(preset_name)
    # None keeps the preset's value; anything else (0 too) goes to TrainConfig, which names a bad one
    p.train = replace(p.train, steps=p.train.steps if steps is None else steps, seed=p.train.seed if seed is None else seed)
    device = require_device(device)
    if out:
        check_save_path(out)  # before training, not after: a bad path must not cost a run
    seed_everything(p.train.seed)
    model = Transformer(p.moe).to(device)
    batches = batch_fn(course_mixture(), p.train.batch_size, p.train.seq_len, seed=p.train.seed, device=device)
    hist = train(model, batches, p.train, progress=progress, desc=f"moe ({preset_name})")
    acc = exact_match(model, course_task(), n=500)
    extra = {"preset": preset_name, "steps": p.train.steps, "seed": p.train.seed, "val_loss": hist.final_val_loss,
             "heldout_exact_match": acc, "train_seconds": round(hist.time[-1], 1), "task": "held-out 3-digit addition, reversed answers (trained on 1-3-digit operands)",
             "command": "python -m moe_lab.train " + " ".join(sys.argv[1:]), "torch": torch.__version__,
             "date": datetime.date.today().isoformat()}
    if out:
        save_checkpoint(out, model, extra)
    return model, hist, extra


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1 (omit --steps for the preset's own count)")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer in [0, 2**32 - 1]")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every argument checked before any work (argparse exits with status 2 naming it)."""
    from moe_lab.checkpoint import check_save_path
    from moe_lab.runtime import require_device

    ap = argparse.ArgumentParser(prog="python -m moe_lab.train",
                                 description="Train the course's MoE model (the checkpoint notebook 08 starts from).")
    ap.add_argument("--preset", default="cpu", choices=["ci", "cpu", "gpu"])
    ap.add_argument("--out", default=None, help="checkpoint path, e.g. data/checkpoints/moe_cpu.safetensors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--steps", type=_positive_int, default=None, help="override the preset's number of steps (>= 1)")
    ap.add_argument("--seed", type=_seed, default=None, help="override the preset's seed")
    args = ap.parse_args(argv)
    try:
        require_device(args.device)
    except ValueError as exc:
        ap.error(f"argument --device: {exc}")
    if args.out is not None:
        try:
            check_save_path(args.out)
        except ValueError as exc:
            ap.error(f"argument --out: {exc}")
    return args


def main(argv=None) -> int:
    import json

    args = parse_args(argv)
    _, _, figures = train_course_model(args.preset, args.out, device=args.device, steps=args.steps, seed=args.seed)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
