"""How notebook 08's RL figures spread across seeds: GRPO and REINFORCE from the shipped checkpoint.

Notebook 08 asserts a gain that must exceed the spread across seeds, and compares GRPO with
REINFORCE with a batch-mean baseline. One run of each decides nothing (the difference between two
runs can be smaller than the difference between two seeds of one), so this command runs each
setting for several seeds and writes every final accuracy, their mean and their range:

    python -m moe_lab rl-spread --mode ci --seeds 0-4                          # the ci preset (100 steps)
    python -m moe_lab rl-spread --mode cpu --steps 200 --seeds 0-4 --advantage group,batch_mean

`--advantage batch_mean` is notebook 08's REINFORCE (section 11): no group baseline, no std, no KL
(beta = 0). Each run starts from the shipped checkpoint (data/checkpoints/moe_cpu.safetensors) and evaluates greedy exact match on
the notebook's 500 held-out problems.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from moe_lab.core import paths
from moe_lab.core.arguments import check_outputs, choice_list, positive_int, seed_list_arg
from moe_lab.core.config import preset
from moe_lab.core.files import write_record
from moe_lab.data import course_task
from moe_lab.training import grpo
from moe_lab.training.checkpoint import load_checkpoint, shipped_checkpoint

CHECKPOINT = "moe_cpu"  # the shipped checkpoint every run starts from (data/checkpoints/moe_cpu.safetensors)


def start_checkpoint() -> Path:
    """The shipped checkpoint the runs start from; a FileNotFoundError naming it where there is none."""
    path = shipped_checkpoint(CHECKPOINT)
    if path is None:
        raise FileNotFoundError(f"no shipped checkpoint {paths.data_path('checkpoints', CHECKPOINT + '.safetensors')}: "
                                f"make it with `python -m moe_lab train --preset cpu --out "
                                f"data/checkpoints/{CHECKPOINT}.safetensors` (or use a clone that has it)")
    return path


def run_one(mode: str, seed: int, advantage: str, steps: Optional[int] = None) -> dict:
    import torch

    model, figures = load_checkpoint(start_checkpoint(), expected=preset("cpu").moe)
    base = grpo.grpo_preset(mode)
    cfg = replace(base, seed=seed, advantage=advantage, steps=base.steps if steps is None else steps)
    if advantage == "batch_mean":
        cfg = replace(cfg, beta=0.0)  # REINFORCE as notebook 08 runs it: no KL either
    t0 = time.perf_counter()
    hist = grpo.GRPOTrainer(model, course_task(), cfg).run(progress=False)
    return {"mode": mode, "seed": seed, "advantage": advantage, "steps": cfg.steps, "start": hist.eval_accuracy[0],
            "end": hist.eval_accuracy[-1], "curve": list(zip(hist.eval_step, hist.eval_accuracy)),
            "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}


def summary(rows: list[dict]) -> dict:
    """Per advantage: the final accuracies, their mean and their range (max - min)."""
    out = {}
    for adv in sorted({r["advantage"] for r in rows}):
        ends = [r["end"] for r in rows if r["advantage"] == adv]
        out[adv] = {"ends": ends, "mean": statistics.mean(ends), "min": min(ends), "max": max(ends),
                    "range": max(ends) - min(ends)}
    return out


def main(argv=None) -> int:
    """Every argument, the output path and the start checkpoint are checked before any run (a bad one
    exits with status 2 naming it); the record is rewritten after every run, so a stopped run keeps
    what it measured."""
    ap = argparse.ArgumentParser(prog="python -m moe_lab rl-spread", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="ci", choices=["ci", "cpu", "gpu"], help="which grpo_preset")
    ap.add_argument("--steps", type=positive_int, default=None, help="override the preset's steps (>= 1)")
    ap.add_argument("--seeds", type=seed_list_arg, default=[0, 1, 2, 3, 4], help="seeds, e.g. 0-4 or 0,3")
    ap.add_argument("--advantage", type=choice_list(*grpo.ADVANTAGES), default=["group"],
                    help=f"comma-separated from {grpo.ADVANTAGES}")
    ap.add_argument("--out", default=None, help="JSON file (default runs/rl_spread_<mode>_<steps>.json)")
    args = ap.parse_args(argv)
    steps = grpo.grpo_preset(args.mode).steps if args.steps is None else args.steps
    out = Path(args.out) if args.out else paths.runs_path(f"rl_spread_{args.mode}_{steps}.json")
    check_outputs(ap, {"--out": out})
    try:
        start_checkpoint()
    except FileNotFoundError as exc:
        ap.exit(1, f"{ap.prog}: error: {exc}\n")
    rows, total = [], len(args.advantage) * len(args.seeds)
    for adv in args.advantage:
        for seed in args.seeds:
            row = run_one(args.mode, seed, adv, steps)
            rows.append(row)
            print(f"{adv:>10} seed {seed}: {row['start']:.1%} -> {row['end']:.1%} in {row['seconds']:.0f} s", flush=True)
            if len(rows) < total:  # a run stopped from outside keeps the runs it finished
                write_record({"runs": rows, "summary": summary(rows), "partial": f"{len(rows)} of {total} runs done"},
                             out, quiet=True)
    result = {"runs": rows, "summary": summary(rows)}
    for adv, s in result["summary"].items():
        print(f"{adv:>10}: mean {s['mean']:.1%}, {s['min']:.1%}-{s['max']:.1%} (range {100 * s['range']:.1f} points)")
    write_record(result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
