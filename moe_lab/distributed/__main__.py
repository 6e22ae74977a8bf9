"""Check the expert-parallel MoE layer against one process, from a shell.

    torchrun --nproc-per-node 2 -m moe_lab distributed --tokens 64
    python -m moe_lab distributed --world-size 4 --tokens 64 --capacity-factor 1.0

Under torchrun every process is one rank (gloo on CPUs; NCCL with --backend nccl, one GPU per
rank); without torchrun, launch() starts --world-size local processes. Rank 0 prints the largest
differences between the expert-parallel layer and the single-process one (outputs and gradients)
and the bytes each rank sent and received; the exit code is 1 if a difference exceeds --tol, 2 for
bad arguments (all of them named, before any process starts: e.g. --tokens 0, or --backend nccl
without CUDA).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

from moe_lab.distributed.launch import launch
from moe_lab.distributed.workers import moe_layer_check
from moe_lab.model import expert_backends

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_lab distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-experts", type=int, default=8, help="routed experts; a multiple of the world size")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-expert", type=int, default=64)
    p.add_argument("--n-shared", type=int, default=1)
    p.add_argument("--capacity-factor", type=float, default=None, help="omit for dropless")
    p.add_argument("--local-backend", default="sorted", choices=expert_backends.names(),
                   help="how each rank runs its experts (moe_lab.model.expert_backends)")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=None, help="largest accepted difference (default by dtype)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--world-size", type=int, default=2, help="processes to start when not run by torchrun")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before launch() gives up")
    return p.parse_args(argv)


def _world_size(a: argparse.Namespace) -> int:
    """The number of ranks: torchrun's WORLD_SIZE under torchrun, else --world-size."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else a.world_size


def check_args(a: argparse.Namespace) -> list:
    """Every problem with the arguments, as messages naming the flag (empty when all is well).

    Checked before any process starts: a rank that fails on a bad argument is harder to read.
    """
    problems = []

    def need(ok: bool, flag: str, value, expected: str) -> None:
        if not ok:
            problems.append(f"argument {flag}: {value!r}: expected {expected}")

    def finite(v) -> bool:
        return v is not None and math.isfinite(v)

    for flag, value, lo in (("--tokens", a.tokens, 1), ("--d-model", a.d_model, 1), ("--n-experts", a.n_experts, 1),
                            ("--top-k", a.top_k, 1), ("--d-expert", a.d_expert, 1), ("--n-shared", a.n_shared, 0),
                            ("--world-size", a.world_size, 1), ("--seed", a.seed, 0)):
        need(value >= lo, flag, value, f"an integer >= {lo}")
    need(a.top_k <= a.n_experts, "--top-k", a.top_k, f"at most --n-experts={a.n_experts}")
    need(a.capacity_factor is None or (finite(a.capacity_factor) and a.capacity_factor > 0), "--capacity-factor",
         a.capacity_factor, "a finite number > 0 (omit it for dropless)")
    need(a.tol is None or (finite(a.tol) and a.tol > 0), "--tol", a.tol, "a finite number > 0")
    need(finite(a.timeout) and a.timeout > 0, "--timeout", a.timeout, "a finite number of seconds > 0")
    world = _world_size(a)
    need(world < 1 or a.n_experts % world == 0, "--n-experts", a.n_experts,
         f"a multiple of the world size {world} (each rank holds n_experts / world_size experts)")
    if a.backend == "nccl":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            problems.append(f"argument --backend: 'nccl' runs one rank per CUDA GPU, and {why} "
                            f"(torch {torch.__version__}); use --backend gloo on CPUs")
        elif not dist.is_nccl_available():
            problems.append("argument --backend: 'nccl' is not built into this torch; use --backend gloo")
        elif "RANK" not in os.environ and torch.cuda.device_count() < world:
            problems.append(f"argument --world-size: {world} ranks need {world} GPUs with --backend nccl; "
                            f"{torch.cuda.device_count()} here")
    if a.local_backend == "triton":
        need(a.dtype == "float32", "--dtype", a.dtype, "float32 with --local-backend triton (its kernels have no float64)")
        try:
            import moe_lab.kernels  # noqa: F401 - says clearly when Triton is missing
        except ImportError as exc:
            problems.append(f"argument --local-backend: 'triton' is not usable here: {exc}")
    return problems


def report(result: dict, tol: float) -> bool:
    """Print rank 0's result; True when every difference is within tol."""
    errors = {k: v for k, v in result.items() if k.startswith("max_err")}
    ok = all(v <= tol for v in errors.values())
    print(f"expert-parallel MoE layer vs one process ({len(result['comm_per_rank'])} ranks, "
          f"{result['dropped']} assignments dropped on rank 0):")
    for name, value in errors.items():
        print(f"  {name:<26}{value:.3e}")
    print(f"  {'match' if ok else 'MISMATCH'} (tolerance {tol:.0e})")
    print(f"bytes moved per rank (all-to-all, forward + backward, own chunk excluded):")
    print(f"  {'rank':<6}{'sent':>10}{'received':>10}   sent by phase")
    for r, comm in enumerate(result["comm_per_rank"]):
        phases = ", ".join(f"{k} {v}" for k, v in comm["sent"].items())
        print(f"  {r:<6}{sum(comm['sent'].values()):>10}{sum(comm['received'].values()):>10}   {phases}")
    return ok


def main(argv=None) -> int:
    a = parse_args(argv)
    problems = check_args(a)
    if problems:
        print("python -m moe_lab distributed: " + "\n  ".join(["bad arguments, nothing was started:", *problems]),
              file=sys.stderr)
        return 2
    tol = a.tol if a.tol is not None else (1e-10 if a.dtype == "float64" else 1e-4)
    kwargs = dict(tokens=a.tokens, d_model=a.d_model, n_experts=a.n_experts, top_k=a.top_k, d_expert=a.d_expert,
                  n_shared=a.n_shared, capacity_factor=a.capacity_factor, local_backend=a.local_backend,
                  dtype=DTYPES[a.dtype], seed=a.seed)
    if "RANK" in os.environ:  # started by torchrun: this process is one rank
        dist.init_process_group(a.backend)
        try:
            result = moe_layer_check(dist.get_rank(), dist.get_world_size(), **kwargs)
        finally:
            dist.destroy_process_group()
        if result["rank"] != 0:
            return 0
    else:
        result = launch(moe_layer_check, a.world_size, *kwargs.values(), timeout=a.timeout, backend=a.backend)[0]
    return 0 if report(result, tol) else 1


if __name__ == "__main__":
    sys.exit(main())
