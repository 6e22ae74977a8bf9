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
   the effect (training steps, alone and two processes at once, with and without the policy) with
   `python -m moe_lab cpu-bench`, which measures it for every back-end and thread count too.
3. **No news prompt.** A fresh JupyterLab asks whether to fetch news from the internet; the lab
   answers "no" once in this environment's settings (`share/jupyter/lab/settings/overrides.json`).

Command line:
    python -m moe_lab lab [jupyter lab flags]      # what `make lab LAB_ARGS=...` runs
    python -m moe_lab lab --prepare-only           # make the working copies, start nothing
    python -m moe_lab lab --contention [--steps N] [--repeats R] [--out PATH]  # point 2, by cpu-bench
"""
from __future__ import annotations

import argparse
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
from moe_lab.core.arguments import at_least_1, check_outputs
from moe_lab.core.config import preset
from moe_lab.core.files import atomic_write_text
from moe_lab.studies import cpu_bench

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


class WorkspaceError(OSError):
    """The workspace cannot hold the working copies: the message names the path, why, and what to do."""


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


def _check_workspace(workspace: Path) -> None:
    """A WorkspaceError unless the workspace is (or can be made) a folder we may write in."""
    if workspace.exists() and not workspace.is_dir():
        raise WorkspaceError(f"the workspace {workspace} is a file, not a folder: rename or remove it (your "
                             f"working copies live in that folder), then run make lab again")
    parent = next((p for p in [workspace, *workspace.absolute().parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise WorkspaceError(f"the workspace {workspace} cannot be made: {parent} is a file")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise WorkspaceError(f"the workspace {workspace} is not writable ({parent} is read-only): make it writable "
                             f"(e.g. chmod u+w {parent}) and run make lab again")


def _read_manifest(manifest_path: Path) -> tuple[dict, Optional[str]]:
    """(the manifest, None), or ({}, why) when it cannot be used (corrupt JSON, not a mapping of names to
    hashes, a folder): the caller rebuilds it."""
    if not manifest_path.exists() and not manifest_path.is_symlink():
        return {}, None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {}, f"{type(exc).__name__}: {exc}"
    if not isinstance(manifest, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest.items()):
        return {}, f"expected a JSON object of notebook names to hashes, found {type(manifest).__name__}"
    return manifest, None


def _rebuild_manifest(notebooks: Path, workspace: Path, manifest_path: Path, why: str) -> tuple[dict, str]:
    """A manifest for the copies that equal today's originals (the others are your edits or older
    versions: their origin is unknown, so they are never called outdated). The unusable manifest is
    moved aside, never deleted; no working copy is touched."""
    stamp, n = time.strftime('%Y%m%d-%H%M%S'), 0
    aside = manifest_path.with_name(f"{MANIFEST}.unreadable-{stamp}")
    while aside.exists() or aside.is_symlink():  # never over an earlier one (two in one second)
        n += 1
        aside = manifest_path.with_name(f"{MANIFEST}.unreadable-{stamp}-{n}")
    try:
        manifest_path.rename(aside)
    except OSError as exc:
        raise WorkspaceError(f"{manifest_path} cannot be read ({why}) nor moved aside ({exc}): move it away by hand "
                             f"(your working copies are not in it) and run make lab again") from None
    manifest, unknown = {}, []
    for rel in originals(notebooks):
        src, dst, key = notebooks / rel, workspace / rel, rel.as_posix()
        if not dst.is_file():
            continue
        if dst.read_text(encoding="utf-8", errors="replace") == working_copy_text(src):
            manifest[key] = _digest(src)
        else:
            unknown.append(key)
    note = (f"{manifest_path} could not be read ({why}): moved it to {aside.name} and rebuilt it; your working "
            f"copies are untouched. {len(manifest)} match the course's notebooks"
            + (f"; {len(unknown)} differ (your edits, or copies of an older version: compare them with notebooks/ "
               f"to see which): {', '.join(unknown)}" if unknown else "") + ".")
    return manifest, note


def prepare_workspace(notebooks: Path = NOTEBOOKS, workspace: Optional[Path] = None) -> dict:
    """Copy every tracked notebook into the workspace unless a copy exists; never overwrite one.

    Returns {"copied": [...], "kept": [...], "outdated": [...], "manifest": note or None} of paths
    relative to the workspace; "outdated" lists kept copies whose original changed since they were
    made. A manifest that cannot be read (corrupt, a folder) is moved aside and rebuilt, and "manifest"
    says so; a workspace that is a file or read-only is a WorkspaceError saying what to do."""
    notebooks = Path(notebooks)
    workspace = Path(workspace) if workspace is not None else notebooks / WORKSPACE_NAME
    if not notebooks.is_dir():
        raise FileNotFoundError(f"prepare_workspace: notebooks={notebooks} is not a folder")
    _check_workspace(workspace)
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        manifest_path = workspace / MANIFEST
        manifest, why = _read_manifest(manifest_path)
        report = {"copied": [], "kept": [], "outdated": [], "manifest": None}
        if why is not None:
            manifest, report["manifest"] = _rebuild_manifest(notebooks, workspace, manifest_path, why)
        for rel in originals(notebooks):
            src, dst, key = notebooks / rel, workspace / rel, rel.as_posix()
            if dst.exists():
                report["kept"].append(key)
                if key in manifest and manifest[key] != _digest(src):
                    report["outdated"].append(key)
                continue
            atomic_write_text(dst, working_copy_text(src))  # a copy is whole or absent
            manifest[key] = _digest(src)
            report["copied"].append(key)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    except WorkspaceError:
        raise
    except OSError as exc:  # a full disk, a folder where a copy should go, permissions changed meanwhile
        raise WorkspaceError(f"the workspace {workspace} could not be prepared: {exc}") from exc
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
    if report.get("manifest"):
        lines.append("  " + report["manifest"])
    for key in report["outdated"]:
        lines.append(f"  the course changed notebooks/{key} after your copy was made: delete or rename "
                     f"{workspace / key} and run make lab again to get the new version")
    return "\n".join(lines)


# ---- the contention benchmark: a case of `python -m moe_lab cpu-bench` --------------------------
def contention_argv(steps: int = 20, out: Optional[str] = None, repeats: int = 1) -> list[str]:
    """cpu-bench's arguments for what `--contention` measures: the cpu preset's MoE (its own back-end)
    with torch's default thread count, each wait policy, one process alone and two at once."""
    import torch  # only for this command: the lab itself never computes

    return ["--threads", str(torch.get_num_threads()), "--models", preset("cpu").moe.moe.backend,
            "--steps", str(steps), "--repeats", str(repeats), "--out", out or str(paths.runs_path("contention.json"))]


def contention_args(argv: list[str]) -> argparse.Namespace:
    """`lab --contention`'s arguments, every one checked before any child starts (status 2 naming it)."""
    ap = argparse.ArgumentParser(prog="python -m moe_lab lab --contention",
                                 description="ms per training step, one and two processes, per OpenMP wait policy")
    ap.add_argument("--contention", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=at_least_1, default=20, help="timed training steps per process (>= 1)")
    ap.add_argument("--repeats", type=at_least_1, default=1, help="times the whole grid runs (>= 1)")
    ap.add_argument("--out", default=str(paths.runs_path("contention.json")), help="the JSON record")
    args = ap.parse_args(argv)
    check_outputs(ap, {"--out": args.out})
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--contention" in argv:  # the benchmark of point 2, measured by cpu-bench
        args = contention_args(argv)
        return cpu_bench.main(contention_argv(args.steps, args.out, args.repeats))
    workspace = NOTEBOOKS / WORKSPACE_NAME
    try:
        report = prepare_workspace(NOTEBOOKS, workspace)
    except WorkspaceError as exc:
        print(f"python -m moe_lab lab: error: {exc}", file=sys.stderr)
        return 1
    print(describe(report, workspace))
    if "--prepare-only" in argv:
        return 0
    try:
        silence_news()
    except (OSError, ValueError) as exc:  # a read-only environment or a broken settings file: only a prompt
        print(f"note: could not switch JupyterLab's news prompt off ({exc}); answer it yourself", file=sys.stderr)
    return subprocess.call(lab_command(workspace, argv), env=kernel_env(), cwd=workspace)


if __name__ == "__main__":
    raise SystemExit(main())
