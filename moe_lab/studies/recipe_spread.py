"""How the course's training recipe spreads over seeds and thread counts (README, "Figures measured
on this 2-core CPU", the recipe's table): the `train` command run once per (seed, thread count), each in its own
process, every run's figures written to one JSON record.

    python -m moe_lab recipe-spread --preset cpu --seeds 0-4 --threads 1,2 --lock /tmp/moe-lab-cpu.lock
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from moe_lab.core import paths
from moe_lab.core.arguments import int_list_arg
from moe_lab.core.files import check_output_path, write_record
from moe_lab.core.runtime import MODES


def recipe_spread(preset_name: str, seeds: list[int], threads: list[int], out: str, lock: Optional[str] = None) -> list[dict]:
    """Run the course's command once per (seed, thread count), each in its own process with
    OMP_NUM_THREADS and torch.set_num_threads set (and under `flock lock` when given, so that runs
    on a shared machine take turns); write every run's figures to the JSON file `out`."""
    rows = []
    for t in threads:
        for s in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                fig_path = Path(tmp) / "figures.json"
                cmd = [sys.executable, "-m", "moe_lab", "train", "--preset", preset_name, "--seed", str(s),
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
            write_record({"preset": preset_name, "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__, "runs": rows}, out, quiet=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m moe_lab recipe-spread",
                                 description="Run the course's training command over seeds x thread counts.")
    ap.add_argument("--preset", default="cpu", choices=MODES)
    ap.add_argument("--seeds", type=int_list_arg, default=[0, 1, 2, 3, 4], help="seeds, e.g. 0-4 or 0,3")
    ap.add_argument("--threads", type=int_list_arg, default=[1, 2], help="thread counts, e.g. 1,2")
    ap.add_argument("--out", default=str(paths.runs_path("recipe_spread.json")), help="the JSON record")
    ap.add_argument("--lock", default=None, help="run each case under `flock LOCK`")
    args = ap.parse_args(argv)
    if min(args.threads) < 1:
        ap.error(f"argument --threads: thread counts must be >= 1; got {args.threads}")
    try:
        check_output_path(args.out)
    except ValueError as exc:
        ap.error(f"argument --out: {exc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe_spread(args.preset, args.seeds, args.threads, args.out, args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
