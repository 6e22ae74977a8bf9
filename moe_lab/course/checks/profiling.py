"""Checkers for notebook 07 (profiling): the FLOP count, the expected number of active experts, and
the roofline. The right answers live in moe_lab.studies.profiling."""
from __future__ import annotations

import math
from typing import Callable

from moe_lab.core import cost
from moe_lab.course.checks.common import CheckFailed, _ok, checker
from moe_lab.studies import profiling


def _number(name: str, got, what: str) -> float:
    if isinstance(got, bool) or not isinstance(got, (int, float)) and not hasattr(got, "__float__"):
        raise CheckFailed(f"{name}: {what} should be a number, got {type(got).__name__}")
    return float(got)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _diagnose(name: str, fn: Callable, right: Callable, cases: list, wrongs: list, call: str, rel: float = 1e-9) -> None:
    """Compare fn with `right` on every case; when it differs, name the first wrong formula of `wrongs`
    [(formula, hint), ...] that fn matches on every case (a formula may also be a predicate
    `(got, case) -> bool` over all cases, marked by being a tuple ("match", predicate)), else report
    the first case that differs. The hint leads the message; the numbers follow it."""
    got = [_number(name, fn(*c), f"{call}{c}") for c in cases]
    want = [float(right(*c)) for c in cases]
    if all(_close(g, w, rel) for g, w in zip(got, want)):
        return
    for formula, hint in wrongs:
        if isinstance(formula, tuple) and formula[0] == "match":
            if formula[1](got, cases):
                break
        elif all(_close(g, float(formula(*c)), rel) for g, c in zip(got, cases)):
            break
    else:
        hint = ""
    i = next(i for i, (g, w) in enumerate(zip(got, want)) if not _close(g, w, rel))
    numbers = f"{call}{cases[i]} = {got[i]:.6g}, expected {want[i]:.6g}"
    raise CheckFailed(f"{name}: {hint} ({numbers})" if hint else f"{name}: {numbers}")


def _adds_elementwise(got: list, cases: list) -> bool:
    """got = 6*N*d*f + a*N*f + b*N*d (N = T*k) for small whole a, b, not both 0, on every case: the
    matmul FLOPs plus SwiGLU's elementwise work (silu, the product) and the routing weight."""
    for a in range(0, 9):
        for b in range(0, 5):
            if (a, b) != (0, 0) and all(_close(g, 6 * T * k * d * f + a * T * k * f + b * T * k * d)
                                        for g, (T, d, f, k) in zip(got, cases)):
                return True
    return False


@checker
def check_moe_flops(moe_flops: Callable) -> None:
    """moe_flops(T, d, f, k) -> forward matmul FLOPs of a SwiGLU expert layer, 6*T*k*d*f."""
    cases = [(3, 4, 5, 2), (128, 64, 32, 2), (1000, 2048, 768, 8), (7, 16, 48, 1), (5, 8, 12, 4)]
    wrongs = [
        (lambda T, d, f, k: 2 * T * k * d * f, "That is one matmul: a SwiGLU expert runs three (gate x@w1, up x@w3, down h@w2)."),
        (lambda T, d, f, k: 4 * T * k * d * f, "That is two matmuls: count gate (x@w1), up (x@w3) and down (h@w2)."),
        (lambda T, d, f, k: 3 * T * k * d * f, "A matmul (m, n) @ (n, p) costs 2*m*n*p FLOPs: one multiply and one add per term."),
        (lambda T, d, f, k: 6 * T * d * f, "Each token goes through k experts: there are T*k routed rows, not T."),
        (lambda T, d, f, k: 18 * T * k * d * f, "That is forward + backward; the question asks for the forward pass only."),
        (("match", _adds_elementwise), "That adds SwiGLU's elementwise FLOPs (silu and the product, a few per element "
                                       "of the (N, f) activations, and the routing weight) to the matmuls: the question "
                                       "counts matmul FLOPs only, as torch's FLOP counter does (the rest is under 1 % here)."),
    ]
    _diagnose("check_moe_flops", moe_flops, lambda T, d, f, k: cost.moe_flops(T, d, f, k), cases, wrongs,
              "moe_flops")
    _ok("check_moe_flops")


@checker
def check_expected_active_experts(expected_active: Callable) -> None:
    """expected_active(T, E, k) -> E * (1 - (1 - k/E)^T), under uniform random top-k routing."""
    cases = [(1, 8, 2), (4, 8, 2), (64, 128, 8), (3, 16, 1), (10, 4, 4), (0, 8, 2)]
    wrongs = [
        (lambda T, E, k: min(E, T * k), "min(E, T*k) is the most experts T*k assignments could reach; at random, "
                                        "tokens choose some experts more than once."),
        (lambda T, E, k: E * (1 - (1 - 1 / E) ** (T * k)), "That treats the T*k choices as independent draws with "
                                                           "replacement; a token's k experts are distinct, so one token "
                                                           "leaves an expert idle with probability 1 - k/E."),
        (lambda T, E, k: E * (1 - k / E) ** T, "That is the expected number of *idle* experts; subtract it from E."),
        (lambda T, E, k: E, "That counts all E experts; with few tokens many experts receive none, and only the active "
                            "ones read their weights. An expert stays idle when all T tokens miss it: (1 - k/E)^T."),
    ]
    _diagnose("check_expected_active_experts", expected_active, cost.expected_active_experts, cases, wrongs,
              "expected_active", rel=1e-6)
    _ok("check_expected_active_experts")


@checker
def check_roofline(roofline: Callable) -> None:
    """roofline(intensity, peak_flops, bandwidth) -> min(peak_flops, intensity * bandwidth)."""
    peak, bw = 1000e12, 3e12  # ridge at 333 FLOP/byte
    cases = [(i, peak, bw) for i in (1.0, 50.0, 333.0, 1000.0, 1e5)]
    wrongs = [
        (lambda i, p, b: max(p, i * b), "The roof is the *lower* of the two limits: use min, not max."),
        (lambda i, p, b: i * b, "Past the ridge point no kernel beats the peak FLOP/s: cap the result at peak_flops."),
        (lambda i, p, b: p, "Below the ridge point memory limits the speed: intensity (FLOP/byte) * bandwidth (byte/s)."),
        (lambda i, p, b: min(p, b / i), "Memory-bound speed is intensity * bandwidth (FLOP/byte * byte/s = FLOP/s), "
                                        "not bandwidth / intensity."),
        (lambda i, p, b: min(p, 2 * i * b), "That doubles the bandwidth: it is already the bytes moved per second (a "
                                            "copy's reads and writes both counted), so the memory roof is intensity * "
                                            "bandwidth, not twice it."),
        (lambda i, p, b: min(p, i * b / 2), "That halves the bandwidth: it is already the bytes moved per second (reads "
                                            "and writes together), so the memory roof is intensity * bandwidth."),
    ]
    _diagnose("check_roofline", roofline, profiling.roofline, cases, wrongs, "roofline")
    _ok("check_roofline")
