"""`python -m moe_lab cpu-bench`: what a learner on a CPU waits for, per expert back-end, thread count
and OpenMP wait policy, one process alone and two at once.

It times `moe_lab.training.loop.train_step` (forward, balance loss, backward, gradient clipping, AdamW, the
router-bias rule) on the cpu preset's MoE with every expert back-end that runs here (asked of
moe_lab.model.expert_backends) and on its dense twin (equal active parameters, `config.dense_twin`),
at batch 32 x 64, and reports the median of `--steps` steps after `--warmup` warm-up steps.

Why each (threads, wait policy) runs in its own processes: OpenMP reads OMP_WAIT_POLICY once, when
torch loads its library, so a process cannot try two policies. PASSIVE makes waiting threads sleep;
the library's default lets them spin a while first (fast alone, but two spinning processes on few
cores steal each other's cores: notebook 04 once ran 100x slower next to another notebook). Each
case also runs as two processes at once (the same work, started together, each model's timed
steps begun behind a shared barrier), which is what `python -m moe_lab lab --contention` measured.
A case whose steps run away (a stall) stops timing a model after `--model-budget-s` seconds, with
at least 3 steps, and the record says how many it timed.

    python -m moe_lab cpu-bench                              # the whole grid (a few minutes on 2 cores)
    python -m moe_lab cpu-bench --threads 1 --policies PASSIVE --no-pairs --steps 10
    python -m moe_lab cpu-bench --out runs/cpu.json --note "under the shared CPU lock"
    python -m moe_lab cpu-bench --table data/bench/cpu/<cpu>.json   # the README's table of a record

The record (default data/bench/cpu/<cpu>.json, written atomically) carries the CPU model and its
cores, the torch version, the date, the command, the git commit when there is one, and every row:
threads, wait policy, processes at once, model (backend name or "dense"), the median ms per step
of each process and the steps it timed. Measure on a quiet machine: on a shared one, take its lock
first (`flock LOCK python -m moe_lab cpu-bench ...`) and say so with --note.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from moe_lab.core import machine, paths
from moe_lab.core.config import preset
from moe_lab.core.files import check_output_path, write_record
from moe_lab.data import batch_fn, course_mixture
from moe_lab.model import Transformer, expert_backends as B
from moe_lab.training.loop import make_optimizer, train_step

POLICIES = ("PASSIVE", "default")  # OMP_WAIT_POLICY=PASSIVE, or unset (the OpenMP library's default: spin, then sleep)
DENSE = "dense"  # the model name of the dense twin in the rows

# The child imports torch FIRST, before moe_lab (whose import sets OMP_WAIT_POLICY=PASSIVE when it is
# unset): it then runs with exactly the wait policy its environment gives it.
_CHILD = "import sys, torch; from moe_lab.studies.cpu_bench import child_main; sys.exit(child_main(sys.argv[1]))"


# ---- one process: time train_step on each model ------------------------------------------------
def _barrier(folder: Optional[str], name: str, rank: int, n: int, timeout_s: float = 600.0) -> None:
    """Wait until all n processes reached the barrier `name` (files in a shared folder)."""
    if not folder or n < 2:
        return
    Path(folder, f"{name}.{rank}").touch()
    t0 = time.monotonic()
    while sum(Path(folder, f"{name}.{r}").exists() for r in range(n)) < n:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"barrier {name!r}: the other process never arrived in {timeout_s:.0f} s")
        time.sleep(0.002)


def time_steps(model_name: str, preset_name: str, batch: int, seq: int, steps: int, warmup: int,
               budget_s: float, sync=lambda: None) -> dict:
    """Median ms of `steps` train_step calls (after `warmup`) on the preset's MoE with back-end
    `model_name`, or on its dense twin when model_name == DENSE. Stops timing after budget_s seconds
    (at least 3 steps). `sync()` is called after the warm-up (a barrier between processes)."""
    import torch

    p = preset(preset_name)
    torch.manual_seed(0)
    model = Transformer(p.dense if model_name == DENSE else p.moe)
    if model_name != DENSE:
        model.set_backend(model_name)
    model.train()
    opt = make_optimizer(model, p.train)
    batches = batch_fn(course_mixture(), batch, seq, seed=0)
    for _ in range(warmup):
        train_step(model, batches("train"), opt, p.train.lr, p.train.grad_clip)
    sync()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        b = batches("train")
        t0 = time.perf_counter()
        train_step(model, b, opt, p.train.lr, p.train.grad_clip)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    times.sort()
    return {"ms": round(1000 * times[len(times) // 2], 2), "steps_timed": len(times),
            "ms_min": round(1000 * times[0], 2), "ms_max": round(1000 * times[-1], 2)}


def child_main(spec_json: str) -> int:
    """A measuring process (started by `run_case`): prints one JSON line with its rows."""
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    out = {"threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
           "models": {}}
    for name in spec["models"]:
        out["models"][name] = time_steps(
            name, spec["preset"], spec["batch"], spec["seq"], spec["steps"], spec["warmup"], spec["budget_s"],
            sync=lambda: _barrier(spec.get("barrier"), name, spec["rank"], spec["processes"]))
    print(json.dumps(out), flush=True)
    return 0


# ---- the grid: processes per (threads, policy), alone and in pairs -----------------------------
def child_env(threads: int, policy: str, env: Optional[dict] = None) -> dict:
    """The environment of a measuring process: OMP_NUM_THREADS and MOE_LAB_THREADS = threads, the wait
    policy set (PASSIVE) or removed ("default")."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: expected one of {POLICIES}")
    out = dict(os.environ if env is None else env)
    out["OMP_NUM_THREADS"] = out["MOE_LAB_THREADS"] = str(threads)
    out.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        out["OMP_WAIT_POLICY"] = policy
    return out


def run_case(models: list[str], threads: int, policy: str, processes: int, preset_name: str = "cpu",
             batch: int = 32, seq: int = 64, steps: int = 30, warmup: int = 5, budget_s: float = 20.0) -> list[dict]:
    """Start `processes` measuring processes at once with this thread count and wait policy; one row
    per model: {"threads", "policy", "processes", "model", "ms": [median per process], ...}."""
    with tempfile.TemporaryDirectory(prefix="cpu_bench_") as barrier:
        procs = []
        for rank in range(processes):
            spec = dict(models=models, preset=preset_name, batch=batch, seq=seq, steps=steps, warmup=warmup,
                        budget_s=budget_s, threads=threads, rank=rank, processes=processes, barrier=barrier)
            procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], env=child_env(threads, policy),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=paths.repository() or Path.cwd()))
        outs = []
        try:
            for proc in procs:
                stdout, stderr = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"measuring process (threads={threads}, policy={policy}) exited with "
                                       f"{proc.returncode}: {stderr.strip()[-600:]}")
                outs.append(json.loads(stdout.strip().splitlines()[-1]))
        finally:  # stopped or failed: no measuring process outlives the bench
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    rows = []
    for name in models:
        per = [o["models"][name] for o in outs]
        rows.append({"threads": threads, "policy": policy, "OMP_WAIT_POLICY": outs[0]["OMP_WAIT_POLICY"],
                     "processes": processes, "model": name, "ms": [r["ms"] for r in per],
                     "steps_timed": [r["steps_timed"] for r in per], "ms_min": [r["ms_min"] for r in per],
                     "ms_max": [r["ms_max"] for r in per]})
    return rows


def runnable_backends() -> tuple[list[str], dict]:
    """(back-ends to time on this CPU, {back-end: why not} for the others), from the registry: those
    that cannot run here, and those that run on a CPU only through an interpreter (timing Python,
    not the back-end), are left out with the reason."""
    skipped = {n: "runs on a CPU through an interpreter: its time would be Python's, not the back-end's"
               for n in B.names(cpu_interpreted=True)}
    for n in B.names(cpu_interpreted=False):
        why = B.status(n, "cpu")
        if why is not None:
            skipped[n] = why
    return [n for n in B.names() if n not in skipped], skipped


# ---- the record ---------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_out() -> Path:
    return paths.data_path("bench", "cpu", f"{machine.slugify(f'{cpu_model()} {os.cpu_count()} cores')}.json")


def check_out(path) -> Path:
    """The record's path, checked before any work: a ValueError naming it when it cannot be written
    (moe_lab.core.files.check_output_path, plus: a .json name, not a read-only file)."""
    try:
        path = check_output_path(path)
        check_output_path(path, suffix=".json")
    except ValueError as exc:
        raise ValueError(f"--out {str(path)!r}: {str(exc).split(': ', 1)[-1]}") from None
    if path.exists() and (not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222):
        raise ValueError(f"--out {str(path)!r}: the file is read-only")
    return path


def summarize(rows: list[dict]) -> list[dict]:
    """Per (threads, policy): each model's ms alone and with two processes at once (the mean of the
    two), the pair's slow-down, and each back-end's time over the dense model's. With repeats (rows
    with a "repeat" number), the lowest of the repeats' figures (on a shared machine, the least
    disturbed) and all of them ("alone_runs", "pair_runs") to show the spread."""
    out = []
    keys = sorted({(r["threads"], r["policy"]) for r in rows}, key=lambda k: (k[0], POLICIES.index(k[1])))
    for t, pol in keys:
        alone, pair = {}, {}
        for r in rows:
            if (r["threads"], r["policy"]) == (t, pol):
                runs = alone if r["processes"] == 1 else pair
                runs.setdefault(r["model"], []).append(round(sum(r["ms"]) / len(r["ms"]), 2))
        for m in dict.fromkeys(list(alone) + list(pair)):
            a, p = min(alone[m]) if m in alone else None, min(pair[m]) if m in pair else None
            row = {"threads": t, "policy": pol, "model": m, "alone_ms": a, "pair_ms": p,
                   "alone_runs": alone.get(m, []), "pair_runs": pair.get(m, [])}
            if a and p:
                row["pair_over_alone"] = round(p / a, 2)
            if m != DENSE and alone.get(DENSE) and a:
                row["over_dense"] = round(a / min(alone[DENSE]), 2)
            out.append(row)
    return out


def table(summary: list[dict]) -> str:
    lines = [f"{'threads':>7} {'policy':<8} {'model':<12} {'alone ms':>9} {'x dense':>8} {'2 at once ms':>13} {'x alone':>8}"]
    for r in summary:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"{r['threads']:>7} {r['policy']:<8} {r['model']:<12} {f(r['alone_ms'], '.1f'):>9} "
                     f"{f(r.get('over_dense'), '.2f'):>8} {f(r['pair_ms'], '.1f'):>13} {f(r.get('pair_over_alone'), '.2f'):>8}")
    return "\n".join(lines)


def markdown_table(record: dict) -> str:
    """The README's table, read from a record: per thread count and wait policy, each model's median ms
    alone (and over the dense model's), and with two processes at once (and over alone)."""
    head = ("| threads | OpenMP wait policy | model | ms per step, alone | x dense | ms per step, two processes at once "
            "| x alone |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in record["summary"]:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        pol = "PASSIVE" if r["policy"] == "PASSIVE" else "default (spin, then sleep)"
        lines.append(f"| {r['threads']} | {pol} | {r['model']} | {f(r['alone_ms'], '.1f')} | {f(r.get('over_dense'), '.2f')} "
                     f"| {f(r['pair_ms'], '.1f')} | {f(r.get('pair_over_alone'), '.2f')} |")
    m = record["machine"]
    lines.append(f"\n{m['cpu']} ({m['cores']} cores), torch {record['torch']}, {record['date'][:10]}, commit "
                 f"{record.get('commit')}; `{record['command']}`" + (f"; {record['note']}" if record.get("note") else ""))
    return "\n".join(lines)


def _csv(text: str, kind, what: str, allowed=None) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list for {what}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one value for {what}")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: {bad} not among {tuple(allowed)}")
    return values


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m moe_lab cpu-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts (default 1,2)")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma list from {POLICIES}")
    ap.add_argument("--models", default=None, help="comma list of back-ends and 'dense' (default: every back-end "
                    "that runs here, and dense)")
    ap.add_argument("--no-pairs", action="store_true", help="one process alone only (no two-at-once cases)")
    ap.add_argument("--preset", default="cpu", choices=("ci", "cpu", "gpu"), help="whose model (default cpu)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--model-budget-s", type=float, default=20.0, help="stop timing a model after this many "
                    "seconds, with at least 3 steps (default 20: a stalled case cannot run for hours)")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole grid this many times (default 1); the "
                    "summary keeps each case's lowest figure, the least disturbed on a shared machine, and all of them")
    ap.add_argument("--out", default=None, help="the JSON record (default data/bench/cpu/<cpu>.json)")
    ap.add_argument("--note", default="", help="the conditions, said in the record (e.g. 'under the shared CPU lock')")
    ap.add_argument("--table", metavar="RECORD", default=None, help="print the README's markdown table of a record "
                    "and exit (measures nothing)")
    args = ap.parse_args(argv)
    if args.table:
        return args
    try:
        args.threads = _csv(args.threads, int, "--threads")
        args.policies = _csv(args.policies, str, "--policies", POLICIES)
        args.models = _csv(args.models, str, "--models") if args.models else None
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    for name in ("batch", "seq", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name}: expected a whole number >= 1; got {getattr(args, name)}")
    if min(args.threads) < 1:
        ap.error(f"argument --threads: expected thread counts >= 1; got {args.threads}")
    if args.warmup < 0:
        ap.error(f"argument --warmup: expected a whole number >= 0; got {args.warmup}")
    if not args.model_budget_s > 0:
        ap.error(f"argument --model-budget-s: expected a number of seconds > 0; got {args.model_budget_s}")
    try:
        args.out = check_out(args.out or default_out())
    except ValueError as exc:
        ap.error(f"argument {exc}")
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    if args.table:
        try:
            print(markdown_table(json.loads(Path(args.table).read_text())))
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"--table {args.table!r}: not a cpu_bench record ({exc!r})") from None
        return 0
    import torch

    runnable, skipped = runnable_backends()
    if args.models:
        known = set(B.names()) | {DENSE}
        bad = [m for m in args.models if m not in known]
        if bad:
            raise SystemExit(f"--models: {bad} not among {B.names() + (DENSE,)}")
        notrun = [m for m in args.models if m in skipped]
        if notrun:
            raise SystemExit(f"--models: {notrun} cannot run in the bench's processes: "
                             + "; ".join(f"{m}: {skipped[m]}" for m in notrun))
        models = args.models
    else:
        models = runnable + [DENSE]
    argv_text = shlex.join(sys.argv[1:] if argv is None else argv)
    record = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": f"{platform.system()} {platform.machine()}"},
              "torch": torch.__version__, "python": platform.python_version(),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": f"python -m moe_lab cpu-bench {argv_text}".strip(), "commit": machine.git_commit(), "note": args.note,
              "what": f"moe_lab.training.loop.train_step on the {args.preset} preset's MoE (per back-end) and its dense twin, "
                      f"batch {args.batch} x {args.seq}, median ms of {args.steps} steps after {args.warmup} warm-up, "
                      f"the grid run {args.repeats} time(s); summary: the lowest of the repeats",
              "skipped": skipped, "partial": True, "rows": []}
    cases = [(rep, t, pol, n) for rep in range(args.repeats) for t in args.threads for pol in args.policies
             for n in ((1,) if args.no_pairs else (1, 2))]
    t_start = time.perf_counter()
    for i, (rep, t, pol, n) in enumerate(cases):
        t0 = time.perf_counter()
        rows = run_case(models, t, pol, n, args.preset, args.batch, args.seq, args.steps, args.warmup, args.model_budget_s)
        record["rows"] += [dict(r, repeat=rep) for r in rows]
        record["summary"] = summarize(record["rows"])
        write_record(record, args.out, quiet=True)  # after every case: a run stopped from outside keeps what it measured
        print(f"[{i + 1}/{len(cases)}] threads={t} policy={pol} processes={n} ({time.perf_counter() - t0:.0f} s): "
              + ", ".join(f"{r['model']} " + "/".join(f"{ms:.1f}" for ms in r["ms"]) + " ms" for r in rows), flush=True)
    record["partial"] = False
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_record(record, args.out)
    print(table(record["summary"]))
    if skipped:
        print("not measured: " + "; ".join(f"{m}: {why}" for m, why in skipped.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
