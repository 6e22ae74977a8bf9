"""Distillation against reinforcement learning for a small student (notebook 12).

DeepSeek-R1 (DeepSeek-AI 2025, section 4.1) found that for small models, fine-tuning on a strong
RL-trained teacher's outputs beat running RL on the small model itself. This module lets the course
run that comparison at its own scale: a small dense student (moe_lab.core.config.student_config), the
GRPO-improved course model as its teacher, the course's 3-digit additions as the verifiable task.
Every method starts from the same pre-trained student and gets the same budget:

    grpo              GRPO on the student: notebook 08's trainer and preset (moe_lab.training.grpo.GRPOTrainer)
    distill           SFT on the teacher's completions of training problems, sampled and filtered by
                      the verifier (R1's rejection sampling; see `teacher_samples`)
    expert_iteration  SFT on the student's own samples that the verifier accepts (GRPO's rollouts,
                      only the right answers kept, no advantages, no KL)
    distill_grpo      distill for the first half of the budget, GRPO for the rest (R1's own recipe)

The budget: equal wall-clock seconds and equal problems. Each run of a seed draws the same pool of
`Budget.problems` training problems (a subset of the teacher's cached problems, fixed by the seed);
every method may use only that pool, as often as it likes. Each method trains until its clock,
which counts its own steps (sampling, teacher look-ups, SFT and GRPO updates) and not the held-out
evaluations, passes `Budget.seconds`; the step that crosses it finishes, so a run ends at most one
step late (the record keeps the exact seconds). Teacher samples are made once, before any run, and
cached (`data/records/distillation_teacher_cpu.json`): like R1's distillation data, they are a cost
paid once for every student, outside the student's budget.

    python -m moe_lab distill student          # pre-train the student, data/checkpoints/student_cpu.safetensors
    python -m moe_lab distill teacher          # GRPO-improve the shipped model, cache its samples
    python -m moe_lab distill compare --seeds 0-4 --seconds 40 --evals 5 --problems 3000 --lock LOCKFILE \\
        --out data/records/distillation_cpu.json   # every method for every seed, each seed in its own process

Where this simplifies: the answers are a few digits, not reasoning traces, so a verified teacher
completion says no more than the answer key (the notebook discusses what that means); the student's
pre-training is one run (the seeds vary the pool, the sampling and the order, not the student).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from moe_lab.core import machine, paths
from moe_lab.core.arguments import int_list_arg as _int_list_arg, positive_int
from moe_lab.core.config import preset, student_config, student_train_config
from moe_lab.core.files import atomic_write_text, check_output_path, write_record
from moe_lab.core.runtime import seed_everything
from moe_lab.data import batch_fn, course_mixture, course_task
from moe_lab.data.tasks import ArithmeticTask, Problem
from moe_lab.data.tokenizer import TOKENIZER
from moe_lab.model import Transformer
from moe_lab.training import grpo
from moe_lab.training.checkpoint import check_save_path, load_checkpoint, save_checkpoint, shipped_checkpoint
from moe_lab.training.evaluation import exact_match, generate_completions, solve
from moe_lab.training.grpo import GRPOTrainer, grpo_preset, sample_rollouts
from moe_lab.training.loop import train
from moe_lab.training.recipe import SNAPSHOT_TARGET, AccuracySnapshot
from moe_lab.training.sft import SFTConfig, SFTLearner, verified_dataset

METHODS = ("grpo", "distill", "expert_iteration", "distill_grpo")
STUDENT_CHECKPOINT = "student_cpu"  # data/checkpoints/student_cpu.safetensors
TEACHER_CACHE = "distillation_teacher_cpu.json"  # in data/records/
RECORD = "distillation_cpu.json"  # in data/records/
EVAL_SEED = 1234  # the held-out problems every notebook evaluates on (moe_lab.training.evaluation.exact_match)


# --------------------------------------------------------------------------------------------------
# The budget and the SFT recipe
# --------------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """What every method gets: the same seconds of training and the same pool of problems."""

    seconds: float = 40.0  # training seconds per run (held-out evaluations are not counted)
    problems: int = 3000  # distinct training problems in the pool every method draws from
    evals: int = 5  # held-out evaluations at evenly spaced seconds (plus one before training)
    eval_problems: int = 500  # held-out problems per evaluation (greedy exact match)

    def __post_init__(self):
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"Budget.seconds={self.seconds!r}: expected a finite number of seconds > 0")
        for name in ("problems", "evals", "eval_problems"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Budget.{name}={v!r}: expected an integer >= 1")


# --------------------------------------------------------------------------------------------------
# 2. Teacher samples (cached) and the pool of a seed
# --------------------------------------------------------------------------------------------------
def teacher_samples(teacher, task: ArithmeticTask, problems: Sequence[Problem], k: int = 4, temperature: float = 0.7,
                    seed: int = 0) -> list[list[str]]:
    """k completions of every problem sampled from the teacher at `temperature` (GRPO's rollout temperature).

    Sampled and filtered (verified_dataset), not greedy: R1 built its distillation data by rejection
    sampling, and here it keeps a problem the teacher's greedy answer gets wrong but a sample gets
    right, and drops the teacher's wrong answers rather than teaching them.
    """
    g = torch.Generator(device=next(teacher.parameters()).device).manual_seed(seed)
    rows = generate_completions(teacher, problems, k, temperature, generator=g, max_new_tokens=task.max_answer_len + 2)
    texts = [TOKENIZER.decode(c, skip_special=False) for _, c in rows]
    return [texts[i * k:(i + 1) * k] for i in range(len(problems))]


def load_teacher_cache(path: Optional[Path] = None) -> Optional[dict]:
    """The cached teacher samples (data/records/distillation_teacher_cpu.json), or None where absent."""
    path = Path(path) if path else paths.data_path("records", TEACHER_CACHE)
    return json.loads(path.read_text()) if path.exists() else None


def cache_problems(cache: dict, task: ArithmeticTask) -> list[Problem]:
    return [task.make(a, b) for a, b in cache["problems"]]


def seed_pool(n_cached: int, problems: int, seed: int) -> list[int]:
    """Indices of the cached problems forming the pool of a seed (the same for every method of that seed)."""
    if problems > n_cached:
        raise ValueError(f"Budget.problems={problems}: the teacher cache holds only {n_cached} problems")
    return sorted(random.Random(10_000 + seed).sample(range(n_cached), problems))


class PoolTask:
    """The course task whose training problems come from a fixed pool (held-out ones as the task's).

    GRPOTrainer draws its prompts with task.sample(rng, "train"): this makes it draw from the pool.
    """

    def __init__(self, task: ArithmeticTask, pool: Sequence[Problem]):
        if not pool:
            raise ValueError("PoolTask: the pool is empty")
        self.task, self.pool = task, list(pool)

    def sample(self, rng: random.Random, split: str = "train") -> Problem:
        return rng.choice(self.pool) if split == "train" else self.task.sample(rng, split)

    def __getattr__(self, name):
        return getattr(self.task, name)


# --------------------------------------------------------------------------------------------------
# 3. The methods, each under the same budget
# --------------------------------------------------------------------------------------------------
def _evaluator(task: ArithmeticTask, budget: Budget) -> Callable:
    problems = task.problems(budget.eval_problems, "heldout", seed=EVAL_SEED)

    def evaluate(model) -> float:
        return sum(task.verify(c, p) for c, p in zip(solve(model, problems), problems)) / len(problems)

    return evaluate


def run_budgeted(model, step: Callable[[float], int], budget: Budget, evaluate: Callable) -> dict:
    """Call step(elapsed) until the training clock passes budget.seconds; evaluate at evenly spaced seconds.

    step returns how many problems it used (visits, repeats counted). Only step's time is counted.
    """
    marks = [budget.seconds * (i + 1) / budget.evals for i in range(budget.evals)]
    curve = {"eval_seconds": [0.0], "eval_elapsed": [0.0], "eval_accuracy": [evaluate(model)]}
    elapsed, steps, visits = 0.0, 0, 0
    while elapsed < budget.seconds:
        t0 = time.perf_counter()
        visits += step(elapsed)
        elapsed += time.perf_counter() - t0
        steps += 1
        while marks and elapsed >= marks[0]:
            acc = evaluate(model) if curve["eval_elapsed"][-1] != elapsed else curve["eval_accuracy"][-1]
            curve["eval_seconds"].append(marks.pop(0))
            curve["eval_elapsed"].append(round(elapsed, 3))
            curve["eval_accuracy"].append(acc)
    return curve | {"seconds": round(elapsed, 3), "steps": steps, "problem_visits": visits}


def grpo_config(seed: int):
    """Notebook 08's cpu preset (its learning rate, groups and KL), run for as many steps as the budget allows."""
    return replace(grpo_preset("cpu"), steps=10**9, seed=seed)


def run_grpo(student, task, pool, budget: Budget, seed: int, evaluate: Callable) -> dict:
    """Method 1: GRPO on the student, prompts drawn from the pool."""
    trainer = GRPOTrainer(student, PoolTask(task, pool), grpo_config(seed))

    def step(elapsed):
        trainer.step()
        return trainer.cfg.prompts_per_step

    return run_budgeted(student, step, budget, evaluate) | {"updates": trainer.updates}


def _epochs(data: list, batch_size: int, rng: random.Random):
    """Batches of `batch_size` drawn without replacement, a new shuffle at each epoch (forever)."""
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [data[j] for j in order[i:i + batch_size]]


def run_distill(student, task, pool, budget: Budget, seed: int, evaluate: Callable, teacher_data: list,
                sft: SFTConfig = SFTConfig(), until: Optional[float] = None) -> dict:
    """Method 2: SFT on the teacher's verified completions of the pool's problems."""
    if not teacher_data:
        raise ValueError("run_distill: the teacher's verified dataset is empty")
    learner = SFTLearner(student, sft)
    batches = _epochs(teacher_data, sft.batch_size, random.Random(seed))

    def step(elapsed):
        batch = next(batches)
        learner.step(batch)
        return len(batch)

    return run_budgeted(student, step, budget, evaluate) | {"updates": learner.updates, "dataset_size": len(teacher_data)}


def run_expert_iteration(student, task, pool, budget: Budget, seed: int, evaluate: Callable,
                         sft: SFTConfig = SFTConfig()) -> dict:
    """Method 3: sample from the student (GRPO's rollouts), keep what the verifier accepts, SFT on it."""
    learner = SFTLearner(student, sft)
    rng = random.Random(seed)
    g = torch.Generator(device=next(student.parameters()).device).manual_seed(seed)
    kept_total = [0]

    def step(elapsed):
        problems = [rng.choice(pool) for _ in range(sft.prompts_per_step)]
        ro = sample_rollouts(student, problems, sft.group_size, sft.temperature, task.max_answer_len + 2, generator=g)
        samples = [ro.texts[i * sft.group_size:(i + 1) * sft.group_size] for i in range(len(problems))]
        kept = verified_dataset(task, problems, samples)
        if kept:
            learner.step(kept)
            kept_total[0] += len(kept)
        return len(problems)

    out = run_budgeted(student, step, budget, evaluate)
    return out | {"updates": learner.updates, "kept_completions": kept_total[0]}


def run_distill_grpo(student, task, pool, budget: Budget, seed: int, evaluate: Callable, teacher_data: list,
                     sft: SFTConfig = SFTConfig(), distill_fraction: float = 0.5) -> dict:
    """Method 4: distill for the first `distill_fraction` of the seconds, then GRPO from the distilled student."""
    learner = SFTLearner(student, sft)
    batches = _epochs(teacher_data, sft.batch_size, random.Random(seed))
    state = {"trainer": None, "switch": None}

    def step(elapsed):
        if elapsed < distill_fraction * budget.seconds:
            batch = next(batches)
            learner.step(batch)
            return len(batch)
        if state["trainer"] is None:  # its reference model is the distilled student
            state["trainer"], state["switch"] = GRPOTrainer(student, PoolTask(task, pool), grpo_config(seed)), elapsed
        state["trainer"].step()
        return state["trainer"].cfg.prompts_per_step

    out = run_budgeted(student, step, budget, evaluate)
    grpo_updates = state["trainer"].updates if state["trainer"] else 0
    return out | {"updates": learner.updates + grpo_updates, "sft_updates": learner.updates,
                  "switch_seconds": state["switch"], "dataset_size": len(teacher_data)}


def run_method(method: str, student, cache: dict, budget: Budget, seed: int, task: Optional[ArithmeticTask] = None,
               sft: SFTConfig = SFTConfig()) -> dict:
    """One run: a copy of `student` improved by `method` under `budget`, on the pool of `seed`. Returns its curve."""
    if method not in METHODS:
        raise ValueError(f"run_method(method={method!r}): expected one of {METHODS}")
    task = task or course_task()
    seed_everything(seed)
    problems = cache_problems(cache, task)
    idx = seed_pool(len(problems), budget.problems, seed)
    pool = [problems[i] for i in idx]
    model = copy.deepcopy(student)
    evaluate = _evaluator(task, budget)
    t0 = time.perf_counter()
    if method in ("distill", "distill_grpo"):
        data = verified_dataset(task, pool, [cache["samples"][i] for i in idx])
        fn = run_distill if method == "distill" else run_distill_grpo
        out = fn(model, task, pool, budget, seed, evaluate, data, sft)
    elif method == "grpo":
        out = run_grpo(model, task, pool, budget, seed, evaluate)
    else:
        out = run_expert_iteration(model, task, pool, budget, seed, evaluate, sft)
    return {"method": method, "seed": seed, "distinct_problems": len(pool), "threads": torch.get_num_threads(),
            "wall_seconds": round(time.perf_counter() - t0, 1)} | out  # wall: evaluations included


def methods_order(methods: Sequence[str], seed: int) -> list[str]:
    """The methods rotated by the seed, so that no method always runs first (or last) on a busy machine."""
    k = seed % len(methods)
    return list(methods[k:]) + list(methods[:k])


# --------------------------------------------------------------------------------------------------
# 4. The student, the teacher, their sizes
# --------------------------------------------------------------------------------------------------
class _Snapshotted(Exception):
    pass


def train_student(seed: int = 0, progress: bool = False, device="cpu", target: Optional[float] = None):
    """Pre-train the student with the course recipe (course mixture, AdamW, the cpu preset's schedule
    over student_train_config's steps) until its AccuracySnapshot; returns (model, figures)."""
    tc = replace(student_train_config(), seed=seed)
    seed_everything(seed)
    model = Transformer(student_config()).to(device)
    snapshot = AccuracySnapshot(model, course_task(), target=target or SNAPSHOT_TARGET)

    def on_step(step, hist):
        snapshot(step, hist)
        if snapshot.state is not None:
            raise _Snapshotted  # the student is used at its snapshot: no need to finish the schedule

    t0 = time.perf_counter()
    try:
        train(model, batch_fn(course_mixture(), tc.batch_size, tc.seq_len, seed=seed, device=device), tc,
              progress=progress, desc="student", on_step=on_step)
    except _Snapshotted:
        pass
    seconds = time.perf_counter() - t0
    snap = snapshot.model_copy()
    return snap, {"seed": seed, "schedule_steps": tc.steps, "snapshot_step": snapshot.step,
                  "snapshot_target": snapshot.target, "checks": snapshot.checks, "train_seconds": round(seconds, 1),
                  "threads": torch.get_num_threads(), "heldout_exact_match": exact_match(snap, course_task(), n=500)}


def load_student(device="cpu"):
    """The shipped student (data/checkpoints/student_cpu.safetensors), or one trained now where it is missing."""
    path = shipped_checkpoint(STUDENT_CHECKPOINT)
    if path is not None:
        return load_checkpoint(path, expected=student_config(), device=device)
    print("no shipped student checkpoint: pre-training one (about a minute on one core)")
    return train_student(device=device)


def flops_per_token(model, seq_len: int = 16) -> float:
    """Forward FLOPs per token of one sequence of seq_len tokens (a problem line), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / seq_len


def model_sizes(teacher, student) -> dict:
    """Parameters (all and active per token) and forward FLOPs per token of both, and the ratios."""
    def size(m):
        return {"params": m.n_params(), "active_params": m.n_params(active=True), "flops_per_token": flops_per_token(m),
                "config": m.cfg.to_dict()}

    t, s = size(teacher), size(student)
    return {"teacher": t, "student": s, "params_ratio": t["params"] / s["params"],
            "active_params_ratio": t["active_params"] / s["active_params"],
            "flops_per_token_ratio": t["flops_per_token"] / s["flops_per_token"]}


def build_teacher(threads: Optional[int] = None, k: int = 4, n_problems: int = 5000, progress: bool = False):
    """The teacher: the shipped course model improved by notebook 08's cpu GRPO preset; then its samples of
    n_problems training problems (k each). Returns (teacher, cache dict)."""
    task = course_task()
    teacher, figures = load_checkpoint(shipped_checkpoint("moe_cpu"), expected=preset("cpu").moe)
    cfg = grpo.grpo_preset("cpu")
    hist = grpo.GRPOTrainer(teacher, task, cfg).run(progress=progress, desc="teacher GRPO")
    problems = task.problems(n_problems, "train", seed=777)
    t1 = time.perf_counter()
    samples = teacher_samples(teacher, task, problems, k=k, temperature=cfg.temperature, seed=0)
    right = [sum(task.verify(c, p) for c in s) for p, s in zip(problems, samples)]
    cache = {"teacher": {"source": "data/checkpoints/moe_cpu.safetensors improved by grpo_preset('cpu')",
                         "grpo": cfg.to_dict(), "start_heldout_exact_match": hist.eval_accuracy[0],
                         "heldout_exact_match": hist.eval_accuracy[-1],
                         "curve": [list(x) for x in zip(hist.eval_step, hist.eval_accuracy)],
                         "grpo_seconds": round(hist.time[-1], 1), "sampling_seconds": round(time.perf_counter() - t1, 1),
                         "threads": torch.get_num_threads()},
             "sampling": {"k": k, "temperature": cfg.temperature, "problems_seed": 777, "split": "train"},
             "sample_accuracy": sum(right) / (k * len(problems)),
             "pass_at_k": sum(r > 0 for r in right) / len(problems),
             "problems": [[p.a, p.b] for p in problems], "samples": samples}
    return teacher, cache


# --------------------------------------------------------------------------------------------------
# 5. The record
# --------------------------------------------------------------------------------------------------
RUN_KEYS = ("method", "seed", "eval_seconds", "eval_accuracy", "seconds", "steps", "problem_visits",
            "distinct_problems", "updates", "threads")
RECORD_KEYS = ("command", "commit", "machine", "torch", "date", "budget", "sizes", "teacher", "student", "methods",
               "seeds", "runs", "summary")


def summarize(runs: Sequence[dict]) -> dict:
    """Per method: held-out exact match at the start and at the budget, per seed, with mean and range."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        ends = [r["eval_accuracy"][-1] for r in rs]
        out[m] = {"seeds": [r["seed"] for r in rs], "start": [r["eval_accuracy"][0] for r in rs], "final": ends,
                  "mean": statistics.mean(ends), "min": min(ends), "max": max(ends),
                  "seconds": [r["seconds"] for r in rs], "problem_visits": [r["problem_visits"] for r in rs]}
    return out


def spread_curves(record: dict) -> dict:
    """Per method, at each evaluation mark (seconds): the mean, min and max of held-out exact match over seeds."""
    out = {}
    for m in record["methods"]:
        rs = [r for r in record["runs"] if r["method"] == m]
        if not rs:
            continue
        n = min(len(r["eval_accuracy"]) for r in rs)
        cols = [[r["eval_accuracy"][i] for r in rs] for i in range(n)]
        out[m] = {"seconds": rs[0]["eval_seconds"][:n], "mean": [statistics.mean(c) for c in cols],
                  "min": [min(c) for c in cols], "max": [max(c) for c in cols], "seeds": len(rs)}
    return out


def ranking(record: dict) -> list[tuple[str, str]]:
    """Pairs (a, b) where method a ended above method b on every seed's worst case: min over seeds of a's
    final accuracy > max over seeds of b's (ranges that do not overlap). Overlapping pairs are left out."""
    s = record["summary"]
    return [(a, b) for a in s for b in s if a != b and s[a]["min"] > s[b]["max"]]


def validate_record(record: dict) -> None:
    """Raise ValueError naming what is missing or malformed in a distillation record."""
    if not isinstance(record, dict):
        raise ValueError(f"a distillation record is a JSON object; got {type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"distillation record lacks {missing}; expected the keys {RECORD_KEYS}")
    if not isinstance(record["runs"], list) or not record["runs"]:
        raise ValueError("distillation record: 'runs' must be a non-empty list")
    for i, r in enumerate(record["runs"]):
        miss = [k for k in RUN_KEYS if k not in r]
        if miss:
            raise ValueError(f"distillation record: runs[{i}] lacks {miss}")
        if r["method"] not in METHODS:
            raise ValueError(f"distillation record: runs[{i}].method={r['method']!r}: expected one of {METHODS}")
        if len(r["eval_seconds"]) != len(r["eval_accuracy"]):
            raise ValueError(f"distillation record: runs[{i}] has {len(r['eval_seconds'])} eval_seconds but "
                             f"{len(r['eval_accuracy'])} eval_accuracy")
        if not all(0 <= a <= 1 for a in r["eval_accuracy"]):
            raise ValueError(f"distillation record: runs[{i}].eval_accuracy has values outside [0, 1]")
        if r["distinct_problems"] != record["budget"]["problems"]:
            raise ValueError(f"distillation record: runs[{i}] used {r['distinct_problems']} problems, the budget "
                             f"{record['budget']['problems']}")
        if r["seconds"] < record["budget"]["seconds"]:
            raise ValueError(f"distillation record: runs[{i}] trained {r['seconds']} s, less than the budget's "
                             f"{record['budget']['seconds']} s")


def _write_compact(obj, path) -> None:
    """Write JSON without indentation, atomically (moe_lab.core.files)."""
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")) + "\n")
    print(f"wrote {path}")


def load_record(path: Optional[Path] = None) -> Optional[dict]:
    """The recorded comparison (data/records/distillation_cpu.json), or None where it is not installed."""
    path = Path(path) if path else paths.data_path("records", RECORD)
    return json.loads(path.read_text()) if path.exists() else None


def machine_info() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def check_out_path(path) -> Path:
    """The JSON file a record will be written to, checked before any work: a ValueError naming the problem."""
    path = check_output_path(path)  # not a folder, not under a file (moe_lab.core.files)
    check_output_path(path, suffix=".json")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    # a missing write permission counts even for a user (root) whom the system would let write anyway
    if parent is not None and (not os.access(parent, os.W_OK | os.X_OK) or not parent.stat().st_mode & 0o222):
        raise ValueError(f"{path}: the folder {parent} is not writable")
    if path.exists() and (not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222):
        raise ValueError(f"{path}: the file is read-only")
    return path


# --------------------------------------------------------------------------------------------------
# 6. The command line
# --------------------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of seconds > 0")
    return v


def _methods(text: str) -> list[str]:
    ms = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in ms if m not in METHODS]
    if bad or not ms:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(METHODS)}")
    return list(dict.fromkeys(ms))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m moe_lab distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="compare", choices=["compare", "student", "teacher", "one-seed"],
                    help="compare (default): every method and seed; student: pre-train the student; teacher: GRPO "
                         "the shipped model and cache its samples; one-seed: the runs of one seed (used by compare)")
    ap.add_argument("--seeds", type=_int_list_arg, default=[0, 1, 2, 3, 4], help="e.g. 0-4 or 0,3")
    ap.add_argument("--methods", type=_methods, default=list(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--seconds", type=_positive_float, default=Budget.seconds, help="training seconds per run")
    ap.add_argument("--problems", type=positive_int, default=Budget.problems, help="the pool of training problems per seed")
    ap.add_argument("--evals", type=positive_int, default=Budget.evals, help="held-out evaluations per run")
    ap.add_argument("--eval-problems", type=positive_int, default=Budget.eval_problems)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads of every run (OMP_NUM_THREADS too)")
    ap.add_argument("--lock", default=None, help="run each seed under `flock LOCK` (a shared machine)")
    ap.add_argument("--out", default=None, help=f"the JSON record (compare: default data/records/{RECORD}; "
                    f"student: data/checkpoints/{STUDENT_CHECKPOINT}.safetensors; teacher: data/records/{TEACHER_CACHE})")
    ap.add_argument("--teacher-cache", default=None, help=f"the teacher's samples (default data/records/{TEACHER_CACHE})")
    args = ap.parse_args(argv)
    default_out = {"compare": f"data/records/{RECORD}", "student": f"data/checkpoints/{STUDENT_CHECKPOINT}.safetensors",
                   "teacher": f"data/records/{TEACHER_CACHE}", "one-seed": None}[args.what]
    args.out = args.out or default_out
    if args.out is not None:
        try:
            if args.what == "student":
                check_save_path(args.out)
            else:
                check_out_path(args.out)
        except ValueError as exc:
            ap.error(f"argument --out: {exc}")
    if args.what == "one-seed" and (len(args.seeds) != 1 or args.out is None):
        ap.error(f"argument --seeds: one-seed runs exactly one seed and needs --out; got seeds {args.seeds}, --out {args.out}")
    if args.what in ("compare", "one-seed"):
        try:
            Budget(args.seconds, args.problems, args.evals, args.eval_problems)
        except ValueError as exc:
            ap.error(str(exc))
    return args


def _one_seed(args) -> list[dict]:
    cache = load_teacher_cache(args.teacher_cache)
    if cache is None:
        raise SystemExit(f"no teacher cache: run `python -m moe_lab distill teacher` first")
    student, _ = load_student()
    budget = Budget(args.seconds, args.problems, args.evals, args.eval_problems)
    seed = args.seeds[0]
    runs = []
    for i, method in enumerate(methods_order(args.methods, seed)):
        r = run_method(method, student, cache, budget, seed, course_task()) | {"order": i}
        print(f"seed {seed} {method:>16}: {r['eval_accuracy'][0]:.1%} -> {r['eval_accuracy'][-1]:.1%} in "
              f"{r['seconds']:.1f} s ({r['updates']} updates, {r['problem_visits']} problem visits)", flush=True)
        runs.append(r)
    return runs


def compare(args, command: str) -> dict:
    """Every seed in its own process (under `flock` when args.lock), the record rewritten after each seed."""
    cache = load_teacher_cache(args.teacher_cache)
    if cache is None:
        raise SystemExit(f"no teacher cache: run `python -m moe_lab distill teacher` first")
    student, student_figures = load_student()
    teacher, _ = load_checkpoint(shipped_checkpoint("moe_cpu"), expected=preset("cpu").moe)  # same shapes as the teacher
    budget = Budget(args.seconds, args.problems, args.evals, args.eval_problems)
    record = {"command": command, "commit": machine.git_commit(), "machine": machine_info(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": args.threads,
              "budget": asdict(budget), "sft": asdict(SFTConfig()), "grpo": grpo_config(0).to_dict() | {"steps": None, "seed": None},
              "enforcement": ("equal seconds: each run trains until its own clock (its steps, not the held-out "
                              "evaluations) passes budget.seconds, finishing the step that crosses it; equal problems: "
                              "every method of a seed draws from the same pool of budget.problems training problems"),
              "sizes": model_sizes(teacher, student),
              "teacher": {k: v for k, v in cache["teacher"].items() if k != "curve"} | {
                  "sample_accuracy": cache["sample_accuracy"], "pass_at_k": cache["pass_at_k"], "sampling": cache["sampling"]},
              "student": {k: v for k, v in student_figures.items() if k != "checks"},
              "methods": list(args.methods), "seeds": list(args.seeds), "runs": [], "complete": False}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "runs.json"
            cmd = [sys.executable, "-m", "moe_lab", "distill", "one-seed", "--seeds", str(seed),
                   "--methods", ",".join(args.methods), "--seconds", str(args.seconds), "--problems", str(args.problems),
                   "--evals", str(args.evals), "--eval-problems", str(args.eval_problems),
                   "--threads", str(args.threads), "--out", str(out)]
            if args.teacher_cache:
                cmd += ["--teacher-cache", args.teacher_cache]
            if args.lock:
                cmd = ["flock", args.lock] + cmd
            subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), check=True)
            record["runs"] += json.loads(out.read_text())
        record["summary"] = summarize(record["runs"])
        record["complete"] = seed == args.seeds[-1]
        write_record(record, args.out, quiet=True)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m moe_lab distill", *(sys.argv[1:] if argv is None else argv)])
    if args.what == "student":
        student, figures = train_student(seed=args.seeds[0], progress=True)
        figures |= {"command": command, "torch": torch.__version__, "machine": machine_info(),
                    "date": time.strftime("%Y-%m-%d", time.gmtime())}
        save_checkpoint(args.out, student, figures)
        print(json.dumps(figures, indent=1))
        return 0
    if args.what == "teacher":
        _, cache = build_teacher(progress=True)
        cache["teacher"] |= {"command": command, "torch": torch.__version__, "machine": machine_info(),
                             "date": time.strftime("%Y-%m-%d", time.gmtime())}
        _write_compact(cache, args.out)  # 5000 problems x 4 samples: one line, not one line per sample
        print(f"teacher: {cache['teacher']['start_heldout_exact_match']:.1%} -> {cache['teacher']['heldout_exact_match']:.1%} "
              f"held-out; samples right {cache['sample_accuracy']:.1%}, pass@{cache['sampling']['k']} {cache['pass_at_k']:.1%}")
        return 0
    if args.what == "one-seed":
        write_record(_one_seed(args), args.out, quiet=True)
        return 0
    record = compare(args, command)
    for m, s in record["summary"].items():
        print(f"{m:>16}: {s['mean']:.1%} mean at {args.seconds:g} s ({s['min']:.1%}-{s['max']:.1%} over seeds {s['seeds']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
