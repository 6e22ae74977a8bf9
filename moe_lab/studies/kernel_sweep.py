"""The kernel sweep behind `python -m moe_lab tune`: real inputs for each layer shape and token
count, each kernel of the expert path run with a given configuration, timed, and the winners of a
bucket collected into a configuration table (moe_lab.kernels.config_table).

This module imports the Triton kernels, so it is imported once the run policy has chosen compiled
kernels or Triton's interpreter (moe_lab.studies.tune.main does so after reading --device). Worker
processes that compile ahead inherit that choice through TRITON_INTERPRET in their environment.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Optional

import torch

from moe_lab.core import machine
from moe_lab.kernels import INTERPRETED, config_table as CT
from moe_lab.kernels.moe_backward import moe_experts_backward
from moe_lab.kernels.moe_gemm import moe_down, moe_up
from moe_lab.kernels.moe_routing import moe_align
from moe_lab.studies.bench import SHAPES, LayerShape, make_inputs


def block_m_candidates(rows: float, interpreted: bool) -> list[int]:
    """The layout's row blocks worth timing for `rows` rows per expert: the power of two at or above it
    (within 16..128) and its neighbour, so the table can say whether less padding or bigger tiles win."""

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

    return moe_up(inp["x"], inp["w1"], inp["w3"], align, save_preact=True, config=_fixed_up(align))


def kernel_runner(kernel: str, inp: dict, align, cfg, buffers: Optional[tuple] = None):
    """A function that launches `kernel` once with `cfg` over `align`; `buffers` = forward_buffers(...)
    (made here when not given)."""

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

    return CT.KernelConfig(align.block_m, 32 if INTERPRETED else 64, 32 if INTERPRETED else 64, 1, 4, 1 if INTERPRETED else 3)


def _fixed_backward(align) -> dict:
    """Configurations of the kernels a backward timing runs besides the one being timed (the dx and
    dw13 timings include the swiglu kernel that makes their inputs: the same for every candidate)."""

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


def build_table(buckets: list, device, command: str, notes: list) -> dict:

    env = machine.environment_record(device, command)
    cap = list(torch.cuda.get_device_capability(device)) if torch.device(device).type == "cuda" else None
    table = dict(schema=CT.SCHEMA, device=env["device"], capability=cap, driver=env["driver"], cuda=env["cuda"],
                 torch=env["torch"], triton=env["triton"], date=env["date"], command=command, notes=notes,
                 buckets=buckets)
    CT.validate_table(table)
    return table
