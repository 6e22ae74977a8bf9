"""`python -m moe_lab.gpu_suite --out DIR`: every GPU test and benchmark of the course in one call.

Steps, run one after another, each in its own process with its own time limit:

    tests      pytest -m gpu tests                   the tests marked `gpu` (fp16/bf16, compiled kernels)
    notebooks  nbval on notebooks 05, 06, 07         with MOE_LAB_MODE=gpu (04 / 08 too with --with-04 / --with-08)
    bench      python -m moe_lab.bench --record      the full sweep: data/bench/<device>.json, and a copy
                                                     DIR/bench-<device>.json

Each step writes DIR/<step>.log; DIR/summary.json lists every step's exit status and duration, with
the device and versions. The exit status is nonzero when any step failed, timed out or was not run.

A lent GPU machine may allow 10 minutes per command and 30 minutes in all: run one step per command
(`--only tests`, then `--only notebooks`, then `--only bench`). `--budget-s` (default 570) bounds the
whole call; a step gets what is left, at most its own limit (`--timeout-STEP`); the bench is told to
start no new case 60 s before its limit, so it still writes what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "notebooks", "bench")
DEFAULT_TIMEOUT = {"tests": 240, "notebooks": 420, "bench": 540}
GPU_NOTEBOOKS = ("05", "06", "07")


def _notebook(prefix: str) -> str:
    found = sorted((ROOT / "notebooks").glob(f"{prefix}_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks/{prefix}_*.ipynb in {ROOT}")
    return str(found[0].relative_to(ROOT))


def plan(out: Path, only: Optional[str] = None, with_04: bool = False, timeouts: Optional[dict] = None,
         device_slug: str = "gpu", with_08: bool = False) -> list[dict]:
    """The steps to run: [{"name", "cmd", "env", "timeout", "log"}], in order."""
    timeouts = {**DEFAULT_TIMEOUT, **(timeouts or {})}
    py = sys.executable
    steps = []
    for name in STEPS if only is None else (only,):
        env = {"MPLBACKEND": "Agg"}
        if name == "tests":
            cmd = [py, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rs", "-p", "no:cacheprovider"]
        elif name == "notebooks":
            nbs = [_notebook(p) for p in (("04",) if with_04 else ()) + GPU_NOTEBOOKS + (("08",) if with_08 else ())]
            cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
                   f"--nbval-cell-timeout={timeouts[name]}", *nbs]
            env["MOE_LAB_MODE"] = "gpu"
        elif name == "bench":
            cmd = [py, "-m", "moe_lab.bench", "--record", "--no-progress", "--out", str(out / f"bench-{device_slug}.json"),
                   "--budget-s", str(max(30, timeouts[name] - 60))]
        else:
            raise ValueError(f"step={name!r}: expected one of {STEPS}")
        steps.append(dict(name=name, cmd=cmd, env=env, timeout=timeouts[name], log=str(out / f"{name}.log")))
    return steps


def run_step(step: dict, timeout: float) -> dict:
    """Run one step in its own process group, output to its log; kill the group at the time limit."""
    t0 = time.perf_counter()
    with open(step["log"], "w") as log:
        log.write(f"$ {' '.join(step['cmd'])}\n# env: {step['env']}\n# time limit: {timeout:.0f} s\n\n")
        log.flush()
        proc = subprocess.Popen(step["cmd"], cwd=ROOT, env={**os.environ, **step["env"]}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # this step's own process group, started above
            proc.wait()
            rc, status = None, f"timed out after {timeout:.0f} s"
    return dict(name=step["name"], status=status, returncode=rc, seconds=round(time.perf_counter() - t0, 1),
                log=step["log"], command=" ".join(step["cmd"]))


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_lab.gpu_suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for logs, summary.json and a copy of the bench record")
    ap.add_argument("--only", choices=STEPS, help="run one step")
    ap.add_argument("--with-04", action="store_true", help="also run notebook 04 (trains models: minutes)")
    ap.add_argument("--with-08", action="store_true", help="also run notebook 08 (GRPO at the gpu preset)")
    ap.add_argument("--budget-s", type=float, default=570, help="time limit of the whole call (default 570)")
    for name in STEPS:
        ap.add_argument(f"--timeout-{name}", type=float, default=DEFAULT_TIMEOUT[name],
                        help=f"time limit of the {name} step (default {DEFAULT_TIMEOUT[name]})")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit (works without a GPU)")
    args = ap.parse_args(argv)
    for flag, value, least in [("--budget-s", args.budget_s, 30)] + [(f"--timeout-{n}", getattr(args, f"timeout_{n}"), 1) for n in STEPS]:
        if not (math.isfinite(value) and value >= least):  # checked before any work, even with --dry-run
            ap.error(f"argument {flag}: {value}: expected a finite number of seconds >= {least}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"argument --out: {args.out} is a file: expected a folder (made if missing)")

    import torch

    out = Path(args.out).resolve()  # steps run from the repository root
    timeouts = {n: getattr(args, f"timeout_{n}") for n in STEPS}
    if not args.dry_run and not torch.cuda.is_available():
        print("moe_lab.gpu_suite needs a CUDA GPU and none is available here (torch.cuda.is_available() is False). "
              "On a CPU run `make test`, or `python -m moe_lab.bench --quick`; `--dry-run` prints the steps.",
              file=sys.stderr)
        return 2
    from moe_lab import profiling

    slug = profiling.slugify(profiling.device_name("cuda")) if torch.cuda.is_available() else "gpu"
    steps = plan(out, args.only, args.with_04, timeouts, slug, with_08=args.with_08)
    if args.dry_run:
        for s in steps:
            print(f"[{s['name']}] (limit {s['timeout']:.0f} s, env {s['env']}) {' '.join(s['cmd'])}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(profiling.environment_record("cuda", "python -m moe_lab.gpu_suite " + " ".join(sys.argv[1:] if argv is None else argv)),
                   steps=[])
    t_start = time.perf_counter()
    for s in steps:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            summary["steps"].append(dict(name=s["name"], status="not run: the suite's time budget is spent",
                                         returncode=None, seconds=0, log=None, command=" ".join(s["cmd"])))
            continue
        print(f"[{s['name']}] running (limit {min(s['timeout'], left):.0f} s), log: {s['log']}", flush=True)
        res = run_step(s, min(s["timeout"], left))
        print(f"[{s['name']}] {res['status']} in {res['seconds']} s", flush=True)
        summary["steps"].append(res)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [s["name"] for s in summary["steps"] if s["status"] != "passed"]
    print("all steps passed" if not failed else f"failed or not run: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
