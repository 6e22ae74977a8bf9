"""`python -m moe_lab tune`: write the kernel configuration table of this GPU, ahead of time.

For each layer shape of the course and a grid of token counts (a *bucket*), the tuner times every
configuration of config_table.space() for each kernel of the expert path (moe_gemm, moe_backward)
on real inputs, and writes

    moe_lab/kernels/configs/<device>.json    the table the kernels read at run time (config_table)
    runs/tune/<device>-timings.json          every timing, for notebook 07's pictures (--timings)

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
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from moe_lab.core import machine
from moe_lab.studies.bench import make_inputs
from moe_lab.studies.bench import LayerShape
from moe_lab.studies.bench import SHAPES
from moe_lab.studies import profiling as P
from moe_lab.core.runtime import pick_dtype
from moe_lab.core.arguments import check_outputs
from moe_lab.core.files import write_record
from moe_lab.core.runtime import choose_triton_interpreter
from moe_lab.core.runtime import default_device
from moe_lab.core import paths

SHAPE_TOKENS = {  # bucket grid per shape: rows per expert from about 8 to 4096 (the lookup takes the nearest)
    "fine": (128, 2048, 8192, 32768),
    "teaching": (128, 8192),
    "mixtral": (512, 4096, 16384),
    "tiny": (64, 1024),
}
DEFAULT_SHAPES = ("fine", "teaching", "mixtral")


def _csv(text: str, conv=str) -> list:
    return [conv(v.strip()) for v in text.split(",") if v.strip()]


def block_m_candidates(rows: float, interpreted: bool) -> list[int]:
    """The layout's row blocks worth timing for `rows` rows per expert: the power of two at or above it
    (within 16..128) and its neighbour, so the table can say whether less padding or bigger tiles win."""
    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first

    largest = 32 if interpreted else 128
    c = CT.block_m_for(rows, largest=largest)
    other = c // 2 if c > 16 else min(largest, c * 2)
    return sorted({c, other})


# ----------------------------------------------------------------------------------------------
# One bucket's inputs and the kernels' launches
# ----------------------------------------------------------------------------------------------
def make_problem(shape, tokens: int, device, dtype, seed: int = 0) -> dict:
    """Random inputs of one bucket (moe_lab.studies.bench's routing and scales) plus a gradient dy."""
    inp = make_inputs(shape, tokens, device, dtype, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    inp["dy"] = torch.randn(tokens, shape.d_model, generator=g, device=device, dtype=dtype)
    return inp


def forward_buffers(inp: dict, align) -> tuple:
    """h, a1, a3 of a training forward over `align`: what the down and backward kernels read."""
    from moe_lab.kernels.moe_gemm import moe_up  # Triton is optional; its interpreter is chosen first

    return moe_up(inp["x"], inp["w1"], inp["w3"], align, save_preact=True, config=_fixed_up(align))


def kernel_runner(kernel: str, inp: dict, align, cfg, buffers: Optional[tuple] = None):
    """A function that launches `kernel` once with `cfg` over `align`; `buffers` = forward_buffers(...)
    (made here when not given)."""
    from moe_lab.kernels.moe_backward import moe_experts_backward  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels.moe_gemm import moe_down, moe_up  # Triton is optional; its interpreter is chosen first

    x, w1, w3, w2, idx, wts, dy = (inp[k] for k in ("x", "w1", "w3", "w2", "expert_idx", "weights", "dy"))
    if kernel == "up":
        return lambda: moe_up(x, w1, w3, align, save_preact=False, config=cfg)
    h, a1, a3 = buffers if buffers is not None else forward_buffers(inp, align)
    if kernel == "down":
        return lambda: moe_down(h, w2, wts, idx, align, config=cfg)
    needs = {"swiglu_backward": (False, True, False, False, False),  # dweights: the swiglu kernel alone
             "dx": (True, False, False, False, False),
             "dw13": (False, False, True, True, False),
             "dw2": (False, False, False, False, True)}[kernel]
    fixed = _fixed_backward(align)
    return lambda: moe_experts_backward(dy, x, idx, wts, w1, w3, w2, h, a1, a3, align, needs=needs,
                                        configs={**fixed, kernel: cfg})


def _fixed_up(align):
    from moe_lab.kernels import INTERPRETED  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first

    return CT.KernelConfig(align.block_m, 32 if INTERPRETED else 64, 32 if INTERPRETED else 64, 1, 4, 1 if INTERPRETED else 3)


def _fixed_backward(align) -> dict:
    """Configurations of the kernels a backward timing runs besides the one being timed (the dx and
    dw13 timings include the swiglu kernel that makes their inputs: the same for every candidate)."""
    from moe_lab.kernels import INTERPRETED  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first

    bn = 32 if INTERPRETED else 64
    stages = 1 if INTERPRETED else 3
    row = CT.KernelConfig(align.block_m, bn, bn, 1, 4, stages)
    weight = CT.KernelConfig(32 if INTERPRETED else 64, bn, 32, 1, 4, stages)
    return {"swiglu_backward": row, "dx": row, "dw13": weight, "dw2": weight}


def time_ms(fn, device, budget_ms: float = 5.0, best_so_far: Optional[float] = None) -> float:
    """Median milliseconds of fn: one warm-up launch (compiles or loads from the cache), then repeats
    for about budget_ms; a run already 3x slower than best_so_far is not repeated."""
    if torch.device(device).type != "cuda":
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    first = start.elapsed_time(end)
    if best_so_far is not None and first > 3 * best_so_far:
        return first
    n = int(max(3, min(25, budget_ms / max(first, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


# ----------------------------------------------------------------------------------------------
# Compiling ahead, in parallel
# ----------------------------------------------------------------------------------------------
def _compile_worker(jobs: list, shape_dims: dict, dtype_name: str, device: str) -> list:
    """Run in a worker process: launch each (kernel, config, shape) once on small inputs, which
    compiles it into Triton's on-disk cache. Returns the errors."""
    import torch  # noqa: F811  (a fresh process)

    choose_triton_interpreter(device)  # a fresh process: before the kernels are imported

    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels.moe_routing import moe_align  # Triton is optional; its interpreter is chosen first

    dtype = getattr(torch, dtype_name)
    errors = []
    problems = {}
    for kernel, cfg_dict, shape_name in jobs:
        try:
            d, f, E, k = shape_dims[shape_name]
            if shape_name not in problems:
                problems[shape_name] = make_problem(LayerShape(d, f, min(E, 4), min(k, 2), ""), 64, device, dtype)
            inp = problems[shape_name]
            cfg = CT.KernelConfig.from_dict(cfg_dict)
            bm = cfg.BLOCK_M if kernel in CT.ROW_KERNELS else 16
            align = moe_align(inp["expert_idx"], inp["w1"].shape[0], bm)
            kernel_runner(kernel, inp, align, cfg)()
        except Exception as err:  # reported, and the timing loop will show it again
            errors.append(f"{kernel} {cfg_dict}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if device != "cpu":
        torch.cuda.synchronize()
    return errors


def precompile(jobs: list, shape_dims: dict, dtype, workers: int, progress: bool, device: str = "cuda") -> list:
    """Compile every job in `workers` processes (spawned: CUDA cannot be forked). Returns the errors."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from tqdm.auto import tqdm

    if workers < 1 or not jobs:
        return []
    chunks = [jobs[i::workers] for i in range(workers)]
    errors = []
    dtype_name = str(dtype).replace("torch.", "")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_worker, c, shape_dims, dtype_name, device) for c in chunks if c]
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="compile", disable=not progress, file=sys.stderr):
            try:
                errors += fut.result()
            except Exception as err:  # a worker that died: its kernels compile in the timing loop instead
                errors.append(f"worker failed: {type(err).__name__}: {err}")
    return errors


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
def tune_bucket(shape_name: str, tokens: int, device, dtype, space_size: str, bar=None) -> tuple[dict, list]:
    """Time every kernel's configurations for one bucket. Returns (bucket for the table, timing rows)."""
    from moe_lab.kernels import INTERPRETED  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels.moe_routing import moe_align  # Triton is optional; its interpreter is chosen first

    shape = SHAPES[shape_name]
    rows = CT.rows_per_expert(tokens, shape.top_k, shape.n_experts)
    inp = make_problem(shape, tokens, device, dtype)
    timings, per_block = [], {}
    candidates = block_m_candidates(rows, INTERPRETED)
    weight_results = None
    for bm in candidates:
        align = moe_align(inp["expert_idx"], shape.n_experts, bm)
        buffers = forward_buffers(inp, align)
        kernels = CT.ROW_KERNELS + (CT.WEIGHT_KERNELS if weight_results is None else ())
        results = {}
        for kernel in kernels:
            best, measured = None, []
            for cfg in CT.space(kernel, bm if kernel in CT.ROW_KERNELS else None, size=space_size):
                if bar is not None:
                    bar.set_postfix_str(f"{shape_name} T={tokens} bm={bm} {kernel} {cfg.short()}")
                try:
                    ms = time_ms(kernel_runner(kernel, inp, align, cfg, buffers), device, best_so_far=best)
                    status = "ok"
                except Exception as err:  # a configuration that does not compile or run here
                    ms, status = None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                timings.append(dict(shape=shape_name, tokens=tokens, block_m=bm, kernel=kernel, config=cfg.meta,
                                    ms=ms, status=status))
                if ms is not None:
                    measured.append((ms, cfg))
                    best = ms if best is None else min(best, ms)
            if not measured:
                raise RuntimeError(f"no configuration of {kernel} ran for {shape_name} T={tokens} block_m={bm}")
            measured.sort(key=lambda m: m[0])
            entry = {"config": measured[0][1].meta, "ms": round(measured[0][0], 5), "candidates": len(measured)}
            if len(measured) > 1:
                entry["runner_up"] = {"config": measured[1][1].meta, "ms": round(measured[1][0], 5)}
            results[kernel] = entry
        if weight_results is None:
            weight_results = {k: results[k] for k in CT.WEIGHT_KERNELS}
        results.update(weight_results)
        per_block[bm] = results
    fwd = {bm: sum(r[k]["ms"] for k in CT.FORWARD_KERNELS) for bm, r in per_block.items()}
    train = {bm: sum(r[k]["ms"] for k in CT.KERNELS) for bm, r in per_block.items()}
    chosen = {"forward": min(fwd, key=fwd.get), "training": min(train, key=train.get)}
    bucket = dict(dtype=str(dtype).replace("torch.", ""), shape=shape_name, tokens=tokens, d_model=shape.d_model,
                  d_expert=shape.d_expert, n_experts=shape.n_experts, top_k=shape.top_k, rows_per_expert=rows,
                  block_m=chosen, forward_ms={str(k): round(v, 5) for k, v in fwd.items()},
                  training_ms={str(k): round(v, 5) for k, v in train.items()},
                  kernels={str(bm): per_block[bm] for bm in sorted(set(chosen.values()))})
    return bucket, timings


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


def build_table(buckets: list, device, command: str, notes: list) -> dict:
    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first

    env = machine.environment_record(device, command)
    cap = list(torch.cuda.get_device_capability(device)) if torch.device(device).type == "cuda" else None
    table = dict(schema=CT.SCHEMA, device=env["device"], capability=cap, driver=env["driver"], cuda=env["cuda"],
                 torch=env["torch"], triton=env["triton"], date=env["date"], command=command, notes=notes,
                 buckets=buckets)
    CT.validate_table(table)
    return table


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_lab tune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma list from {tuple(SHAPE_TOKENS)} (default {','.join(DEFAULT_SHAPES)})")
    ap.add_argument("--tokens", help="comma list of token counts (default: each shape's grid, SHAPE_TOKENS)")
    ap.add_argument("--space", default="full", choices=("full", "quick"), help="configurations per kernel")
    ap.add_argument("--out", help="table to write (default moe_lab/kernels/configs/<device>.json)")
    ap.add_argument("--timings", help="every timing as JSON (default runs/tune/<device>-timings.json)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new bucket after this many seconds")
    ap.add_argument("--workers", type=int, help="processes that compile ahead (default: CPU cores - 2, at most 14; "
                    "0: compile while timing)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available; cpu runs the interpreter")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

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
    if dev_type == "cpu":
        if args.space != "quick" or any(s not in ("tiny",) for s in shapes):
            ap.error("on the CPU the kernels run through Triton's interpreter: only --space quick --shapes tiny "
                     "(a check of the sweep's logic; its times say nothing about a GPU)")
        choose_triton_interpreter("cpu")

    from moe_lab.kernels import INTERPRETED  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first
    from tqdm.auto import tqdm

    device = torch.device(dev_type)

    dtype = torch.float32 if INTERPRETED else pick_dtype(device)
    name = machine.device_name(device)
    slug = machine.slugify(name) if dev_type == "cuda" else "cpu-interpreter"
    out = Path(args.out) if args.out else (CT.table_path(slug) if dev_type == "cuda" else paths.runs_path("tune", f"{slug}.json"))
    timings_path = Path(args.timings) if args.timings else paths.runs_path("tune", f"{slug}-timings.json")
    check_outputs(ap, {"--out": out, "--timings": timings_path})  # before any work: a bad path costs no run
    if tokens is None:  # interleaved: every shape gets its first buckets before the budget can run out
        cases = [(s, SHAPE_TOKENS[s][i]) for i in range(max(len(SHAPE_TOKENS[s]) for s in shapes)) for s in shapes
                 if i < len(SHAPE_TOKENS[s])]
    else:
        cases = [(s, t) for s in shapes for t in tokens]
    print(f"tuning on {name} ({str(dtype).replace('torch.', '')}, space {args.space}): {len(cases)} buckets, "
          f"budget {args.budget_s:.0f} s -> {out}", flush=True)
    t_start = time.perf_counter()
    notes = []
    workers = args.workers if args.workers is not None else (max(1, min(14, (os.cpu_count() or 2) - 2))
                                                             if dev_type == "cuda" else 0)
    if workers:
        jobs, dims = [], {}
        for s, t in cases:
            sh = SHAPES[s]
            dims[s] = (sh.d_model, sh.d_expert, sh.n_experts, sh.top_k)
            for bm in block_m_candidates(CT.rows_per_expert(t, sh.top_k, sh.n_experts), INTERPRETED):
                for k in CT.KERNELS:
                    for cfg in CT.space(k, bm if k in CT.ROW_KERNELS else None, size=args.space):
                        jobs.append((k, cfg.meta, s))
        # one shape per specialisation suffices when all widths are multiples of 16 (the compiler sees the same)
        unique, seen = [], set()
        for k, cfg, s in jobs:
            key = (k, tuple(sorted(cfg.items())), all(v % 16 == 0 for v in dims[s][:2]) or s)
            if key not in seen:
                seen.add(key)
                unique.append((k, cfg, s))
        t0 = time.perf_counter()
        errors = precompile(unique, dims, dtype, workers, not args.no_progress, dev_type)
        msg = f"compiled {len(unique)} kernel configurations in {time.perf_counter() - t0:.0f} s with {workers} workers"
        print(msg + (f"; {len(errors)} failed, e.g. {errors[0]}" if errors else ""), flush=True)
        notes.append(msg)
    command = " ".join(["python -m moe_lab tune", *(sys.argv[1:] if argv is None else argv)])
    buckets, timings = [], []
    bar = tqdm(cases, desc="tune", disable=args.no_progress, file=sys.stderr)
    for s, t in bar:
        if time.perf_counter() - t_start > args.budget_s:
            notes.append(f"time budget of {args.budget_s:.0f} s reached before {s} T={t}")
            continue
        t_bucket = time.perf_counter()
        bucket, rows = tune_bucket(s, t, device, dtype, args.space, bar)
        buckets.append(bucket)
        timings += rows
        bm = bucket["block_m"]
        best = bucket["kernels"][str(bm["forward"])]
        print(f"{s:9s} T={t:6d} rows/expert {bucket['rows_per_expert']:8.1f} block_m fwd {bm['forward']:3d} "
              f"train {bm['training']:3d} | up {best['up']['ms']:.4f} ms down {best['down']['ms']:.4f} ms "
              f"({time.perf_counter() - t_bucket:.0f} s)", flush=True)
        # Written after every bucket: a run cut short (a time limit, a lost machine) keeps what it measured.
        table = build_table(buckets, device, command, notes + [f"{len(buckets)} buckets in "
                                                               f"{time.perf_counter() - t_start:.0f} s"])
        write_record(table, out, quiet=True)
        write_record(dict(device=table["device"], date=table["date"], command=command, timings=timings), timings_path, quiet=True)
        if dev_type == "cuda":
            torch.cuda.empty_cache()
    if not buckets:
        print("no bucket finished within the budget: nothing written", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(buckets)} buckets) and {timings_path} ({len(timings)} timings) in "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
