"""Checkers for notebook 00 (setup): the dtype policy and the FLOP count of a matrix multiply."""
from __future__ import annotations

from typing import Callable

import torch

from moe_lab.course.checks.common import CheckFailed, _ok, checker

GPUS = [("H100", (9, 0)), ("RTX 4090", (8, 9)), ("A10", (8, 6)), ("A100", (8, 0)), ("T4", (7, 5)), ("V100", (7, 0))]


@checker
def check_dtype_policy(pick: Callable) -> None:
    """pick(device_type, capability=None) -> float32 on the CPU, bf16 from capability 8.0, else fp16."""
    got = pick("cpu", None)
    if got != torch.float32:
        raise CheckFailed(f"check_dtype_policy: on the CPU you return {got}; CPUs compute in torch.float32 (the "
                          f"Triton interpreter also computes bfloat16 wrongly)")
    for name, cap in GPUS:
        expected = torch.bfloat16 if cap >= (8, 0) else torch.float16
        got = pick("cuda", cap)
        if got == expected:
            continue
        if expected == torch.float16 and got == torch.bfloat16:
            raise CheckFailed(f"check_dtype_policy: a {name} (capability {cap[0]}.{cap[1]}) gets bfloat16 from you, but "
                              f"only capability 8.0 (Ampere) and newer have bf16: older GPUs need torch.float16")
        if expected == torch.bfloat16 and got == torch.float16 and cap[0] == 8 and cap[1] > 0:
            raise CheckFailed(f"check_dtype_policy: a {name} (capability {cap[0]}.{cap[1]}) gets float16 from you: "
                              f"compare the whole (major, minor) tuple with (8, 0), not the minor number")
        raise CheckFailed(f"check_dtype_policy: a {name} (capability {cap[0]}.{cap[1]}) gets {got}, expected {expected}")
    _ok("check_dtype_policy")


@checker
def check_matmul_flops(flops: Callable) -> None:
    """flops(m, n, k) -> 2 m n k for an (m x k) @ (k x n) product."""
    for m, n, k in [(2, 3, 4), (128, 64, 32), (1, 1, 1), (4096, 4096, 4096)]:
        got, expected = flops(m, n, k), 2 * m * n * k
        if got == expected:
            continue
        if got == m * n * k:
            raise CheckFailed(f"check_matmul_flops: ({m} x {k}) @ ({k} x {n}) gives {got}, expected {expected}: each "
                              f"multiply-add counts as 2 FLOPs (a multiplication and an addition)")
        if got in (2 * m**3, 2 * n**3, 2 * k**3):
            raise CheckFailed(f"check_matmul_flops: ({m} x {k}) @ ({k} x {n}) gives {got}, expected {expected}: that is "
                              f"the count of a square product; use all three sizes m, n and k")
        raise CheckFailed(f"check_matmul_flops: ({m} x {k}) @ ({k} x {n}) gives {got}, expected {expected} "
                          f"(m*n dot products of length k, 2 FLOPs per multiply-add)")
    _ok("check_matmul_flops")
