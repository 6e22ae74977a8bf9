"""`python -m moe_lab bench`: time the expert back-ends against the measured roofline.

Back-ends (same function; their registry is moe_lab.model.expert_backends): `reference` (loop over
experts), `sorted` (permute once, one matmul per expert), `grouped_mm` (the `sorted` layout on
`torch._grouped_mm`, where this torch has it), `triton` (the kernels of notebook 06), and `dense`:
one matmul of the same FLOPs, (T*k, d) @ (d, 3f), the ceiling a grouped GEMM aims for.

Shapes: `tiny` (the cpu preset's layer), `teaching` (the gpu preset's layer), `mixtral` (Mixtral-8x7B
like: d=4096, f=14336, E=8, k=2) and `fine` (DeepSeek/Qwen-like fine-grained experts: d=2048, f=768,
E=128, k=8). Tokens sweep from 128 to 32768 on a GPU, so the move from memory-bound (few tokens per
expert: each weight byte serves few rows) to compute-bound shows. Forward (under no_grad) and
forward+backward. Per case: ms, TFLOP/s, GB/s of the bytes any implementation must move (weights of
active experts plus activations), and the fractions of the measured ceilings.

    python -m moe_lab bench --quick            # CPU / CI: small shapes, seconds; writes runs/bench/
    python -m moe_lab bench --record           # GPU: the full sweep; also writes data/bench/<device>.json
    python -m moe_lab bench --shapes fine --tokens 8192,32768 --backends triton,grouped_mm,dense

Where files go: always `--out` (default runs/bench/<device>[-quick].json, git-ignored); with
`--record` also data/bench/<device>.json (committed: the recorded figures notebook 07 plots). Run it
from the repository root. On a CPU the full sweep is refused (hours on 2 cores) unless
--allow-large-on-cpu; `--quick` on a CPU skips `triton`, whose interpreter times Python, not kernels,
and uses one thread (`--threads` to change it).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from moe_lab.core import cost, machine, paths
from moe_lab.core.arguments import check_outputs
from moe_lab.core.config import preset
from moe_lab.core.contract import max_rel_diff
from moe_lab.core.files import write_record
from moe_lab.core.runtime import choose_triton_interpreter, default_device, pick_dtype
from moe_lab.model import expert_backends as B
from moe_lab.model.experts import experts_sorted
from moe_lab.studies import bench_records, profiling as P


@dataclass(frozen=True)
class LayerShape:
    """One expert layer's sizes."""

    d_model: int  # d: token width
    d_expert: int  # f: hidden width of one expert
    n_experts: int  # E: routed experts
    top_k: int  # k: experts per token
    about: str  # where the shape comes from


def _preset_shape(name: str) -> LayerShape:
    m = preset(name).moe
    return LayerShape(m.d_model, m.moe.d_expert, m.moe.n_experts, m.moe.top_k, f"the course's {name} preset layer")


SHAPES = {
    "tiny": _preset_shape("cpu"),
    "teaching": _preset_shape("gpu"),
    "mixtral": LayerShape(4096, 14336, 8, 2, "Mixtral-8x7B-like"),
    "fine": LayerShape(2048, 768, 128, 8, "fine-grained, DeepSeek/Qwen-like"),
}
LARGE_SHAPES = ("mixtral", "fine")
BACKENDS = B.names() + ("dense",)  # every expert back-end of the registry, and the dense ceiling
FULL_TOKENS = (128, 512, 2048, 8192, 16384, 32768)
FULL_SHAPE_TOKENS = {  # the full sweep's token counts per shape (those the targets name, and the ends)
    "fine": FULL_TOKENS,
    "teaching": (128, 2048, 16384),
    "mixtral": (512, 4096, 16384),
}
SLOW_BACKENDS = B.names(python_loop=True)
SLOW_MAX_TOKENS = 2048
"""`reference` and `sorted` loop over experts in Python (about 0.2 s per forward+backward of the fine-grained
layer on an H200, whatever the tokens): the full sweep times them up to this many tokens only."""
QUICK = {  # (shapes, tokens) per device type for --quick
    "cpu": (("tiny", "teaching"), (32, 128, 512)),
    "cuda": (("teaching", "fine"), (128, 2048)),
}
FULL_SHAPES = ("fine", "teaching", "mixtral")  # the fine-grained layer first: it carries the targets


def backend_status(name: str, device, dtype: torch.dtype) -> Optional[str]:
    """None when `name` (an expert back-end, or "dense") can run here, else why not."""
    if name == "dense":
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS}")
    return B.status(name, device, dtype)


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------
def make_inputs(shape: LayerShape, tokens: int, device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random activations, a random top-k routing (softmax of Gaussian logits, renormalised) and
    weights scaled like an initialised layer."""
    d, f, E, k = shape.d_model, shape.d_expert, shape.n_experts, shape.top_k
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, device=device, dtype=dtype)
    probs = torch.randn(tokens, E, generator=g, device=device).softmax(-1)
    w, idx = probs.topk(k, dim=-1)  # (T, k)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)
    w1 = torch.randn(E, d, f, generator=g, device=device, dtype=dtype) * d**-0.5
    w3 = torch.randn(E, d, f, generator=g, device=device, dtype=dtype) * d**-0.5
    w2 = torch.randn(E, f, d, generator=g, device=device, dtype=dtype) * f**-0.5
    active = int(torch.unique(idx).numel())
    return dict(x=x, expert_idx=idx, weights=w, w1=w1, w3=w3, w2=w2, active=active)


def _case_fn(backend: str, mode: str, inp: dict, shape: LayerShape):
    """(fn to time, tensors whose .grad is reset before each run)."""
    tokens = inp["x"].shape[0]
    dev, dt = inp["x"].device, inp["x"].dtype
    if backend == "dense":
        m, kk, n = cost.dense_equal_flops_shape(tokens, shape.d_model, shape.d_expert, shape.top_k)
        g = torch.Generator(device=dev).manual_seed(1)
        a = torch.randn(m, kk, generator=g, device=dev, dtype=dt)
        b = torch.randn(kk, n, generator=g, device=dev, dtype=dt) * kk**-0.5
        if mode == "forward":
            return (lambda: a @ b), []
        a.requires_grad_(), b.requires_grad_()
        dc = torch.randn(m, n, generator=g, device=dev, dtype=dt)
        return (lambda: (a @ b).backward(dc)), [a, b]
    fn = B.experts_fn(backend)
    args = [inp[n] for n in ("x", "expert_idx", "weights", "w1", "w3", "w2")]
    if mode == "forward":
        def fwd():
            with torch.no_grad():
                return fn(*args)
        return fwd, []
    leaves = [t.detach().clone().requires_grad_() for t in (args[0], args[2], args[3], args[4], args[5])]
    x, w, w1, w3, w2 = leaves
    dy = torch.randn(tokens, shape.d_model, generator=torch.Generator(device=dev).manual_seed(2), device=dev, dtype=dt)
    return (lambda: fn(x, args[1], w, w1, w3, w2).backward(dy)), leaves


def case_model(shape: LayerShape, tokens: int, backend: str, mode: str, itemsize: int, active: float) -> dict:
    """FLOPs and bytes of one case from the models of moe_lab.studies.profiling."""
    d, f, E, k = shape.d_model, shape.d_expert, shape.n_experts, shape.top_k
    if backend == "dense":
        m, kk, n = cost.dense_equal_flops_shape(tokens, d, f, k)
        passes = {"forward": 1, "backward": 2, "forward+backward": 3}[mode]  # backward: dX and dW
        fl = cost.matmul_flops(m, n, kk) * passes  # C (m, n) = A (m, kk) @ B (kk, n)
        by = cost.matmul_bytes(m, n, kk, itemsize, mode=mode)
        weights = kk * n * itemsize * passes
        return dict(flops=fl, weight_bytes=weights, min_bytes=by, model_bytes=by)
    fl = cost.moe_flops(tokens, d, f, k, mode)
    minimal = cost.moe_bytes(tokens, d, f, E, k, itemsize, "minimal", mode, active_experts=active)
    model = cost.moe_bytes(tokens, d, f, E, k, itemsize, backend, mode, active_experts=active)
    return dict(flops=fl, weight_bytes=minimal["weights"], min_bytes=minimal["total"], model_bytes=model["total"])


def measure_case(shape_name: str, tokens: int, backend: str, mode: str, device, dtype: torch.dtype,
                 ceilings: Optional[P.Ceilings], inp: dict, expected: Optional[Tensor] = None,
                 warmup: int = 1, repeats: int = 5, note: str = "", graph: bool = False) -> dict:
    """Time one (shape, tokens, back-end, pass) and return its result row (see bench_records.RESULT_KEYS).
    graph: on a GPU, forward only, also time the call captured in a CUDA graph (`graph_ms`, None when
    the back-end cannot be captured: it synchronises with the host)."""
    shape = SHAPES[shape_name]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    row = dict(shape=shape_name, tokens=tokens, d_model=shape.d_model, d_expert=shape.d_expert,
               n_experts=shape.n_experts, top_k=shape.top_k, backend=backend, **{"pass": mode},
               dtype=str(dtype).replace("torch.", ""), active_experts=inp["active"], status="ok", note=note,
               ms=None, tflops=None, gbps=None)
    row.update(case_model(shape, tokens, backend, mode, itemsize, inp["active"]))
    try:
        fn, leaves = _case_fn(backend, mode, inp, shape)
        if expected is not None and backend != "dense" and mode == "forward":
            err = max_rel_diff(fn(), expected)
            if err > (1e-4 if dtype == torch.float32 else 3e-2):
                row.update(status="error", note=f"output differs from `sorted` by {err:.1e} (relative): not timed")
                return row
        ms = P.bench_ms(fn, device, warmup=warmup, repeats=repeats, grad_to_none=leaves)
    except Exception as err:  # one failing back-end must not stop the sweep
        row.update(status="error", note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return row
    if graph and torch.device(device).type == "cuda" and mode == "forward":
        row["graph_ms"] = graph_replay_ms(fn)
    sec = ms * 1e-3
    row.update(ms=ms, tflops=row["flops"] / sec / 1e12, gbps=row["min_bytes"] / sec / 1e9,
               intensity=cost.arithmetic_intensity(row["flops"], row["min_bytes"]))
    if ceilings is not None:
        bound = P.roofline(row["intensity"], ceilings.peak_flops, ceilings.bandwidth)
        row.update(roofline_tflops=bound / 1e12, frac_roofline=row["flops"] / sec / bound,
                   frac_peak_flops=row["flops"] / sec / ceilings.peak_flops,
                   frac_copy_bw_weights=row["weight_bytes"] / sec / ceilings.bandwidth)
    return row


def graph_replay_ms(fn) -> Optional[float]:
    """Milliseconds of fn captured once in a CUDA graph and replayed: the GPU's own time, without the
    host's launch overhead. None when fn cannot be captured (it synchronises with the host)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (compiles, allocates)
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        from triton.testing import do_bench

        return float(do_bench(graph.replay, return_mode="median"))
    except Exception:  # capture refused (a host sync inside fn): no graph figure
        torch.cuda.synchronize()
        return None


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
def plan_cases(shapes, tokens_of, backends, passes) -> list[tuple]:
    """The (shape, tokens, back-end, pass) cases in the order they run: first every fast back-end on
    every shape (interleaved by token count, so a time budget cuts the ends of every shape instead of
    whole shapes), then `reference` and `sorted` up to SLOW_MAX_TOKENS; tokens_of(shape) -> counts."""
    fast = [b for b in backends if b not in SLOW_BACKENDS]
    slow = [b for b in backends if b in SLOW_BACKENDS]
    lists = {s: list(tokens_of(s)) for s in shapes}
    cases = []
    for i in range(max(len(v) for v in lists.values())):
        for s in shapes:
            if i < len(lists[s]):
                cases += [(s, lists[s][i], b, p) for b in fast for p in passes]
    for s in shapes:
        for t in lists[s]:
            cases += [(s, t, b, p) for b in slow for p in passes]
    return cases



def run(shapes, tokens, backends, passes, device, dtype: torch.dtype, ceilings: Optional[P.Ceilings],
        warmup: int = 1, repeats: int = 5, budget_s: Optional[float] = None, progress: bool = True,
        notes: Optional[dict] = None, slow_max_tokens: Optional[int] = None, graph_max_tokens: int = 0,
        on_row=None) -> list[dict]:
    """Every (shape, tokens, back-end, pass) in plan_cases' order; `tokens` is a list, or a dict
    {shape: token counts}. Back-ends that cannot run here get a 'skipped' row with the reason, and so
    do `reference` and `sorted` above slow_max_tokens. Stops starting new cases after budget_s seconds
    ('skipped' rows say so). Forward cases up to graph_max_tokens also get a CUDA-graph time.
    on_row(results so far) is called after every measured case (the command writes a partial record)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    status = {b: backend_status(b, device, dtype) for b in backends}
    notes = notes or {}
    tokens_of = (lambda s: tokens[s]) if isinstance(tokens, dict) else (lambda s: tokens)
    cases = plan_cases(shapes, tokens_of, backends, passes)
    results, t_start, inputs_key, inp, expected = [], time.perf_counter(), None, None, None
    bar = tqdm(cases, desc="bench", disable=not progress, file=sys.stderr)
    for s, t, b, p in bar:
        bar.set_postfix_str(f"{s} T={t} {b} {p}")
        base = dict(shape=s, tokens=t, d_model=SHAPES[s].d_model, d_expert=SHAPES[s].d_expert,
                    n_experts=SHAPES[s].n_experts, top_k=SHAPES[s].top_k, backend=b, **{"pass": p},
                    dtype=str(dtype).replace("torch.", ""), ms=None, flops=None, tflops=None,
                    weight_bytes=None, min_bytes=None, gbps=None)
        if status[b] is not None:
            results.append({**base, "status": "skipped", "note": status[b]})
            continue
        if slow_max_tokens is not None and b in SLOW_BACKENDS and t > slow_max_tokens:
            results.append({**base, "status": "skipped", "note": f"a Python loop over experts: timed up to "
                            f"{slow_max_tokens} tokens only, to bound the sweep's time"})
            continue
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            results.append({**base, "status": "skipped", "note": f"time budget of {budget_s:.0f} s reached"})
            continue
        if inputs_key != (s, t):  # new inputs: free the old ones first
            inp = expected = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            inp, inputs_key = make_inputs(SHAPES[s], t, device, dtype), (s, t)
            with torch.no_grad():
                expected = experts_sorted(inp["x"], inp["expert_idx"], inp["weights"], inp["w1"], inp["w3"], inp["w2"])
        results.append(measure_case(s, t, b, p, device, dtype, ceilings, inp, expected, warmup, repeats,
                                    note=notes.get(b, ""), graph=b in B.names(capturable=True) and t <= graph_max_tokens))
        if on_row is not None:
            on_row(results)
    return results


TARGETS_ABOUT = ("targets of issue 16 for the fine-grained layer (d 2048, f 768, E 128, k 8), the Mixtral-like layer "
                 "and the teaching layer, bf16, same run and card: see check_targets")


def check_targets(results: list[dict], ceilings: Optional[P.Ceilings]) -> list[dict]:
    """The course's speed targets for the `triton` back-end, computed from measured rows only (no row,
    no verdict). The bench computes them for GPU runs:

    - fine-grained layer forward >= 65 % of a dense matmul of equal FLOPs from 8192 tokens up;
      forward+backward >= 55 %;
    - fine-grained forward+backward >= 1.2x `torch._grouped_mm` from 8192 tokens up; forward >= 1.5x
      from 2048 tokens up;
    - Mixtral-like layer forward >= 1.0x `torch._grouped_mm` (512, 4096, 16384 tokens);
    - fine-grained memory-bound end (128 to 2048 tokens) forward >= 60 % of the measured copy bandwidth
      on the bytes that must move (weights of the active experts, activations in and out);
    - teaching layer at 128 tokens forward <= 0.1 ms.
    """
    def rows(backend, mode, shape, tmin, tmax):
        return {r["tokens"]: r for r in results if r["status"] == "ok" and r["backend"] == backend
                and r["pass"] == mode and r["shape"] == shape and tmin <= r["tokens"] <= tmax}

    out = []

    def ratio_target(label, mode, other, shape, tmin, tmax, threshold):
        ref = rows(other, mode, shape, tmin, tmax)
        for t, r in rows("triton", mode, shape, tmin, tmax).items():
            if t in ref:
                v = ref[t]["ms"] / r["ms"]
                out.append(dict(target=label, tokens=t, value=v, threshold=threshold, met=v >= threshold))

    big = 1 << 40
    ratio_target("fine-grained triton forward >= 0.65x dense time (share of a dense matmul of equal FLOPs)",
                 "forward", "dense", "fine", 8192, big, 0.65)
    ratio_target("fine-grained triton forward+backward >= 0.55x dense", "forward+backward", "dense", "fine", 8192, big, 0.55)
    ratio_target("fine-grained triton forward+backward >= 1.2x grouped_mm", "forward+backward", "grouped_mm", "fine",
                 8192, big, 1.2)
    ratio_target("fine-grained triton forward >= 1.5x grouped_mm", "forward", "grouped_mm", "fine", 2048, big, 1.5)
    ratio_target("mixtral triton forward >= 1.0x grouped_mm", "forward", "grouped_mm", "mixtral", 1, big, 1.0)
    if ceilings is not None:
        for t, r in rows("triton", "forward", "fine", 128, 2048).items():
            v = r["min_bytes"] / (r["ms"] * 1e-3) / ceilings.bandwidth
            out.append(dict(target="fine-grained memory-bound end: triton forward >= 60% of copy bandwidth on the "
                            "bytes that must move", tokens=t, value=v, threshold=0.6, met=v >= 0.6))
    for t, r in rows("triton", "forward", "teaching", 128, 128).items():
        out.append(dict(target="teaching layer triton forward <= 0.1 ms", tokens=t, value=r["ms"], threshold=0.1,
                        met=r["ms"] <= 0.1))
    return out


def build_record(results: list[dict], ceilings: Optional[P.Ceilings], device, dtype, mode: str,
                 command: Optional[str] = None, notes: Optional[list] = None) -> dict:
    rec = machine.environment_record(device, command)
    rec.update(schema=1, mode=mode, dtype=str(dtype).replace("torch.", ""),
               shapes={n: vars(SHAPES[n]) for n in sorted({r["shape"] for r in results})},
               ceilings=None if ceilings is None else ceilings.as_dict(), notes=list(notes or []),
               targets=check_targets(results, ceilings) if torch.device(device).type == "cuda" else [],
               results=results)
    return rec


def _csv(text: str, allowed, what: str, conv=str) -> list:
    try:
        items = [conv(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{what} {text!r}: expected a comma-separated list of integers") from None
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        expected = f"from {tuple(allowed)}" if allowed is not None else "of values"
        raise SystemExit(f"--{what} {text!r}: expected a comma-separated list {expected}")
    return items


def parse_args(argv: Optional[list] = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line; `plan` checks every argument before any work."""
    ap = argparse.ArgumentParser(prog="python -m moe_lab bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few token counts (CPU, CI)")
    ap.add_argument("--shapes", help=f"comma list from {tuple(SHAPES)}")
    ap.add_argument("--tokens", help="comma list of token counts (default: each shape's, FULL_SHAPE_TOKENS)")
    ap.add_argument("--backends", help=f"comma list from {BACKENDS}")
    ap.add_argument("--passes", default="forward,forward+backward", help="forward and/or forward+backward")
    ap.add_argument("--out", help="JSON output (default runs/bench/<device>[-quick].json)")
    ap.add_argument("--record", action="store_true", help="also write data/bench/<device>.json (recorded figures)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    ap.add_argument("--allow-large-on-cpu", action="store_true", help="run the large shapes on a CPU anyway")
    ap.add_argument("--budget-s", type=float, help="start no new case after this many seconds")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case on the CPU (a GPU uses do_bench)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 with --quick on a CPU, where "
                    "threading overhead dominates small ops and a shared machine makes it erratic; else torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap, ap.parse_args(argv)


@dataclass
class Plan:
    """What a bench run will do, decided (and every argument checked) before any work."""

    device: torch.device
    dtype: torch.dtype
    shapes: list
    tokens: object  # a list of token counts, or {shape: list} for the full sweep
    backends: list
    passes: list
    outs: list  # the JSON files to write: --out, and data/bench/<device>.json with --record
    notes: list  # notes for the record
    row_notes: dict  # back-end -> a note on each of its rows
    slow_max: Optional[int]  # the most tokens the Python-loop back-ends are timed at
    label: str  # "quick" or "full"
    command: str


def _check_numbers(args) -> tuple:
    shapes = _csv(args.shapes, SHAPES, "shapes") if args.shapes else None
    tokens = _csv(args.tokens, None, "tokens", int) if args.tokens else None
    if tokens is not None and any(t < 1 for t in tokens):
        raise SystemExit(f"--tokens {args.tokens!r}: token counts must be positive")
    passes = _csv(args.passes, ("forward", "forward+backward"), "passes")
    backends = _csv(args.backends, BACKENDS, "backends") if args.backends else None
    if args.budget_s is not None and not args.budget_s > 0:
        raise SystemExit(f"--budget-s {args.budget_s}: expected a positive number of seconds")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: expected a positive number")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: expected a positive number")
    return shapes, tokens, passes, backends


def _default_backends(on_cpu: bool, notes: list) -> list:
    if not on_cpu:
        return list(BACKENDS)
    notes.append("triton: skipped on the CPU (its interpreter times Python and NumPy, not a kernel; notebook 06 "
                 "checks its correctness). Ask for it with --backends triton.")
    return [b for b in BACKENDS if b != "triton"]


def plan(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: Optional[list] = None) -> Plan:
    """Every argument checked (a SystemExit naming it) before any work, the CPU's "this would take
    hours" refusal included, and the output files checked before anything is measured."""
    shapes, tokens, passes, backends = _check_numbers(args)
    dev_type = args.device or default_device()
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (a CPU build of torch, or no GPU visible)")
    on_cpu = dev_type == "cpu"
    choose_triton_interpreter(dev_type)  # before triton is first imported
    device = torch.device(dev_type)
    q_shapes, q_tokens = QUICK[dev_type]
    if shapes is None:
        shapes = list(q_shapes if args.quick else FULL_SHAPES)
    large = [s for s in shapes if s in LARGE_SHAPES]
    if on_cpu and large and not args.allow_large_on_cpu:
        what = ("The full bench (Mixtral-like and fine-grained layers up to 32768 tokens) is" if not args.shapes
                else f"--shapes {','.join(large)}: these layers are")
        raise SystemExit(f"{what} for a GPU: on this CPU it would take hours. Run `python -m moe_lab bench --quick` "
                         "(small layers), or pass --allow-large-on-cpu to run it anyway.")
    slug = machine.slugify(machine.device_name(device))
    outs = [Path(args.out) if args.out else paths.runs_path("bench", f"{slug}{'-quick' if args.quick else ''}.json")]
    outs += [paths.data_path("bench", f"{slug}.json")] if args.record else []
    check_outputs(ap, dict(zip(("--out", "--record"), outs)))  # before any work: a bad path costs no run
    full = not args.quick and tokens is None
    if tokens is None:
        tokens = list(q_tokens) if args.quick else {s: FULL_SHAPE_TOKENS.get(s, FULL_TOKENS) for s in shapes}
    notes, row_notes = [], {}
    backends = _default_backends(on_cpu, notes) if backends is None else backends
    if on_cpu and "triton" in backends:
        row_notes["triton"] = "Triton interpreter: times Python, not the kernel"
    slow_max = SLOW_MAX_TOKENS if full and not on_cpu else None
    if slow_max is not None and any(b in SLOW_BACKENDS for b in backends):
        notes.append(f"reference and sorted loop over experts in Python: timed up to {slow_max} tokens, to bound the "
                     "sweep's time (their time per call hardly changes with the tokens)")
    command = " ".join(["python -m moe_lab bench", *(sys.argv[1:] if argv is None else argv)])
    return Plan(device, pick_dtype(device), shapes, tokens, backends, passes, outs, notes, row_notes, slow_max,
                "quick" if args.quick else "full", command)


def run_plan(p: Plan, repeats: int, budget_s: Optional[float], progress: bool) -> dict:
    """Measure the ceilings, then every case, rewriting --out after each (a run stopped from outside,
    such as a lent machine's limit, keeps what it measured); return the finished record."""
    on_cpu = p.device.type == "cpu"
    ceilings = P.measure_ceilings(p.device, p.dtype)
    print(f"measured ceilings: matmul {ceilings.peak_flops / 1e12:.3f} TFLOP/s ({ceilings.matmul_n}^3), copy "
          f"{ceilings.bandwidth / 1e9:.1f} GB/s ({ceilings.copy_bytes >> 20} MiB), ridge {ceilings.ridge:.1f} FLOP/byte")

    def write_partial(rows):
        partial = build_record(rows, ceilings, p.device, p.dtype, p.label, p.command,
                               p.notes + ["partial: written after every case; the run had not finished"])
        write_record(partial, p.outs[0], quiet=True)

    results = run(p.shapes, p.tokens, p.backends, p.passes, p.device, p.dtype, ceilings, warmup=1 if on_cpu else 25,
                  repeats=repeats, budget_s=budget_s, progress=progress, notes=p.row_notes,
                  slow_max_tokens=p.slow_max, graph_max_tokens=0 if on_cpu else 2048, on_row=write_partial)
    record = build_record(results, ceilings, p.device, p.dtype, p.label, p.command, p.notes)
    record["cpu_threads"] = torch.get_num_threads()
    record["commit"] = machine.git_commit()
    if not on_cpu:
        from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first

        table = CT.table_for(machine.device_name(p.device))
        record["kernel_table"] = None if table is None else dict(date=table["date"], command=table["command"],
                                                                  triton=table["triton"])
    bench_records.validate_record(record)
    return record


def main(argv: Optional[list] = None) -> int:
    ap, args = parse_args(argv)
    p = plan(ap, args, argv)
    threads = args.threads if args.threads is not None else (1 if p.device.type == "cpu" and args.quick else None)
    if threads is not None:
        torch.set_num_threads(threads)
    for n in p.notes:
        print("note:", n)
    print(f"device: {machine.device_name(p.device)} | dtype {str(p.dtype).replace('torch.', '')} | shapes {p.shapes} | "
          f"tokens {p.tokens} | back-ends {p.backends}")
    record = run_plan(p, args.repeats, args.budget_s, progress=not args.no_progress)
    print(bench_records.summarize(record["results"]))
    for t in record["targets"]:
        print(f"target {t['target']} at {t['tokens']} tokens: {t['value']:.3g} -> {'met' if t['met'] else 'NOT met'}")
    write_record(record, p.outs)
    return 0 if any(r["status"] == "ok" for r in record["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
