"""Counting, timing and the roofline: how fast an MoE expert layer *could* run, and how fast it does.

Notebook 07 builds these pieces; `python -m moe_lab.bench` uses them to record figures.

1. FLOP model. A SwiGLU expert layer (Shazeer 2020) with T tokens, top-k routing, model width d and
   expert width f runs N = T*k routed rows through three matmuls (a matmul (m, n) @ (n, p) costs
   2*m*n*p FLOPs, one multiply and one add per term):

       gate  x @ w1   2*N*d*f          forward = 6*N*d*f = 6*T*k*d*f
       up    x @ w3   2*N*d*f          backward = 2 x forward: each matmul needs the gradient of
       down  h @ w2   2*N*f*d          its input (dX = dY W^T) and of its weight (dW = X^T dY)

   SwiGLU's elementwise work and the routing weights (about 5*N*f + 2*N*d FLOPs, under 1 % at the
   course's sizes) are left out, as torch.utils.flop_counter also leaves them out.

2. Byte model, in three parts (`moe_bytes`):
   - weights: every expert that receives at least one token reads w1, w3, w2 (3*d*f values) once.
     With routing spread at random (each token picks k distinct experts uniformly, independently of
     the other tokens) an expert is idle with probability (1 - k/E)^T, so the expected number of
     active experts is E * (1 - (1 - k/E)^T) (`expected_active_experts`). Real routers are not
     uniform; the bench counts the experts its routing actually uses.
   - activations: x read and y written once (T*d values each); backward: dy and x read, dx written.
   - intermediates: what each implementation writes to memory and reads back, counted op by op
     (each torch op reads its inputs and writes its output once; caches ignored). See
     INTERMEDIATE_TRAFFIC. "minimal" (no intermediates) is the lower bound any implementation pays.

3. Roofline (Williams, Waterman & Patterson 2009): a kernel with arithmetic intensity I (FLOP per
   byte) can reach at most min(peak FLOP/s, I * bandwidth). The two ceilings are *measured* here
   (`measure_ceilings`): a large matmul and a large device copy, on the machine at hand.

4. Timers: `triton.testing.do_bench` medians on a GPU; medians of repeated wall-clock runs after a
   warm-up on the CPU (`median_ms`). `top_kernels` runs torch.profiler and lists the top kernels.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import torch

Pass = Literal["forward", "backward", "forward+backward"]
PASSES = ("forward", "backward", "forward+backward")


def _check_pass(mode: str) -> None:
    if mode not in PASSES:
        raise ValueError(f"mode={mode!r}: expected one of {PASSES}")


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name}={v!r}: expected a number >= 0")


# ----------------------------------------------------------------------------------------------
# 1. FLOPs
# ----------------------------------------------------------------------------------------------
def moe_flops_breakdown(tokens: int, d_model: int, d_expert: int, top_k: int) -> dict[str, int]:
    """Forward FLOPs of each matmul of a SwiGLU expert layer: {"gate", "up", "down"}."""
    _check_positive(tokens=tokens, d_model=d_model, d_expert=d_expert, top_k=top_k)
    n = tokens * top_k  # routed rows
    return {"gate": 2 * n * d_model * d_expert, "up": 2 * n * d_model * d_expert, "down": 2 * n * d_expert * d_model}


def moe_flops(tokens: int, d_model: int, d_expert: int, top_k: int, mode: Pass = "forward") -> int:
    """Matmul FLOPs of a SwiGLU expert layer: 6*T*k*d*f forward, twice that backward, three times
    that for forward+backward (see the module docstring)."""
    _check_pass(mode)
    fwd = sum(moe_flops_breakdown(tokens, d_model, d_expert, top_k).values())
    return {"forward": fwd, "backward": 2 * fwd, "forward+backward": 3 * fwd}[mode]


def dense_equal_flops_shape(tokens: int, d_model: int, d_expert: int, top_k: int) -> tuple[int, int, int]:
    """(M, K, N) of one dense matmul with the forward FLOPs of the expert layer: (T*k, d) @ (d, 3f),
    2*(T*k)*d*(3f) = 6*T*k*d*f. Its backward (dA and dB) also costs twice its forward."""
    return tokens * top_k, d_model, 3 * d_expert


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of (m, k) @ (k, n)."""
    return 2 * m * k * n


def matmul_bytes(m: int, k: int, n: int, itemsize: int, mode: Pass = "forward") -> int:
    """Bytes a matmul must move at least: read A and B, write C; backward reads dC, A, B and writes dA, dB."""
    _check_pass(mode)
    fwd = (m * k + k * n + m * n) * itemsize
    bwd = (m * n + m * k + k * n + m * k + k * n) * itemsize
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------
# 2. Bytes
# ----------------------------------------------------------------------------------------------
def expected_active_experts(tokens: int, n_experts: int, top_k: int) -> float:
    """Expected number of experts that receive at least one of T tokens, when each token picks top_k
    distinct experts uniformly at random, independently of the others: E * (1 - (1 - k/E)^T)."""
    _check_positive(tokens=tokens, n_experts=n_experts, top_k=top_k)
    if n_experts < 1 or not 0 < top_k <= n_experts:
        raise ValueError(f"top_k={top_k}, n_experts={n_experts}: expected 1 <= top_k <= n_experts")
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


# Intermediate traffic in units of N*d, N*f, T*d and (active experts)*T*d, N = T*k routed rows.
# Counted op by op from each implementation's code (moe_lab.model.experts, moe_lab.kernels); each
# op reads its inputs and writes its output once. "forward" is inference (no saved tensors);
# "backward" is the extra traffic of the backward pass after a training forward.
INTERMEDIATE_TRAFFIC = {
    # backend: {pass: (Nd, Nf, Td, E_active*Td)}
    "minimal": {"forward": (0, 0, 0, 0), "backward": (0, 0, 0, 0)},
    # forward: h written and read (2Nf), the (N, d) per-assignment buffer written and read by the
    # combine (2Nd); training also writes a1, a3 (2Nf). Backward: a1, a3 read and da1, da3 written
    # (4Nf), da1, da3 read by the dx and the dW1/dW3 kernels (4Nf), h read by dW2 (Nf); dy gathered
    # twice and x once per row (3Nd), the dx buffer written and combined (2Nd).
    "triton": {"forward": (2, 2, 0, 0), "backward": (5, 9, 0, 0)},
    # forward: permuted copy of x (write 1, read 2), a1, a3, silu(a1), h (write + read each: 8Nf),
    # expert outputs, torch.cat, weighting (2Nd each), and index_add into zeros (2Td).
    "sorted": {"forward": (9, 8, 2, 0), "backward": (16, 15, 2, 0)},
    # as sorted without the torch.cat (the grouped matmul writes one (N, d) output)
    "grouped_mm": {"forward": (7, 8, 2, 0), "backward": (16, 15, 2, 0)},
    # as grouped_mm, but y = y.index_add(...) copies all of y once per active expert (2Td each),
    # and the backward of x[token] accumulates a (T, d) gradient per active expert (4Td each).
    "reference": {"forward": (7, 8, 1, 2), "backward": (16, 15, 0, 4)},
}


def moe_bytes(tokens: int, d_model: int, d_expert: int, n_experts: int, top_k: int, itemsize: int,
              backend: str = "minimal", mode: Pass = "forward", active_experts: Optional[float] = None) -> dict:
    """Bytes an expert layer moves, as {"weights", "activations", "intermediates", "total"}.

    active_experts: how many experts receive tokens (default: `expected_active_experts`).
    backend: a key of INTERMEDIATE_TRAFFIC ("minimal" = weights and activations only, the lower bound).
    Backward weights: w1, w3, w2 of the active experts read again, and all E weight gradients written.
    """
    _check_pass(mode)
    if backend not in INTERMEDIATE_TRAFFIC:
        raise ValueError(f"backend={backend!r}: expected one of {tuple(INTERMEDIATE_TRAFFIC)}")
    T, d, f, E, k = tokens, d_model, d_expert, n_experts, top_k
    act = expected_active_experts(T, E, k) if active_experts is None else active_experts
    if not 0 <= act <= E:
        raise ValueError(f"active_experts={active_experts}: expected a number in [0, n_experts={E}]")
    N = T * k
    per_expert = 3 * d * f  # w1, w3, w2
    parts = {"forward": {"weights": act * per_expert, "activations": 2 * T * d},
             "backward": {"weights": (act + E) * per_expert, "activations": 3 * T * d}}
    passes = ["forward", "backward"] if mode == "forward+backward" else [mode]
    out = {"weights": 0.0, "activations": 0.0, "intermediates": 0.0}
    for p in passes:
        cNd, cNf, cTd, cETd = INTERMEDIATE_TRAFFIC[backend][p]
        if p == "forward" and mode == "forward+backward" and backend == "triton":
            cNf += 2  # the training forward also writes a1 and a3 for the backward
        out["weights"] += parts[p]["weights"]
        out["activations"] += parts[p]["activations"]
        out["intermediates"] += cNd * N * d + cNf * N * f + cTd * T * d + cETd * act * T * d
    out = {name: v * itemsize for name, v in out.items()}
    out["total"] = out["weights"] + out["activations"] + out["intermediates"]
    return out


def arithmetic_intensity(flops: float, n_bytes: float) -> float:
    """FLOPs per byte of memory traffic."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes}: expected a positive number of bytes")
    return flops / n_bytes


# ----------------------------------------------------------------------------------------------
# 3. Roofline
# ----------------------------------------------------------------------------------------------
def roofline(intensity, peak_flops: float, bandwidth: float):
    """Attainable FLOP/s at arithmetic intensity I: min(peak_flops, I * bandwidth). Works on a number,
    a NumPy array or a tensor of intensities (FLOP/byte); bandwidth in bytes/s."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError(f"peak_flops={peak_flops}, bandwidth={bandwidth}: both must be positive")
    if isinstance(intensity, (int, float)):
        return min(peak_flops, intensity * bandwidth)
    if isinstance(intensity, torch.Tensor):
        return torch.clamp(intensity * bandwidth, max=peak_flops)
    import numpy as np

    return np.minimum(peak_flops, np.asarray(intensity, dtype=float) * bandwidth)


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """The intensity (FLOP/byte) where the memory roof meets the compute roof: peak / bandwidth."""
    return peak_flops / bandwidth


# ----------------------------------------------------------------------------------------------
# 4. Timers
# ----------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], warmup: int = 2, repeats: int = 5,
              clock: Callable[[], float] = time.perf_counter, sync: Optional[Callable[[], None]] = None) -> float:
    """Median wall-clock time of fn() in milliseconds, over `repeats` runs after `warmup` runs.
    `clock` returns seconds (injectable for tests); `sync` (e.g. torch.cuda.synchronize) runs before
    each reading of the clock, so work queued on a device is counted."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: expected repeats >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def bench_ms(fn: Callable[[], object], device, warmup: int = 2, repeats: int = 5,
             grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Time fn in milliseconds: `triton.testing.do_bench` (median; it flushes L2 and synchronises) on a
    CUDA device, `median_ms` on the CPU. grad_to_none: tensors whose .grad is reset before each run."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, grad_to_none=list(grad_to_none or []), return_mode="median"))

    def run():
        for t in grad_to_none or []:
            t.grad = None
        fn()

    return median_ms(run, warmup=warmup, repeats=repeats)


# ----------------------------------------------------------------------------------------------
# 5. Measured ceilings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ceilings:
    """The two roofs measured on this machine."""

    peak_flops: float  # FLOP/s of a large matmul in the compute dtype
    bandwidth: float  # bytes/s of a large device-to-device copy (bytes read + bytes written)
    matmul_n: int  # the matmul was n x n x n
    copy_bytes: int  # bytes copied (each read once and written once)
    dtype: str  # compute dtype of the matmul
    device: str  # where they were measured

    @property
    def ridge(self) -> float:
        return ridge_point(self.peak_flops, self.bandwidth)

    def as_dict(self) -> dict:
        return {**asdict(self), "ridge_flop_per_byte": self.ridge}


def measure_matmul_ceiling(device, dtype: torch.dtype, n: int = 8192, repeats: int = 5) -> tuple[float, float]:
    """(FLOP/s, ms) of an n x n x n matmul: the compute roof."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    ms = bench_ms(lambda: a @ b, device, warmup=1, repeats=repeats)
    return matmul_flops(n, n, n) / (ms * 1e-3), ms


def measure_copy_bandwidth(device, n_bytes: int = 1 << 30, repeats: int = 5) -> tuple[float, float]:
    """(bytes/s, ms) of copying an n_bytes buffer into another: 2 * n_bytes moved (read + write)."""
    device = torch.device(device)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, warmup=1, repeats=repeats)
    return 2 * n_bytes / (ms * 1e-3), ms


def measure_ceilings(device, dtype: torch.dtype, matmul_n: Optional[int] = None,
                     copy_bytes: Optional[int] = None) -> Ceilings:
    """Measure both roofs. Defaults: an 8192^3 matmul and a 1 GiB copy on a GPU; 1024^3 and 64 MiB on
    the CPU (big enough to leave the caches, small enough for a second on 2 cores)."""
    on_gpu = torch.device(device).type == "cuda"
    matmul_n = matmul_n or (8192 if on_gpu else 1024)
    copy_bytes = copy_bytes or ((1 << 30) if on_gpu else (64 << 20))
    flops, _ = measure_matmul_ceiling(device, dtype, matmul_n)
    bw, _ = measure_copy_bandwidth(device, copy_bytes)
    return Ceilings(flops, bw, matmul_n, copy_bytes, str(dtype).replace("torch.", ""), device_name(device))


# ----------------------------------------------------------------------------------------------
# 6. torch.profiler: the top kernels
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelRow:
    name: str  # operator or kernel name
    calls: int  # how many times it ran
    self_us: float  # time in it, its children excluded (device time on a GPU, CPU time otherwise)
    share: float  # fraction of the total self time


def top_kernels(fn: Callable[[], object], device, n: int = 8, warmup: int = 1, show: bool = True) -> list[KernelRow]:
    """Run fn under torch.profiler (after `warmup` plain runs) and return the n operators / kernels
    that took the most self time; print them as a table when show=True. On a GPU the rows are CUDA
    kernels ranked by device time; on the CPU, aten operators ranked by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    attr = "self_cpu_time_total"
    if on_gpu:  # torch >= 2.4 names it device time; older versions, cuda time
        attr = "self_device_time_total" if averages and hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    events = [e for e in averages if getattr(e, attr, 0) > 0]
    if on_gpu:  # kernels only: drop the CPU-side operators, which carry no device time of their own
        events = [e for e in events if not e.key.startswith("aten::")] or events
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [KernelRow(e.key, int(e.count), float(getattr(e, attr)), getattr(e, attr) / total) for e in events[:n]]
    if show:
        print(f"{'kernel' if on_gpu else 'operator':52s} {'calls':>6s} {'self time':>11s} {'share':>6s}")
        for r in rows:
            print(f"{r.name[:52]:52s} {r.calls:6d} {r.self_us / 1e3:8.3f} ms {r.share:6.1%}")
    return rows


# ----------------------------------------------------------------------------------------------
# 7. The machine and the recorded files
# ----------------------------------------------------------------------------------------------
def device_name(device=None) -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU; 'CPU: <model name> (<n> cores)' otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores)"


def slugify(name: str) -> str:
    """A file-name-safe form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"name={name!r}: nothing left to make a file name from")
    return slug


def driver_version(device=None) -> str:
    """The NVIDIA driver version (from nvidia-smi), or a plain statement of why there is none."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "none (CPU)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return f"unknown (nvidia-smi not available; CUDA runtime {torch.version.cuda})"


def environment_record(device, command: Optional[str] = None) -> dict:
    """What a recorded figure must carry (README, "Benchmarks"): device, driver, versions, date and command."""
    from moe_lab.runtime import triton_version

    return {
        "device": device_name(device),
        "driver": driver_version(device),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(["python -m moe_lab.bench", *sys.argv[1:]]),
    }


RECORD_KEYS = ("device", "driver", "torch", "triton", "date", "command", "results")
RESULT_KEYS = ("shape", "tokens", "d_model", "d_expert", "n_experts", "top_k", "backend", "pass", "status", "ms",
               "flops", "tflops", "weight_bytes", "min_bytes", "gbps")


def validate_record(record: dict) -> None:
    """Raise ValueError naming what is missing or malformed in a bench record (data/bench/*.json)."""
    if not isinstance(record, dict):
        raise ValueError(f"a bench record is a JSON object; got {type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"bench record lacks {missing}; expected the keys {RECORD_KEYS}")
    if not isinstance(record["results"], list) or not record["results"]:
        raise ValueError("bench record: 'results' must be a non-empty list")
    for i, r in enumerate(record["results"]):
        miss = [k for k in RESULT_KEYS if k not in r]
        if miss:
            raise ValueError(f"bench record: results[{i}] lacks {miss}")
        if r["status"] == "ok" and not (isinstance(r["ms"], (int, float)) and r["ms"] > 0 and math.isfinite(r["ms"])):
            raise ValueError(f"bench record: results[{i}] has status 'ok' but ms={r['ms']!r}")
    try:
        _dt.datetime.fromisoformat(record["date"])
    except (TypeError, ValueError):
        raise ValueError(f"bench record: date={record['date']!r} is not an ISO date") from None


def load_bench_records(directory: os.PathLike | str = "data/bench") -> list[dict]:
    """Every valid *.json record in `directory` (default data/bench, relative to the repository),
    sorted by device name; each gains a "file" key. An invalid file raises ValueError naming it."""
    directory = Path(directory)
    if not directory.is_absolute() and not directory.exists():
        directory = Path(__file__).resolve().parents[1] / directory  # relative to the repository
    records = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            validate_record(rec)
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        rec["file"] = str(path)
        records.append(rec)
    return sorted(records, key=lambda r: r["device"])


def record_label(record: dict) -> str:
    """'recorded on <device>, <date>' for plots and tables."""
    return f"recorded on {record['device']}, {record['date'][:10]}"


def ok_results(record: dict, **match) -> list[dict]:
    """The results of a record whose status is 'ok' and whose fields equal `match`."""
    return [r for r in record["results"] if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def summarize(results: Iterable[dict]) -> str:
    """A plain-text table of bench results (GFLOP/s when every rate is under 1 TFLOP/s, as on a CPU)."""
    results = list(results)
    rates = [r["tflops"] for r in results if r["status"] == "ok"]
    unit, scale = ("TFLOP/s", 1.0) if rates and max(rates) >= 1 else ("GFLOP/s", 1e3)
    lines = [f"{'shape':9s} {'tokens':>6s} {'backend':>10s} {'pass':>16s} {'ms':>9s} {unit:>8s} "
             f"{'GB/s':>7s} {'%peak':>6s} {'%copy':>6s}  note"]
    for r in results:
        head = f"{r['shape']:9s} {r['tokens']:6d} {r['backend']:>10s} {r['pass']:>16s}"
        if r["status"] != "ok":
            lines.append(f"{head} {'-':>9s} {'':8s} {'':7s} {'':6s} {'':6s}  {r['status']}: {r.get('note', '')}")
            continue
        pk, bw = r.get("frac_peak_flops"), r.get("frac_copy_bw_weights")
        lines.append(f"{head} {r['ms']:9.3f} {r['tflops'] * scale:8.2f} {r['gbps']:7.1f} "
                     f"{'' if pk is None else f'{pk:6.0%}':>6s} {'' if bw is None else f'{bw:6.0%}':>6s}  {r.get('note', '')}")
    return "\n".join(lines)
