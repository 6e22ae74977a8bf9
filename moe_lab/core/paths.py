"""Where the course's files live, found one way from any working directory.

Shipped files (the checkpoint, the text corpus, recorded bench figures, study records, tuned kernel
tables) live in the repository's data/ folder. The package finds them beside itself in a clone (an
editable install, or Python started in the repository), and inside itself when installed as a wheel
(`pip install git+...`, as Colab's setup cell does): pyproject.toml installs data/ as
`moe_lab/_data/`. So a notebook opened alone on Colab has the same data as one in a clone.

Run outputs (a bench's JSON, a tuner's timings, a training run's checkpoint) go to `runs/`: the
clone's runs/ folder (git-ignored), or ./runs under the working directory where the package is
installed; MOE_LAB_RUNS names another folder.

    data_path("checkpoints", "moe_cpu.safetensors")   # a shipped file
    runs_path("bench", "cpu.json")                    # where a command writes by default
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parents[1]  # the moe_lab/ folder
SHIPPED = ("bench", "checkpoints", "corpus", "kernel_tables", "records")  # the folders of data/


def repository() -> Optional[Path]:
    """The clone the package runs from (its pyproject.toml and data/ beside moe_lab/), or None when
    the package is installed (a wheel in site-packages)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "data").is_dir() else None


def require_repository(command: str) -> Path:
    """The clone, or a RuntimeError naming the command that needs one (the repository's own commands:
    the lab, the exercise generator, the GPU suite)."""
    repo = repository()
    if repo is None:
        raise RuntimeError(f"{command} works on a clone of the repository (git clone, then make lab / make test); "
                           f"this moe_lab is installed at {PACKAGE} without one")
    return repo


def data_dir() -> Path:
    """The shipped files: data/ of the clone, or the copy installed inside the package."""
    repo = repository()
    return repo / "data" if repo is not None else PACKAGE / "_data"


def data_path(*parts: str) -> Path:
    """A shipped file or folder, e.g. data_path("bench") or data_path("records", "mla_vs_mha_cpu.json")."""
    if parts and parts[0] not in SHIPPED:
        raise ValueError(f"data_path({parts[0]!r}, ...): expected one of the shipped folders {SHIPPED}")
    return data_dir().joinpath(*parts)


def runs_dir() -> Path:
    """Where run outputs go: MOE_LAB_RUNS, else the clone's runs/, else ./runs."""
    override = os.environ.get("MOE_LAB_RUNS", "").strip()
    if override:
        return Path(override)
    repo = repository()
    return repo / "runs" if repo is not None else Path.cwd() / "runs"


def runs_path(*parts: str) -> Path:
    return runs_dir().joinpath(*parts)
