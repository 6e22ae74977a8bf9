"""The training loop (notebooks 02 and 04): AdamW, linear warm-up then cosine decay, gradient
clipping, periodic evaluation, and a history for plots.

One step:  1. sample a batch  2. forward (+ the routers' balance loss)  3. backward
           4. clip the gradient norm  5. AdamW step at the scheduled learning rate
           6. DeepSeek-V3 bias update of aux-loss-free routers  7. log loss, time and expert load

Command line (the course's own training command, used to make the shipped checkpoint):
    python -m moe_lab.train --preset cpu --out data/checkpoints/moe_cpu.safetensors
    python -m moe_lab.train --preset cpu --spread --seeds 0-4 --threads 1,2   # the recipe's spread
Every argument is checked before any work starts: a bad one exits at once (status 2) naming it.

The checkpoint GRPO starts from (notebook 08) is not the end of training. Held-out exact match on
3-digit additions rises steeply once the model "gets" carries (from a few % to 90 % within a few
hundred steps, at a step that changes with the seed, the thread count and the CPU), and a model
trained to the end leaves reinforcement learning little to do. So the course's command trains the
whole schedule and keeps a snapshot of the weights the first time the model answers
SNAPSHOT_TARGET of a fixed check set of *training* problems right (`AccuracySnapshot`): wherever
the rise happens, the snapshot sits at the same point of it. The held-out problems are never used
to choose it.
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


SNAPSHOT_TARGET = 0.65  # the GRPO start: the first check at which this share of the check set is right
SNAPSHOT_CHECK = 200  # problems in the check set (training split of course_task(), fixed seed)


class AccuracySnapshot:
    """An `on_step` hook for train(): keeps a copy of the weights the first time the model answers
    at least `target` of a fixed check set of problems right (greedy exact match).

    Checks every `every` steps, every `every_near` steps once a check reached `near`: the rise can
    climb 30 points in 25 steps, so checking often keeps the snapshot close to the target (a check of
    200 problems takes about 0.6 s on 2 cores). Greedy generation draws no random numbers, so
    checking does not change the training run. After the snapshot it checks no more.
    """

    def __init__(self, model: torch.nn.Module, task, target: float = SNAPSHOT_TARGET, n: int = SNAPSHOT_CHECK,
                 split: str = "train", seed: int = 4321, every: int = 25, every_near: int = 5, near: float = 0.3):
        if not 0 < target <= 1:
            raise ValueError(f"AccuracySnapshot(target={target}): expected a number in (0, 1]")
        self.model, self.task, self.target, self.n, self.split, self.seed = model, task, target, n, split, seed
        self.every, self.every_near, self.near = every, every_near, near
        self.checks: list = []  # (step, accuracy on the check set)
        self.state: Optional[dict] = None  # the snapshot's weights (a copy), None until the target is reached
        self.step: Optional[int] = None  # the optimiser step of the snapshot

    def __call__(self, step: int, hist: "History") -> None:
        if self.state is not None:
            return
        close = bool(self.checks) and self.checks[-1][1] >= self.near
        if (step + 1) % (self.every_near if close else self.every):
            return
        from moe_lab.evaluation import exact_match

        acc = exact_match(self.model, self.task, n=self.n, seed=self.seed, split=self.split)
        self.checks.append((step + 1, acc))
        if acc >= self.target:
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.step = step + 1

    def model_copy(self) -> torch.nn.Module:
        """A new model holding the snapshot's weights (the trained model itself is left as it is)."""
        import copy

        if self.state is None:
            raise RuntimeError(f"AccuracySnapshot: the check set never reached {self.target:.0%} "
                               f"(checks: {self.checks[-3:]}): train longer or lower the target")
        snap = copy.deepcopy(self.model)
        snap.load_state_dict(self.state)
        return snap.eval()


def train_course_model(preset_name: str, out: Optional[str] = None, progress: bool = True, device: str = "cpu",
                       steps: Optional[int] = None, seed: Optional[int] = None, max_tries: int = 3):
    """The course's own training command: the preset's MoE on the course mixture for the whole
    schedule, with the snapshot GRPO starts from (see the module docstring).

    A run whose check set never reaches the target (a stall that some seeds, thread counts or CPUs
    meet) is started again with the next seed, up to `max_tries` runs; figures["seed"] is the seed
    of the run kept, figures["tries"] how many ran. Returns (snapshot model, history, figures);
    saves the snapshot with its config and figures when `out` is given. Figures: held-out exact
    match (500 problems) of the snapshot and of the model at the end of training (the model
    notebook 04 trains), the snapshot's step and validation loss."""
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
    first_seed = p.train.seed if seed is None else seed
    steps = p.train.steps if steps is None else steps
    device = require_device(device)
    if out:
        check_save_path(out)  # before training, not after: a bad path must not cost a run
    t0 = time.perf_counter()
    for attempt in range(max_tries):
        p.train = replace(p.train, steps=steps, seed=first_seed + attempt)
        seed_everything(p.train.seed)
        model = Transformer(p.moe).to(device)
        batches = batch_fn(course_mixture(), p.train.batch_size, p.train.seq_len, seed=p.train.seed, device=device)
        snapshot = AccuracySnapshot(model, course_task())
        hist = train(model, batches, p.train, progress=progress, desc=f"moe ({preset_name}, seed {p.train.seed})",
                     on_step=snapshot)
        if snapshot.state is not None or attempt + 1 == max_tries:
            break
        # Some runs never learn the carries of 3-digit additions (they stall near 10 % exact match,
        # the share of additions without a carry): start again with the next seed.
        print(f"seed {p.train.seed}: the check set never reached {snapshot.target:.0%} "
              f"(last check {snapshot.checks[-1][1]:.0%}); trying seed {p.train.seed + 1}", file=sys.stderr)
    wall = time.perf_counter() - t0
    final_acc = exact_match(model, course_task(), n=500)
    snap = snapshot.model_copy()
    val_batches = batch_fn(course_mixture(), p.train.batch_size, p.train.seq_len, seed=p.train.seed, device=device)
    extra = {"preset": preset_name, "steps": p.train.steps, "seed": p.train.seed, "tries": attempt + 1,
             "threads": torch.get_num_threads(),
             "snapshot_step": snapshot.step, "snapshot_target": snapshot.target,
             "check_exact_match": snapshot.checks[-1][1], "checks": snapshot.checks,
             "val_loss": evaluate(snap, val_batches, p.train.eval_batches),
             "heldout_exact_match": exact_match(snap, course_task(), n=500),
             "final_val_loss": hist.final_val_loss, "final_heldout_exact_match": final_acc,
             "train_seconds": round(hist.time[-1], 1), "wall_seconds": round(wall, 1),
             "task": "held-out 3-digit addition, reversed answers (trained on 1-3-digit operands)",
             "command": "python -m moe_lab.train " + " ".join(sys.argv[1:]), "torch": torch.__version__,
             "date": datetime.date.today().isoformat()}
    if out:
        save_checkpoint(out, snap, extra)
    return snap, hist, extra


def _int_list(text: str) -> list[int]:
    """ "0-4" -> [0, 1, 2, 3, 4]; "1,2" -> [1, 2]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _int_list_arg(text: str) -> list[int]:
    try:
        values = _int_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers, e.g. 0-4 or 1,2") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-empty list of whole numbers >= 0")
    return values


def recipe_spread(preset_name: str, seeds: list[int], threads: list[int], out: str, lock: Optional[str] = None) -> list[dict]:
    """Run the course's command once per (seed, thread count), each in its own process with
    OMP_NUM_THREADS and torch.set_num_threads set (and under `flock lock` when given, so that runs
    on a shared machine take turns); write every run's figures to the JSON file `out`."""
    import json
    import os
    import platform
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    rows = []
    for t in threads:
        for s in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                fig_path = Path(tmp) / "figures.json"
                cmd = [sys.executable, "-m", "moe_lab.train", "--preset", preset_name, "--seed", str(s),
                       "--threads", str(t), "--figures", str(fig_path)]
                if lock:
                    cmd = ["flock", lock] + cmd
                env = dict(os.environ, OMP_NUM_THREADS=str(t))
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                row = json.loads(fig_path.read_text())
            rows.append(row)
            print(f"seed {s} threads {t} (runs: {row['tries']}): snapshot at step {row['snapshot_step']}, held-out exact match "
                  f"{row['heldout_exact_match']:.1%}; end of training {row['final_heldout_exact_match']:.1%} "
                  f"({row['train_seconds']:.0f} s)", flush=True)
            from moe_lab.profiling import write_record

            write_record({"preset": preset_name, "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__, "runs": rows}, out, quiet=True)
    return rows


def int_in(lo: int, hi: int, hint: str):
    """An argparse type: a whole number in [lo, hi], refused with `hint` otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value}: expected {hint}")
        return value
    return parse


positive_int = int_in(1, 2**63 - 1, "at least 1 (omit --steps for the preset's own count)")
_seed = int_in(0, 2**32 - 1, "an integer in [0, 2**32 - 1]")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every argument checked before any work (argparse exits with status 2 naming it)."""
    from moe_lab.checkpoint import check_save_path
    from moe_lab.runtime import require_device

    ap = argparse.ArgumentParser(prog="python -m moe_lab.train",
                                 description="Train the course's MoE model (the checkpoint notebook 08 starts from).")
    ap.add_argument("--preset", default="cpu", choices=["ci", "cpu", "gpu"])
    ap.add_argument("--out", default=None, help="checkpoint path, e.g. data/checkpoints/moe_cpu.safetensors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--steps", type=positive_int, default=None, help="override the preset's number of steps (>= 1)")
    ap.add_argument("--seed", type=_seed, default=None, help="override the preset's seed")
    ap.add_argument("--threads", type=_int_list_arg, default=None,
                    help="torch threads (with --spread: a list, e.g. 1,2)")
    ap.add_argument("--figures", default=None, help="also write the figures as JSON to this path")
    ap.add_argument("--spread", action="store_true", help="run the command for every --seeds x --threads, "
                    "in separate processes, and write all figures to --spread-out")
    ap.add_argument("--seeds", type=_int_list_arg, default=[0, 1, 2, 3, 4], help="with --spread: seeds, e.g. 0-4 or 0,3")
    ap.add_argument("--spread-out", default="runs/recipe_spread.json", help="with --spread: the JSON file")
    ap.add_argument("--lock", default=None, help="with --spread: run each case under `flock LOCK`")
    args = ap.parse_args(argv)
    if args.threads and min(args.threads) < 1:
        ap.error(f"argument --threads: thread counts must be >= 1; got {args.threads}")
    if args.threads and not args.spread and len(args.threads) > 1:
        ap.error(f"argument --threads: one thread count without --spread; got {args.threads}")
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
    if args.spread:
        recipe_spread(args.preset, args.seeds, args.threads or [1, 2], args.spread_out, args.lock)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads[0])
    _, _, figures = train_course_model(args.preset, args.out, device=args.device, steps=args.steps, seed=args.seed)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.figures:
        from pathlib import Path

        Path(args.figures).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
