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
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from moe_lab.core import paths
from moe_lab.core.arguments import int_list as _int_list
from moe_lab.core.config import preset
from moe_lab.data import course_task
from moe_lab.training import grpo
from moe_lab.training.checkpoint import load_checkpoint, shipped_checkpoint


def run_one(mode: str, seed: int, advantage: str, steps: int | None = None) -> dict:
    import torch

    model, figures = load_checkpoint(shipped_checkpoint("moe_cpu"), expected=preset("cpu").moe)
    cfg = replace(grpo.grpo_preset(mode), seed=seed, advantage=advantage, steps=steps or grpo.grpo_preset(mode).steps)
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="ci", choices=["ci", "cpu", "gpu"], help="which grpo_preset")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--advantage", default="group", help="comma-separated: group, group_mean, batch_mean")
    ap.add_argument("--out", default=None, help="JSON file (default runs/rl_spread_<mode>_<steps>.json)")
    args = ap.parse_args(argv)
    rows = []
    for adv in args.advantage.split(","):
        for seed in _int_list(args.seeds):
            row = run_one(args.mode, seed, adv, args.steps)
            rows.append(row)
            print(f"{adv:>10} seed {seed}: {row['start']:.1%} -> {row['end']:.1%} in {row['seconds']:.0f} s", flush=True)
    result = {"runs": rows, "summary": summary(rows)}
    for adv, s in result["summary"].items():
        print(f"{adv:>10}: mean {s['mean']:.1%}, {s['min']:.1%}-{s['max']:.1%} (range {100 * s['range']:.1f} points)")
    out = Path(args.out) if args.out else paths.runs_path(f"rl_spread_{args.mode}_{rows[0]['steps']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
