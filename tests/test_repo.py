"""Repository hygiene: notebook pairs agree and carry no outputs, every notebook follows the course
template, and environment.yml does not drift from pyproject.toml.

Run: .venv/bin/python -m pytest tests/test_repo.py -q
"""
import re
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
PAIRS = sorted(p for p in NB_DIR.glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert len(PAIRS) >= 1


@pytest.mark.parametrize("py", PAIRS, ids=lambda p: p.name)
def test_ipynb_matches_its_py_percent_source(py):
    """`make notebooks` regenerates the .ipynb from the .py; this fails if someone edited only one."""
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `make notebooks`"
    src = jupytext.read(py)
    nb = nbformat.read(ipynb, as_version=4)
    a = [(c.cell_type, c.source.strip()) for c in src.cells]
    b = [(c.cell_type, c.source.strip()) for c in nb.cells]
    assert a == b, f"{ipynb.name} differs from {py.name}: run `make notebooks`"


@pytest.mark.parametrize("ipynb", sorted(NB_DIR.glob("**/*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{ipynb.name} carries outputs"


@pytest.mark.parametrize("py", PAIRS, ids=lambda p: p.name)
def test_notebook_follows_the_course_template(py):
    text = py.read_text()
    for needed in ("What you will learn", "Prerequisites", "Time to run", "## Summary", "## Papers",
                   "runtime.setup(", 'if "google.colab" in sys.modules'):
        assert needed in text, f"{py.name} lacks {needed!r}"
    assert re.search(r"# # \d\d · ", text), f"{py.name} needs a '# NN · Title' first line"


def test_environment_yml_wraps_pyproject():
    """environment.yml is python + pip + this package with its extras; no second list to drift."""
    env = (ROOT / "environment.yml").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = sorted(project["optional-dependencies"])
    m = re.search(r"-e \.\[([a-z,]+)\]", env)
    assert m, "environment.yml must install the package with `-e .[extras]`"
    assert sorted(m.group(1).split(",")) == extras
    py_min = re.search(r">=\s*(3\.\d+)", project["requires-python"]).group(1)
    assert f"python>={py_min}" in env
    # no package pinned twice: environment.yml lists only python and pip as conda dependencies
    deps_block = env.split("dependencies:", 1)[1]
    conda_deps = re.findall(r"^  - ([A-Za-z0-9_.\-]+)", deps_block, flags=re.M)
    assert {d.split(">")[0].split("=")[0] for d in conda_deps} == {"pip", "python"}


def test_torch_and_triton_are_not_pinned_above():
    """On Colab, installing the package must keep Colab's own torch and triton: lower bounds only."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "triton"):
        spec = next(d for d in deps if d.startswith(name)).split(";")[0]
        assert "<" not in spec and "==" not in spec, spec
    assert any("platform_system == 'Linux'" in d for d in deps if d.startswith("triton"))


@pytest.mark.parametrize("py", PAIRS, ids=lambda p: p.name)
def test_no_empty_cells(py):
    for cell in jupytext.read(py).cells:
        assert cell.source.strip(), f"{py.name} has an empty {cell.cell_type} cell"
