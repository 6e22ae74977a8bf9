"""`python -m moe_lab gpu-suite --out DIR`: every GPU test and benchmark of the course in one call.

Steps, run one after another, each in its own process with its own time limit:

    smoke      a few seconds: the expert kernels compile and agree with the reference (bf16, fp32),
               the one-program layout agrees with moe_align. If this fails, nothing else is run.
    tune       (only with --with-tune) python -m moe_lab tune: re-make this GPU's configuration table
               data/kernel_tables/<device>.json, and its timings in DIR/tune-<device>.json
    tests      pytest -m gpu tests                   the tests marked `gpu` (fp16/bf16, compiled kernels)
    nb-05, nb-06, nb-07                              each notebook executed with MOE_LAB_MODE=gpu from a
               cold Triton cache (its own empty TRITON_CACHE_DIR), outputs kept in DIR/notebooks/
               (04 / 08 too with --with-04 / --with-08)
    bench      python -m moe_lab bench --record      the full sweep: data/bench/<device>.json, and a copy
                                                     DIR/bench-<device>.json

Each step writes DIR/<step>.log; DIR/summary.json lists every step's exit status and duration, with
the device and versions. The exit status is nonzero when any step failed, timed out or was not run.

A lent GPU machine may allow 10 minutes per command: the defaults (no tuning) are meant to fit in 9
minutes (`--budget-s 540`); with `--archive PATH` the call rewrites PATH (a .tar.gz of DIR and the
tables and records it wrote) after every step, so a call cut short still returns what it measured. `--budget-s` bounds the whole call; a step gets what is left, at most its own limit
(`--timeout-STEP`; the notebooks share `--timeout-notebook`); the bench and the tuner are told to start
no new case well before their limit, so they still write what they measured. `--only STEP` runs one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from moe_lab.core import machine, paths
from moe_lab.core.contract import max_rel_diff
from moe_lab.model.experts import experts_reference

ROOT = paths.repository() or paths.PACKAGE.parent  # a repository command: it works on a clone
STEPS = ("smoke", "tune", "tests", "notebooks", "bench")
DEFAULT_TIMEOUT = {"smoke": 120, "tune": 240, "tests": 180, "notebook": 120, "bench": 240}
GPU_NOTEBOOKS = ("05", "06", "07")


def _notebook(prefix: str) -> str:
    found = sorted((ROOT / "notebooks").glob(f"{prefix}_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks/{prefix}_*.ipynb in {ROOT}")
    return str(found[0].relative_to(ROOT))


def plan(out: Path, only: Optional[str] = None, with_04: bool = False, timeouts: Optional[dict] = None,
         device_slug: str = "gpu", with_08: bool = False, with_tune: bool = False) -> list[dict]:
    """The steps to run: [{"name", "cmd", "env", "timeout", "log", "fatal"}], in order."""
    timeouts = {**DEFAULT_TIMEOUT, **(timeouts or {})}
    py = sys.executable
    wanted = [only] if only is not None else [s for s in STEPS if s != "tune" or with_tune]
    steps = []
    for name in wanted:
        env = {"MPLBACKEND": "Agg"}
        if name == "smoke":
            steps.append(dict(name=name, cmd=[py, "-m", "moe_lab", "gpu-suite", "--smoke"], env=env,
                              timeout=timeouts["smoke"], log=str(out / "smoke.log"), fatal=True))
        elif name == "tune":
            cmd = [py, "-m", "moe_lab", "tune", "--no-progress", "--timings", str(out / f"tune-{device_slug}.json"),
                   "--budget-s", str(max(30, timeouts["tune"] - 60))]
            steps.append(dict(name=name, cmd=cmd, env=env, timeout=timeouts["tune"], log=str(out / "tune.log"), fatal=False))
        elif name == "tests":
            cmd = [py, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rs", "-p", "no:cacheprovider", "--durations=15"]
            steps.append(dict(name=name, cmd=cmd, env=env, timeout=timeouts["tests"], log=str(out / "tests.log"), fatal=False))
        elif name == "notebooks":
            prefixes = (("04",) if with_04 else ()) + GPU_NOTEBOOKS + (("08",) if with_08 else ())
            for p in prefixes:
                nb = _notebook(p)
                cmd = [py, "-m", "moe_lab", "gpu-suite", "--execute", nb, "--to", str(out / "notebooks" / Path(nb).name),
                       "--cell-timeout", str(timeouts["notebook"])]
                steps.append(dict(name=f"nb-{p}", cmd=cmd, env={**env, "MOE_LAB_MODE": "gpu", "COLD_TRITON_CACHE": "1"},
                                  timeout=timeouts["notebook"], log=str(out / f"nb-{p}.log"), fatal=False))
        elif name == "bench":
            cmd = [py, "-m", "moe_lab", "bench", "--record", "--no-progress", "--out", str(out / f"bench-{device_slug}.json"),
                   "--budget-s", str(max(30, timeouts["bench"] - 60))]
            steps.append(dict(name=name, cmd=cmd, env=env, timeout=timeouts["bench"], log=str(out / "bench.log"), fatal=False))
        else:
            raise ValueError(f"step={name!r}: expected one of {STEPS}")
    return steps


def run_step(step: dict, timeout: float) -> dict:
    """Run one step in its own process group, output to its log; kill the group at the time limit.
    A step whose env asks for COLD_TRITON_CACHE gets a fresh, empty Triton cache, removed afterwards."""
    t0 = time.perf_counter()
    env = {**os.environ, **step["env"]}
    cold = env.pop("COLD_TRITON_CACHE", None)
    cache_dir = tempfile.mkdtemp(prefix="triton-cold-") if cold else None
    if cache_dir:
        env["TRITON_CACHE_DIR"] = cache_dir
    try:
        with open(step["log"], "w") as log:
            log.write(f"$ {' '.join(step['cmd'])}\n# env: {step['env']}\n# time limit: {timeout:.0f} s\n\n")
            log.flush()
            proc = subprocess.Popen(step["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # this step's own process group, started above
                proc.wait()
                rc, status = None, f"timed out after {timeout:.0f} s"
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return dict(name=step["name"], status=status, returncode=rc, seconds=round(time.perf_counter() - t0, 1),
                log=step["log"], command=" ".join(step["cmd"]))


def archive(folder: Path, dest: Path) -> None:
    """Write folder as dest (.tar.gz) atomically, with the tables and records the steps wrote into the
    repository (data/kernel_tables/*.json, data/bench/*.json) under repo/."""
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for folder_name in ("kernel_tables", "bench"):  # the shipped folders, found by core.paths
            for path in sorted(paths.data_path(folder_name).glob("*.json")):
                tar.add(path, arcname=f"repo/data/{folder_name}/{path.name}")
    tmp.replace(dest)


# ----------------------------------------------------------------------------------------------
# Two steps that run inside this module: the smoke check and a notebook's execution
# ----------------------------------------------------------------------------------------------
def smoke() -> int:
    """Compile the expert kernels and compare them with the reference on small random problems."""
    import torch

    from moe_lab.kernels import config_table as CT  # Triton is optional; its interpreter is chosen first
    from moe_lab.kernels.moe import (experts_triton, moe_align,  # Triton is optional; its interpreter is chosen first
                                     moe_align_triton)

    failures = []
    t0 = time.perf_counter()
    g = torch.Generator(device="cuda").manual_seed(0)
    T, d, f, E, k = 300, 256, 192, 16, 4
    idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
    idx[::7, 0] = -1  # a few dropped assignments
    for a_, b_ in [(moe_align(idx, E, bm), moe_align_triton(idx, E, bm)) for bm in (16, 64)]:
        for name in ("counts", "offsets", "sorted_ids", "block_expert"):
            if not torch.equal(getattr(a_, name), getattr(b_, name)):
                failures.append(f"moe_align_triton {name} differs from moe_align")
    big = CT.KernelConfig(128, 128, 64, 16, 8, 3)
    forced = CT.Choice(128, {kk: (big if kk in CT.ROW_KERNELS else CT.KernelConfig(64, 64, 32, 1, 4, 3)) for kk in CT.KERNELS},
                       "smoke")
    for dtype, tol, choices in ((torch.bfloat16, 3e-2, (None, forced)), (torch.float32, 1e-4, (None,))):
        for choice in choices:  # forced: 128-row blocks, grouped order (its tiles are sized for 16-bit inputs)
            x = torch.randn(T, d, device="cuda", generator=g).to(dtype).requires_grad_()
            w = torch.rand(T, k, device="cuda", generator=g).requires_grad_()
            ws = [(torch.randn(*s, device="cuda", generator=g) / s[1] ** 0.5).to(dtype).requires_grad_()
                  for s in ((E, d, f), (E, d, f), (E, f, d))]
            dy = torch.randn(T, d, device="cuda", generator=g).to(dtype)
            y = experts_triton(x, idx, w, *ws, choice=choice)
            grads = torch.autograd.grad(y, [x, w, *ws], dy)
            leaves64 = [t.detach().double().requires_grad_() for t in (x, w, *ws)]
            y64 = experts_reference(leaves64[0], idx, leaves64[1], *leaves64[2:])
            grads64 = torch.autograd.grad(y64, leaves64, dy.double())
            for name, a_, r_ in zip(["y", "dx", "dw", "dw1", "dw3", "dw2"], [y, *grads], [y64, *grads64]):
                err = max_rel_diff(a_, r_, floor=1.0)
                if not err <= tol:
                    failures.append(f"{dtype} {'forced' if choice else 'table'} {name}: relative error {err:.2e} > {tol}")
    torch.cuda.synchronize()
    print(f"smoke: {len(failures)} failures in {time.perf_counter() - t0:.1f} s")
    for msg in failures:
        print("  FAIL", msg)
    return 1 if failures else 0


def execute_notebook(path: str, to: str, cell_timeout: float) -> int:
    """Execute a notebook top to bottom (nbclient), write the executed copy with its outputs to `to`,
    and return 0 when every cell ran, 1 when one raised (the copy then holds the error)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    src = ROOT / path
    nb = nbformat.read(src, as_version=4)
    client = NotebookClient(nb, timeout=int(cell_timeout), kernel_name="python3",
                            resources={"metadata": {"path": str(src.parent)}})
    t0 = time.perf_counter()
    rc = 0
    try:
        client.execute()
    except CellExecutionError as err:
        print(str(err)[-3000:])
        rc = 1
    finally:
        Path(to).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, to)
    print(f"{path}: {'ran' if rc == 0 else 'FAILED'} in {time.perf_counter() - t0:.1f} s -> {to}")
    return rc


def parse_args(argv: Optional[list] = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m moe_lab gpu-suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for logs, summary.json, executed notebooks and a copy of the bench record")
    ap.add_argument("--only", choices=STEPS, help="run one step")
    ap.add_argument("--with-tune", action="store_true", help="re-make this GPU's configuration table first")
    ap.add_argument("--with-04", action="store_true", help="also run notebook 04 (trains models: minutes)")
    ap.add_argument("--with-08", action="store_true", help="also run notebook 08 (GRPO at the gpu preset)")
    ap.add_argument("--budget-s", type=float, default=540, help="time limit of the whole call (default 540)")
    ap.add_argument("--archive", help="after every step, (re)write a .tar.gz of the --out folder here: a call "
                    "cut short still leaves what its finished steps wrote (a lent machine's $OUT, say)")
    for name in DEFAULT_TIMEOUT:
        ap.add_argument(f"--timeout-{name}", type=float, default=DEFAULT_TIMEOUT[name],
                        help=f"time limit of the {name} step{' (each notebook)' if name == 'notebook' else ''} "
                             f"(default {DEFAULT_TIMEOUT[name]})")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit (works without a GPU)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the smoke step itself
    ap.add_argument("--execute", help=argparse.SUPPRESS)  # a notebook step itself: the notebook
    ap.add_argument("--to", help=argparse.SUPPRESS)
    ap.add_argument("--cell-timeout", type=float, default=DEFAULT_TIMEOUT["notebook"], help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Every argument checked (an argparse error, exit 2, naming it); returns each step's time limit."""
    if not args.out:
        ap.error("--out DIR is required")
    if not args.budget_s > 0:
        ap.error(f"--budget-s {args.budget_s}: expected a positive number of seconds")
    timeouts = {n: getattr(args, f"timeout_{n}") for n in DEFAULT_TIMEOUT}
    bad = [n for n, v in timeouts.items() if not v > 0]
    if bad:
        ap.error(f"--timeout-{bad[0]} {timeouts[bad[0]]}: expected a positive number of seconds")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"argument --out: {args.out} is a file: expected a folder for the suite's logs and results")
    if args.only == "tune":
        args.with_tune = True
    return timeouts


def write_summary(out: Path, summary: dict, archive_to: Optional[str]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if archive_to:
        archive(out, Path(archive_to))


def run_steps(steps: list, out: Path, budget_s: float, archive_to: Optional[str], command: str) -> dict:
    """Run the steps one after another within the budget; a fatal step that fails stops the rest. The
    summary is rewritten (and the archive with it) after every step."""
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(machine.environment_record("cuda", command), steps=[])
    t_start = time.perf_counter()
    stop = None
    for s in steps:
        left = budget_s - (time.perf_counter() - t_start)
        if stop or left < 20:
            why = stop or "the suite's time budget is spent"
            summary["steps"].append(dict(name=s["name"], status=f"not run: {why}", returncode=None, seconds=0,
                                         log=None, command=" ".join(s["cmd"])))
            continue
        print(f"[{s['name']}] running (limit {min(s['timeout'], left):.0f} s), log: {s['log']}", flush=True)
        res = run_step(s, min(s["timeout"], left))
        print(f"[{s['name']}] {res['status']} in {res['seconds']} s", flush=True)
        summary["steps"].append(res)
        if s["fatal"] and res["status"] != "passed":
            stop = f"the {s['name']} step failed"
        write_summary(out, summary, archive_to)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    write_summary(out, summary, archive_to)
    return summary


def main(argv: Optional[list] = None) -> int:
    ap, args = parse_args(argv)
    if args.smoke:
        return smoke()
    if args.execute:
        if not args.to:
            ap.error("--execute needs --to")
        return execute_notebook(args.execute, args.to, args.cell_timeout)
    timeouts = check_args(ap, args)
    import torch

    out = Path(args.out).resolve()  # steps run from the repository root
    if not args.dry_run and not torch.cuda.is_available():
        print("python -m moe_lab gpu-suite needs a CUDA GPU and none is available here (torch.cuda.is_available() is "
              "False). On a CPU run `make test`, or `python -m moe_lab bench --quick`; `--dry-run` prints the steps.",
              file=sys.stderr)
        return 2
    slug = machine.slugify(machine.device_name("cuda")) if torch.cuda.is_available() else "gpu"
    steps = plan(out, args.only, args.with_04, timeouts, slug, with_08=args.with_08, with_tune=args.with_tune)
    if args.dry_run:
        for s in steps:
            print(f"[{s['name']}] (limit {s['timeout']:.0f} s, env {s['env']}) {' '.join(s['cmd'])}")
        return 0
    command = "python -m moe_lab gpu-suite " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = run_steps(steps, out, args.budget_s, args.archive, command)
    failed = [s["name"] for s in summary["steps"] if s["status"] != "passed"]
    print(f"all steps passed in {summary['seconds']} s" if not failed else f"failed or not run: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
