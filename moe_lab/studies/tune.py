"""`python -m moe_lab tune`: write the kernel configuration table of this GPU, ahead of time.

For each layer shape of the course and a grid of token counts (a *bucket*), the tuner times every
configuration of config_table.space() for each kernel of the expert path (moe_gemm, moe_backward)
on real inputs, and writes

    data/kernel_tables/<device>.json    the table the kernels read at run time (config_table)
    data/kernel_tables/<device>-timings.json   every timing, for notebook 07's pictures (--timings)

A bucket records, for each row block it tried (the layout's block_m, which all row-block kernels
share), each kernel's winning configuration with its time and the runner-up, and which block_m was
fastest for inference (up + down) and for training (all six kernels). The table carries the device,
driver, torch, triton, date and command.

    python -m moe_lab tune                        # the course's shapes and token grid (GPU, a few minutes)
    python -m moe_lab tune --shapes fine --tokens 2048,8192 --budget-s 60
    python -m moe_lab tune --device cpu --space quick --shapes tiny --tokens 64   # the sweep's logic, on the
                                                                                 # CPU interpreter (tests)

Compiling comes first: every (kernel, configuration) is compiled once, in parallel worker processes
(`--workers`), into Triton's on-disk cache, so the timing loop reuses them. Timing: CUDA events around
repeated launches after a warm-up (median of 3 to 25, about 5 ms of them), on inputs that fill the
chip; a configuration already 3x slower than the best on its first run is not repeated. The tuner
shows a progress bar with the case being measured, rewrites the table and the timings after every
bucket (a run cut short leaves a valid table of the buckets it finished), and starts no new bucket
after `--budget-s`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from moe_lab.core import machine, paths
from moe_lab.core.arguments import check_outputs
from moe_lab.core.files import write_record
from moe_lab.core.runtime import choose_triton_interpreter, default_device, pick_dtype
from moe_lab.studies.bench import SHAPES

SHAPE_TOKENS = {  # bucket grid per shape: rows per expert from about 8 to 4096 (the lookup takes the nearest)
    "fine": (128, 2048, 8192, 32768),
    "teaching": (128, 8192),
    "mixtral": (512, 4096, 16384),
    "tiny": (64, 1024),
}
DEFAULT_SHAPES = ("fine", "teaching", "mixtral")


def _csv(text: str, conv=str) -> list:
    return [conv(v.strip()) for v in text.split(",") if v.strip()]


def knob_effect(timings: list, knob: str, kernels=None) -> dict:
    """What one knob of the configuration buys, from a tuner's timings (the rows of --timings):
    {kernel: {value: geometric mean over buckets of (best ms with knob == value) / (best ms overall)}}.
    knob: a KernelConfig field ("BLOCK_N", "GROUP_M", "num_stages", ...) or "block_m" (the layout's
    row block). A ratio of 1 means that value holds the bucket's best configuration. Only kernels the
    knob applies to are listed (the weight-gradient kernels have no GROUP_M nor layout block)."""
    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first

    if knob != "block_m" and knob not in CT.KernelConfig.__dataclass_fields__:
        raise ValueError(f"knob={knob!r}: expected 'block_m' or a KernelConfig field {tuple(CT.KernelConfig.__dataclass_fields__)}")
    if kernels is None:
        kernels = CT.ROW_KERNELS if knob in ("block_m", "GROUP_M") else CT.KERNELS
    value_of = (lambda r: r["block_m"]) if knob == "block_m" else (lambda r: r["config"][knob])
    out = {}
    for kernel in kernels:
        rows = [r for r in timings if r["kernel"] == kernel and r.get("ms") is not None]
        ratios: dict = {}
        for bucket in {(r["shape"], r["tokens"]) for r in rows}:
            mine = [r for r in rows if (r["shape"], r["tokens"]) == bucket]
            best = min(r["ms"] for r in mine)
            for v in {value_of(r) for r in mine}:
                ratios.setdefault(v, []).append(min(r["ms"] for r in mine if value_of(r) == v) / best)
        if ratios:
            out[kernel] = {v: math.exp(sum(math.log(x) for x in xs) / len(xs)) for v, xs in sorted(ratios.items())}
    return out


def parse_args(argv: Optional[list] = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m moe_lab tune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma list from {tuple(SHAPE_TOKENS)} (default {','.join(DEFAULT_SHAPES)})")
    ap.add_argument("--tokens", help="comma list of token counts (default: each shape's grid, SHAPE_TOKENS)")
    ap.add_argument("--space", default="full", choices=("full", "quick"), help="configurations per kernel")
    ap.add_argument("--out", help="table to write (default data/kernel_tables/<device>.json)")
    ap.add_argument("--timings", help="every timing as JSON (default data/kernel_tables/<device>-timings.json)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new bucket after this many seconds")
    ap.add_argument("--workers", type=int, help="processes that compile ahead (default: CPU cores - 2, at most 14; "
                    "0: compile while timing)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available; cpu runs the interpreter")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap, ap.parse_args(argv)


@dataclass
class Plan:
    """What a tuning run will do, decided (and every argument checked) before any work."""

    device: torch.device
    cases: list  # (shape, tokens) buckets in the order they are tuned
    out: Path  # the table
    timings: Path  # every timing
    workers: int  # processes that compile ahead (0: compile while timing)


def plan(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """Every argument checked (an argparse error, exit 2, naming it), the output files included."""
    shapes = _csv(args.shapes) if args.shapes else list(DEFAULT_SHAPES)
    bad = [s for s in shapes if s not in SHAPE_TOKENS]
    if bad or not shapes:
        ap.error(f"--shapes {args.shapes!r}: expected a comma-separated list from {tuple(SHAPE_TOKENS)}")
    try:
        tokens = _csv(args.tokens, int) if args.tokens else None
    except ValueError:
        ap.error(f"--tokens {args.tokens!r}: expected a comma-separated list of positive integers")
    if tokens is not None and (not tokens or any(t < 1 for t in tokens)):
        ap.error(f"--tokens {args.tokens!r}: token counts must be positive")
    if not args.budget_s > 0:
        ap.error(f"--budget-s {args.budget_s}: expected a positive number of seconds")
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers {args.workers}: expected 0 or more")
    dev_type = args.device or default_device()
    if dev_type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (this torch is a CPU build or no GPU is visible)")
    if dev_type == "cpu" and (args.space != "quick" or any(s not in ("tiny",) for s in shapes)):
        ap.error("on the CPU the kernels run through Triton's interpreter: only --space quick --shapes tiny "
                 "(a check of the sweep's logic; its times say nothing about a GPU)")
    device = torch.device(dev_type)
    slug = machine.slugify(machine.device_name(device)) if dev_type == "cuda" else "cpu-interpreter"
    out = Path(args.out) if args.out else (paths.data_path("kernel_tables", f"{slug}.json") if dev_type == "cuda"
                                           else paths.runs_path("tune", f"{slug}.json"))
    timings = Path(args.timings) if args.timings else (paths.data_path("kernel_tables", f"{slug}-timings.json")
                                                       if dev_type == "cuda" else paths.runs_path("tune", f"{slug}-timings.json"))
    check_outputs(ap, {"--out": out, "--timings": timings})  # before any work: a bad path costs no run
    if tokens is None:  # interleaved: every shape gets its first buckets before the budget can run out
        cases = [(s, SHAPE_TOKENS[s][i]) for i in range(max(len(SHAPE_TOKENS[s]) for s in shapes)) for s in shapes
                 if i < len(SHAPE_TOKENS[s])]
    else:
        cases = [(s, t) for s in shapes for t in tokens]
    workers = args.workers if args.workers is not None else (max(1, min(14, (os.cpu_count() or 2) - 2))
                                                             if dev_type == "cuda" else 0)
    return Plan(device, cases, out, timings, workers)


def compile_ahead(sweep, p: Plan, dtype: torch.dtype, space: str, progress: bool) -> str:
    """Compile every (kernel, configuration) of the plan's buckets in worker processes; says what it did."""
    jobs, dims = [], {}
    for s, t in p.cases:
        sh = SHAPES[s]
        dims[s] = (sh.d_model, sh.d_expert, sh.n_experts, sh.top_k)
        for bm in sweep.block_m_candidates(sweep.CT.rows_per_expert(t, sh.top_k, sh.n_experts), sweep.INTERPRETED):
            for k in sweep.CT.KERNELS:
                for cfg in sweep.CT.space(k, bm if k in sweep.CT.ROW_KERNELS else None, size=space):
                    jobs.append((k, cfg.meta, s))
    # one shape per specialisation suffices when all widths are multiples of 16 (the compiler sees the same)
    unique, seen = [], set()
    for k, cfg, s in jobs:
        key = (k, tuple(sorted(cfg.items())), all(v % 16 == 0 for v in dims[s][:2]) or s)
        if key not in seen:
            seen.add(key)
            unique.append((k, cfg, s))
    t0 = time.perf_counter()
    errors = sweep.precompile(unique, dims, dtype, p.workers, progress, p.device.type)
    msg = f"compiled {len(unique)} kernel configurations in {time.perf_counter() - t0:.0f} s with {p.workers} workers"
    print(msg + (f"; {len(errors)} failed, e.g. {errors[0]}" if errors else ""), flush=True)
    return msg


def run_plan(sweep, p: Plan, dtype: torch.dtype, space: str, budget_s: float, progress: bool, command: str) -> int:
    """Tune bucket after bucket until the budget, rewriting the table and the timings after each (a run
    cut short, by a time limit or a lost machine, keeps what it measured); the number of buckets done."""
    t_start = time.perf_counter()
    notes = [compile_ahead(sweep, p, dtype, space, progress)] if p.workers else []
    buckets, timings = [], []
    bar = tqdm(p.cases, desc="tune", disable=not progress, file=sys.stderr)
    for s, t in bar:
        if time.perf_counter() - t_start > budget_s:
            notes.append(f"time budget of {budget_s:.0f} s reached before {s} T={t}")
            continue
        t_bucket = time.perf_counter()
        bucket, rows = sweep.tune_bucket(s, t, p.device, dtype, space, bar)
        buckets.append(bucket)
        timings += rows
        bm = bucket["block_m"]
        best = bucket["kernels"][str(bm["forward"])]
        print(f"{s:9s} T={t:6d} rows/expert {bucket['rows_per_expert']:8.1f} block_m fwd {bm['forward']:3d} "
              f"train {bm['training']:3d} | up {best['up']['ms']:.4f} ms down {best['down']['ms']:.4f} ms "
              f"({time.perf_counter() - t_bucket:.0f} s)", flush=True)
        table = sweep.build_table(buckets, p.device, command, notes + [f"{len(buckets)} buckets in "
                                                                       f"{time.perf_counter() - t_start:.0f} s"])
        write_record(table, p.out, quiet=True)
        write_record(dict(device=table["device"], date=table["date"], command=command, timings=timings), p.timings,
                     quiet=True)
        if p.device.type == "cuda":
            torch.cuda.empty_cache()
    if buckets:
        print(f"wrote {p.out} ({len(buckets)} buckets) and {p.timings} ({len(timings)} timings) in "
              f"{time.perf_counter() - t_start:.0f} s")
    return len(buckets)


def main(argv: Optional[list] = None) -> int:
    ap, args = parse_args(argv)
    p = plan(ap, args)
    choose_triton_interpreter(p.device)  # --device cpu on a GPU machine: the interpreter, before the kernels load
    from moe_lab.studies import kernel_sweep  # imports the Triton kernels: only now, after the choice above

    dtype = torch.float32 if kernel_sweep.INTERPRETED else pick_dtype(p.device)
    print(f"tuning on {machine.device_name(p.device)} ({str(dtype).replace('torch.', '')}, space {args.space}): "
          f"{len(p.cases)} buckets, budget {args.budget_s:.0f} s -> {p.out}", flush=True)
    command = " ".join(["python -m moe_lab tune", *(sys.argv[1:] if argv is None else argv)])
    if not run_plan(kernel_sweep, p, dtype, args.space, args.budget_s, not args.no_progress, command):
        print("no bucket finished within the budget: nothing written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
