"""`make lab`: JupyterLab on working copies of the notebooks, with kernels that share the machine well.

What `python -m moe_lab lab` (the command behind `make lab`) does, and why:

1. **Working copies.** The course's notebooks are tracked files: `make test` checks that they carry
   no outputs and equal their `py:percent` sources, and that the learner versions equal what
   `make exercises` writes. A learner who saves a notebook would break all three. So the lab opens
   `notebooks/workspace/` (not tracked; `.gitignore`), which holds a copy of every notebook (solutions
   at the top, learner versions in `exercises/`). A copy is made once and never overwritten: your
   work stays yours. When the course changes a notebook after your copy was made, the command says
   so; delete (or rename) your copy and run `make lab` again to get the new one.
2. **Kernels that do not stall each other.** Each kernel's torch runs OpenMP threads. By default
   they *spin* while waiting for work, so two kernels computing at once on a small machine steal
   each other's cores and both crawl (a training step 30x slower on 2 cores). With
   `OMP_WAIT_POLICY=PASSIVE` waiting threads sleep instead. The policy is read once, when torch
   loads its OpenMP library, so it must be in the environment before `import torch`: the lab sets
   it for its kernels, `import moe_lab` sets it too (if torch is not imported yet) and
   `runtime.setup()` warns when it came too late. `python -m moe_lab lab --contention` measures
   the effect (training steps, alone and two processes at once, with and without the policy).
3. **No news prompt.** A fresh JupyterLab asks whether to fetch news from the internet; the lab
   answers "no" once in this environment's settings (`share/jupyter/lab/settings/overrides.json`).

Command line:
    python -m moe_lab lab [jupyter lab flags]      # what `make lab LAB_ARGS=...` runs
    python -m moe_lab lab --prepare-only           # make the working copies, start nothing
    python -m moe_lab lab --contention [--steps N] [--repeats R]  # the benchmark of point 2
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from moe_lab.core import paths

ROOT = paths.repository() or paths.PACKAGE.parent  # a repository command: it works on a clone
NOTEBOOKS = ROOT / "notebooks"
WORKSPACE_NAME = "workspace"  # notebooks/workspace/: the learner's copies (ignored by git and by make test)
MANIFEST = ".sources.json"  # in the workspace: the hash of each original when it was copied
KERNEL_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # what every kernel the course starts should have
# What a Python kernel writes into a notebook's metadata when the notebook opens (ipykernel's
# kernel_info reply). The tracked notebooks carry it, the version left out (it is the learner's Python's);
# a working copy gets this Python's version too: JupyterLab finds nothing to change and the freshly
# opened copy is not "modified" before any edit. `make notebooks` writes it (moe_lab/commands/exercises.py).
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3"}
NEWS_OFF = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}


def kernel_env(env: Optional[dict] = None) -> dict:
    """A copy of env (default: this process's) with KERNEL_ENV added where not already set."""
    out = dict(os.environ if env is None else env)
    for key, value in KERNEL_ENV.items():
        out.setdefault(key, value)
    return out


def originals(notebooks: Path = NOTEBOOKS) -> list[Path]:
    """The course's tracked notebooks: NN_*.ipynb and exercises/NN_*.ipynb, relative to notebooks/."""
    found = sorted(notebooks.glob("[0-9][0-9]_*.ipynb")) + sorted(notebooks.glob("exercises/[0-9][0-9]_*.ipynb"))
    return [p.relative_to(notebooks) for p in found]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def working_copy_text(original: Path) -> str:
    """The notebook as copied: the same cells, without jupytext's pairing (a save writes no .py), with
    the language_info this Python's kernel will report (so opening the copy changes nothing)."""
    nb = json.loads(original.read_text(encoding="utf-8"))
    nb.get("metadata", {}).pop("jupytext", None)
    nb.setdefault("metadata", {})["language_info"] = {**LANGUAGE_INFO, "version": platform.python_version()}
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def prepare_workspace(notebooks: Path = NOTEBOOKS, workspace: Optional[Path] = None) -> dict:
    """Copy every tracked notebook into the workspace unless a copy exists; never overwrite one.

    Returns {"copied": [...], "kept": [...], "outdated": [...]} of paths relative to the workspace;
    "outdated" lists kept copies whose original changed since they were made."""
    notebooks = Path(notebooks)
    workspace = Path(workspace) if workspace is not None else notebooks / WORKSPACE_NAME
    if not notebooks.is_dir():
        raise FileNotFoundError(f"prepare_workspace: notebooks={notebooks} is not a folder")
    workspace.mkdir(parents=True, exist_ok=True)
    manifest_path = workspace / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    report = {"copied": [], "kept": [], "outdated": []}
    for rel in originals(notebooks):
        src, dst, key = notebooks / rel, workspace / rel, rel.as_posix()
        if dst.exists():
            report["kept"].append(key)
            if key in manifest and manifest[key] != _digest(src):
                report["outdated"].append(key)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_text(working_copy_text(src), encoding="utf-8")
        tmp.replace(dst)  # atomic: a copy is whole or absent
        manifest[key] = _digest(src)
        report["copied"].append(key)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return report


def silence_news(prefix: Optional[str] = None) -> Path:
    """Turn JupyterLab's news prompt off in this environment's settings overrides (merged, idempotent)."""
    path = Path(prefix or sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    settings = json.loads(path.read_text()) if path.exists() else {}
    for plugin, values in NEWS_OFF.items():
        settings.setdefault(plugin, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def lab_command(workspace: Path, extra_args: list[str]) -> list[str]:
    """The JupyterLab command line of `make lab`, serving the workspace."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={workspace}"]
    if hasattr(os, "getuid") and os.getuid() == 0:  # containers, some cloud VMs
        cmd.append("--allow-root")
    return cmd + list(extra_args)


def describe(report: dict, workspace: Path) -> str:
    lines = [f"JupyterLab serves your working copies in {workspace} "
             f"({len(report['copied'])} new, {len(report['kept'])} kept as you left them)."]
    for key in report["outdated"]:
        lines.append(f"  the course changed notebooks/{key} after your copy was made: delete or rename "
                     f"{workspace / key} and run make lab again to get the new version")
    return "\n".join(lines)


# ---- the contention benchmark -----------------------------------------------------------------
# torch is imported FIRST, before moe_lab (whose import would set OMP_WAIT_POLICY): the child runs
# with exactly the wait policy its environment gives it.
_STEP_CHILD = """
import sys, time, torch
from moe_lab.core.config import preset
from moe_lab.data import batch_fn, course_mixture
from moe_lab.model import Transformer
from moe_lab.training.loop import make_optimizer
steps = int(sys.argv[1])
p = preset("cpu")
torch.manual_seed(0)
model = Transformer(p.moe)
opt = make_optimizer(model, p.train)
batches = batch_fn(course_mixture(), p.train.batch_size, p.train.seq_len, seed=0)
times = []
for i in range(steps + 3):
    x, y, mask = batches("train")[:3]
    t0 = time.perf_counter()
    loss = model(x, y, mask)[1]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
times = sorted(times[3:])
print(1000 * times[len(times) // 2])
"""


def _run_children(n: int, steps: int, policy: Optional[str]) -> list[float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    procs = [subprocess.Popen([sys.executable, "-c", _STEP_CHILD, str(steps)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"contention child exited with {proc.returncode}")
        out.append(float(stdout.strip().splitlines()[-1]))
    return out


def contention_benchmark(steps: int = 20, policies=(None, "PASSIVE"), repeats: int = 1) -> list[dict]:
    """Median ms per training step of the cpu preset's MoE, one process alone and two at once, for
    each OpenMP wait policy (None = the library's default); the whole grid `repeats` times, so that
    a disturbance shows as disagreement between repeats."""
    rows = []
    for policy in [p for _ in range(repeats) for p in policies]:
        for n in (1, 2):
            t0 = time.perf_counter()
            ms = _run_children(n, steps, policy)
            rows.append({"OMP_WAIT_POLICY": policy or "(unset)", "processes": n, "ms_per_step": ms,
                         "wall_s": round(time.perf_counter() - t0, 1)})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--contention" in argv:
        steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 20
        repeats = int(argv[argv.index("--repeats") + 1]) if "--repeats" in argv else 1
        import torch

        rows = contention_benchmark(steps, repeats=repeats)
        print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads per process")
        for r in rows:
            print(f"OMP_WAIT_POLICY={r['OMP_WAIT_POLICY']:<9} {r['processes']} process(es) at once: "
                  + ", ".join(f"{ms:.0f}" for ms in r["ms_per_step"]) + " ms per step")
        out = ROOT / "runs" / "contention.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"cpus": os.cpu_count(), "torch": torch.__version__, "steps": steps, "rows": rows},
                                  indent=1) + "\n")
        print(f"written to {out}")
        return 0
    workspace = NOTEBOOKS / WORKSPACE_NAME
    report = prepare_workspace(NOTEBOOKS, workspace)
    print(describe(report, workspace))
    if "--prepare-only" in argv:
        return 0
    silence_news()
    return subprocess.call(lab_command(workspace, argv), env=kernel_env(), cwd=workspace)


if __name__ == "__main__":
    raise SystemExit(main())
