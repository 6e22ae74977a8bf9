"""`make lab` (moe_lab.commands.lab): working copies that keep learners' work out of the tracked notebooks, a
learner's saved lab session that leaves `make test` green, the kernels' OpenMP wait policy, and the
news prompt switched off.

Run: .venv/bin/python -m pytest tests/commands/test_lab.py -q
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import torch

from moe_lab.commands import lab
from moe_lab.core.config import preset

ROOT = Path(__file__).resolve().parents[2]


def _notebook(text: str, jupytext: bool = True) -> str:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(text)])
    if jupytext:
        nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
    return nbformat.writes(nb)


def _fake_course(root: Path) -> Path:
    nbs = root / "notebooks"
    (nbs / "exercises").mkdir(parents=True)
    (nbs / "00_a.ipynb").write_text(_notebook("print('a')"))
    (nbs / "01_b.ipynb").write_text(_notebook("print('b')"))
    (nbs / "exercises" / "00_a.ipynb").write_text(_notebook("raise NotImplementedError('Your turn')"))
    (nbs / "notes.ipynb").write_text(_notebook("not a course notebook"))
    return nbs


def test_workspace_copies_every_notebook_once_and_never_overwrites(tmp_path):
    nbs = _fake_course(tmp_path)
    ws = nbs / lab.WORKSPACE_NAME
    first = lab.prepare_workspace(nbs)
    assert sorted(first["copied"]) == ["00_a.ipynb", "01_b.ipynb", "exercises/00_a.ipynb"]
    copy = nbformat.read(ws / "00_a.ipynb", as_version=4)
    assert "jupytext" not in copy.metadata  # saving a copy writes no paired .py
    # what this Python's kernel reports when the copy opens: JupyterLab has nothing to change in it
    assert copy.metadata.language_info == {**lab.LANGUAGE_INFO, "version": platform.python_version()}
    assert copy.cells[0].source == "print('a')"

    mine = _notebook("print('my answer')", jupytext=False)
    (ws / "00_a.ipynb").write_text(mine)  # the learner's work
    (nbs / "00_a.ipynb").write_text(_notebook("print('a, revised by the course')"))  # git pull
    (ws / "01_b.ipynb").unlink()  # a copy the learner deleted to get a fresh one
    second = lab.prepare_workspace(nbs)
    assert second["copied"] == ["01_b.ipynb"]
    assert second["outdated"] == ["00_a.ipynb"]
    assert (ws / "00_a.ipynb").read_text() == mine  # never overwritten
    assert "00_a.ipynb" in lab.describe(second, ws) and "run make lab again" in lab.describe(second, ws)
    with pytest.raises(FileNotFoundError, match="notebooks="):
        lab.prepare_workspace(tmp_path / "nope")


def _copy_repo(dst: Path) -> Path:
    """The files `make test`'s repository checks read: notebooks, README, configs, package, test_repo.py."""
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "workspace", "runs", "__pycache__")
    shutil.copytree(ROOT / "notebooks", dst / "notebooks", ignore=ignore)
    shutil.copytree(ROOT / "moe_lab", dst / "moe_lab", ignore=ignore)
    for name in ("README.md", "pyproject.toml", "environment.yml", "data/corpus/README.md", "data/kernel_tables/README.md"):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, dst / name)
    (dst / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_repo.py", dst / "tests" / "test_repo.py")
    return dst


def _tracked_bytes(repo: Path) -> dict:
    nbs = repo / "notebooks"
    return {p: p.read_bytes() for p in list(nbs.glob("[0-9][0-9]_*")) + list(nbs.glob("exercises/*.ipynb"))}


@pytest.mark.slow
def test_a_learner_who_saved_work_in_the_lab_still_gets_make_test_green(tmp_path):
    """A learner session as the lab's server runs it: open a working copy, write an answer, run it
    (outputs and execution counts), save, let JupyterLab write its checkpoint; plus an
    .ipynb_checkpoints/ folder with outputs left in notebooks/ by a lab opened there directly. Then
    the tracked notebooks are byte for byte the same, `make test`'s repository checks pass, and
    nbval collects only the course's notebooks."""
    from jupyter_server.services.contents.filemanager import FileContentsManager

    repo = _copy_repo(tmp_path / "repo")
    nbs = repo / "notebooks"
    before = _tracked_bytes(repo)
    lab.prepare_workspace(nbs)

    contents = FileContentsManager(root_dir=str(nbs / lab.WORKSPACE_NAME))  # what the lab's server uses
    model = contents.get("exercises/02_transformer.ipynb")
    nb = model["content"]
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.source += "\n# my answer"
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello from the learner\n")]
    contents.save({"type": "notebook", "format": "json", "content": nb}, "exercises/02_transformer.ipynb")
    contents.create_checkpoint("exercises/02_transformer.ipynb")
    saved = nbformat.read(nbs / lab.WORKSPACE_NAME / "exercises" / "02_transformer.ipynb", as_version=4)
    assert saved.cells[cell_index(saved)].outputs, "the learner's outputs were saved in the working copy"
    assert list((nbs / lab.WORKSPACE_NAME / "exercises" / ".ipynb_checkpoints").glob("*-checkpoint.ipynb"))

    stale = nbs / ".ipynb_checkpoints"  # from a lab once opened on notebooks/ itself
    stale.mkdir()
    shutil.copy(nbs / lab.WORKSPACE_NAME / "exercises" / "02_transformer.ipynb", stale / "02_transformer-checkpoint.ipynb")

    assert _tracked_bytes(repo) == before  # the course's files are untouched
    env = dict(os.environ, PYTHONPATH=str(repo))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_repo.py"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "--nbval-lax", "notebooks", "--ignore=notebooks/exercises"],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert collect.returncode == 0, collect.stdout[-3000:]
    files = {line.split("::")[0] for line in collect.stdout.splitlines() if "::" in line}
    assert files == {f"notebooks/{p.name}" for p in nbs.glob("[0-9][0-9]_*.ipynb")}, files


def cell_index(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")


def test_kernels_get_the_passive_wait_policy_unless_told_otherwise():
    assert lab.kernel_env({})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert lab.kernel_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"  # a choice is kept


@pytest.mark.parametrize("first, expected_policy, note", [
    ("import moe_lab", "PASSIVE", False),  # in time: torch loads after moe_lab
    ("import torch; import moe_lab", "", True),  # too late: torch's OpenMP already chose to spin
])
def test_import_moe_lab_sets_the_policy_while_it_still_counts(first, expected_policy, note):
    code = (f"{first}; import os; from moe_lab.core import runtime; "
            "print(repr(os.environ.get('OMP_WAIT_POLICY', ''))); print(runtime.omp_note() is not None)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    policy, has_note = out.stdout.split()
    assert policy == repr(expected_policy)
    assert has_note == str(note)


def test_news_prompt_is_switched_off_in_the_environment_settings(tmp_path):
    path = tmp_path / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"}}))
    assert lab.silence_news(str(tmp_path)) == path
    lab.silence_news(str(tmp_path))  # twice: the same file
    settings = json.loads(path.read_text())
    assert settings["@jupyterlab/apputils-extension:notification"] == {"fetchNews": "false", "checkForUpdates": False}
    assert settings["@jupyterlab/apputils-extension:themes"] == {"theme": "JupyterLab Dark"}  # others kept


def test_lab_command_serves_the_workspace():
    cmd = lab.lab_command(Path("/w"), ["--no-browser"])
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"] and "--ServerApp.root_dir=/w" in cmd
    assert cmd[-1] == "--no-browser"


def test_contention_is_measured_by_cpu_bench(monkeypatch):
    """`--contention` runs cpu_bench's grid for the cpu preset's MoE at torch's thread count: each wait
    policy (cpu_bench's default), alone and two at once (tests/test_cpu_bench.py checks those)."""
    from moe_lab.studies import cpu_bench

    seen = []
    monkeypatch.setattr(cpu_bench, "main", lambda argv: seen.append(argv) or 0)
    assert lab.main(["--contention", "--steps", "7"]) == 0
    (argv,) = seen
    args = cpu_bench.parse_args(argv)
    assert args.threads == [torch.get_num_threads()] and args.steps == 7 and not args.no_pairs
    assert args.models == [preset("cpu").moe.moe.backend] and set(args.policies) == {"PASSIVE", "default"}