"""`make lab`: JupyterLab on working copies of the notebooks, with kernels that share the machine well.

What `python -m moe_lab.lab` (the command behind `make lab`) does, and why:

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
   `runtime.setup()` warns when it came too late. `python -m moe_lab.lab --contention` measures
   the effect (training steps, alone and two processes at once, with and without the policy) with
   `moe_lab.cpu_bench`, which measures it for every back-end and thread count too.
3. **No news prompt.** A fresh JupyterLab asks whether to fetch news from the internet; the lab
   answers "no" once in this environment's settings (`share/jupyter/lab/settings/overrides.json`).

Command line:
    python -m moe_lab.lab [jupyter lab flags]      # what `make lab LAB_ARGS=...` runs
    python -m moe_lab.lab --prepare-only           # make the working copies, start nothing
    python -m moe_lab.lab --contention [--steps N]  # the benchmark of point 2 (moe_lab.cpu_bench)
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
WORKSPACE_NAME = "workspace"  # notebooks/workspace/: the learner's copies (ignored by git and by make test)
MANIFEST = ".sources.json"  # in the workspace: the hash of each original when it was copied
KERNEL_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # what every kernel the course starts should have
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
    """The notebook as copied: the same cells, without jupytext's pairing (a save writes no .py)."""
    nb = json.loads(original.read_text(encoding="utf-8"))
    nb.get("metadata", {}).pop("jupytext", None)
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


# ---- the contention benchmark: now part of `python -m moe_lab.cpu_bench` -------------------------
def contention_argv(steps: int = 20, out: Optional[str] = None) -> list[str]:
    """cpu_bench's arguments for what `--contention` measured: the cpu preset's MoE (its own back-end)
    with torch's default thread count, each wait policy, one process alone and two at once."""
    import torch

    from moe_lab.config import preset

    return ["--threads", str(torch.get_num_threads()), "--models", preset("cpu").moe.moe.backend,
            "--steps", str(steps), "--out", out or str(ROOT / "runs" / "contention.json")]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--contention" in argv:  # the benchmark of point 2, measured by moe_lab.cpu_bench
        from moe_lab import cpu_bench

        steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 20
        return cpu_bench.main(contention_argv(steps))
    workspace = NOTEBOOKS / WORKSPACE_NAME
    report = prepare_workspace(NOTEBOOKS, workspace)
    print(describe(report, workspace))
    if "--prepare-only" in argv:
        return 0
    silence_news()
    return subprocess.call(lab_command(workspace, argv), env=kernel_env(), cwd=workspace)


if __name__ == "__main__":
    raise SystemExit(main())
