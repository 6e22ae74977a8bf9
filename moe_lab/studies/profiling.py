"""Counting, timing and the roofline: how fast an MoE expert layer *could* run, and how fast it does.

Notebook 07 builds these pieces; `python -m moe_lab bench` uses them to record figures.

1-2. The FLOP and byte models of an expert layer (moe_flops, moe_bytes, expected_active_experts,
   INTERMEDIATE_TRAFFIC) are defined in moe_lab.core.cost, the course's one cost module, and used here.

3. Roofline (Williams, Waterman & Patterson 2009): a kernel with arithmetic intensity I (FLOP per
   byte) can reach at most min(peak FLOP/s, I * bandwidth). The two ceilings are *measured* here
   (`measure_ceilings`): a large matmul and a large device copy, on the machine at hand.

4. Timers: `triton.testing.do_bench` medians on a GPU; medians of repeated wall-clock runs after a
   warm-up on the CPU (`median_ms`). `top_kernels` runs torch.profiler and lists the top kernels.

The bench's recorded files (their schema, reading them back) are moe_lab.studies.bench_records; the
machine a figure was measured on is named by moe_lab.core.machine.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from moe_lab.core import cost
from moe_lab.core.machine import device_name


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


def measure_matmul_tflops(device, dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """Median TFLOP/s of an n x n x n matmul on this device (2 n^3 FLOPs each), after a warm-up:
    notebook 00's GFLOP/s, by the same timer as notebook 07's compute roof."""
    flops, _ = measure_matmul_ceiling(device, dtype, n, repeats=repeats)
    return flops / 1e12


def measure_matmul_ceiling(device, dtype: torch.dtype, n: int = 8192, repeats: int = 5) -> tuple[float, float]:
    """(FLOP/s, ms) of an n x n x n matmul: the compute roof."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    ms = bench_ms(lambda: a @ b, device, warmup=1, repeats=repeats)
    return cost.matmul_flops(n, n, n) / (ms * 1e-3), ms


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


class _quiet_stderr:
    """Silence file descriptor 2 (C++ code's stderr, which Python's sys.stderr does not catch) for a block:
    torch.profiler's backend prints 'USDT: ... profiler_start/stop' lines there."""

    def __enter__(self):
        import sys as _sys

        try:
            _sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:  # no real fd 2 (some notebook front-ends): nothing to silence
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def top_kernels(fn: Callable[[], object], device, n: int = 8, warmup: int = 1, show: bool = True) -> list[KernelRow]:
    """Run fn under torch.profiler (after `warmup` plain runs) and return the n operators / kernels
    that took the most self time; print them as a table when show=True. On a GPU the rows are CUDA
    kernels ranked by device time; on the CPU, aten operators ranked by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with _quiet_stderr(), profile(activities=activities) as prof:  # the profiler logs its start and stop to fd 2
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
