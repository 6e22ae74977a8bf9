"""The exercises: every notebook has 2-5 solution regions, each checked by a `checks.check_*` call;
`make exercises` (moe_lab.commands.exercises) turns them into learner notebooks that contain no solution and
one stub per region; the committed learner notebooks are exactly what it writes; malformed markers
fail with file:line; and in each notebook, every learner stub makes its checker say "not implemented yet".

Run: .venv/bin/python -m pytest tests/commands/test_exercises.py -q
"""
import linecache
import re
import shutil
from pathlib import Path

import matplotlib
import nbformat
import pytest

from moe_lab.course import checks, colab
from moe_lab.commands import exercises
from moe_lab.commands.exercises import ExerciseMarkerError, find_regions

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
LEARNER_DIR = NB_DIR / "exercises"
SOURCES = exercises.sources(NB_DIR)
ids = lambda p: p.name  # noqa: E731


def _learner(py: Path) -> nbformat.NotebookNode:
    return nbformat.read(LEARNER_DIR / f"{py.stem}.ipynb", as_version=4)


def test_every_notebook_source_is_found():
    assert {p.name[:2] for p in SOURCES} >= {"00", "01", "02", "03", "04", "05", "06", "09"}


# ---- the committed learner notebooks are what `make exercises` writes ----------------------------
def test_committed_learner_notebooks_are_regenerated_exactly(tmp_path):
    """Regenerate into a temporary folder: the same files, the same cells, the same bytes."""
    written = exercises.generate(NB_DIR, out_dir=tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{p.stem}.ipynb" for p in SOURCES)
    committed = sorted(p.name for p in LEARNER_DIR.glob("*.ipynb"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.ipynb")), \
        "notebooks/exercises/ has missing or extra files: run `make exercises`"
    for fresh in sorted(tmp_path.glob("*.ipynb")):
        old, new = nbformat.read(LEARNER_DIR / fresh.name, as_version=4), nbformat.read(fresh, as_version=4)
        assert [(c.cell_type, c.source) for c in old.cells] == [(c.cell_type, c.source) for c in new.cells], \
            f"notebooks/exercises/{fresh.name} differs from its solution notebook: run `make exercises`"
        assert (LEARNER_DIR / fresh.name).read_text() == fresh.read_text(), f"{fresh.name}: run `make exercises`"


def test_check_mode_names_drifted_files_and_writing_fixes_them(tmp_path, capsys):
    shutil.copy(NB_DIR / "02_transformer.py", tmp_path / "02_transformer.py")
    assert exercises.main(["--check", "--notebooks", str(tmp_path)]) == 1  # nothing generated yet
    assert "02_transformer.ipynb" in capsys.readouterr().err
    assert exercises.main(["--notebooks", str(tmp_path)]) == 0
    assert exercises.main(["--check", "--notebooks", str(tmp_path)]) == 0
    learner = tmp_path / "exercises" / "02_transformer.ipynb"
    learner.write_text(learner.read_text().replace("Your turn: rmsnorm", "Your turn: something else"))
    (tmp_path / "exercises" / "99_gone.ipynb").write_text("{}")  # a learner notebook whose source was deleted
    capsys.readouterr()
    assert exercises.main(["--check", "--notebooks", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "02_transformer.ipynb" in err and "99_gone.ipynb" in err
    assert learner.read_text().count("something else") == 1  # --check writes nothing
    exercises.main(["--notebooks", str(tmp_path)])
    assert "something else" not in learner.read_text() and not (tmp_path / "exercises" / "99_gone.ipynb").exists()


# ---- what a notebook's exercises must look like --------------------------------------------------
@pytest.mark.parametrize("py", SOURCES, ids=ids)
def test_two_to_five_exercises_each_checked_by_an_exported_checker(py):
    regions = find_regions(py)  # raises if a region has no checks.check_* call in its cell or the next code cell
    assert 2 <= len(regions) <= 5, f"{py.name} has {len(regions)} exercises; the course asks for 2 to 5"
    for r in regions:
        assert r.checker in checks.__all__, f"{py.name}:{r.begin}: checks.{r.checker} is not in moe_lab.course.checks.__all__"


@pytest.mark.parametrize("py", SOURCES, ids=ids)
def test_learner_version_has_one_stub_per_region_and_no_solution(py):
    regions = find_regions(py)
    nb = _learner(py)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    text = "\n".join(c.source for c in nb.cells)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    stubs = re.findall(r'raise NotImplementedError\("Your turn: (.+?) — see the exercise above; checks\.(check_\w+) ', code)
    assert stubs == [(r.name, r.checker) for r in regions]
    outside = set(exercises.learner_text(py).splitlines())  # every line the learner version keeps
    for r in regions:
        leaked = [ln for ln in r.lines if ln.strip() and ln not in outside and ln.strip() in code]
        assert not leaked, f"{py.name}:{r.begin}: solution text in the learner version: {leaked}"
        assert "\n".join(r.lines) not in code


@pytest.mark.parametrize("py", SOURCES, ids=ids)
def test_learner_version_says_what_it_is_and_opens_itself_in_colab(py):
    nb = _learner(py)
    assert nb.cells[0].cell_type == "markdown" and "Learner version" in nb.cells[0].source
    assert f"../{py.stem}.ipynb" in nb.cells[0].source and "make exercises" in nb.cells[0].source
    title = nb.cells[1].source
    assert colab.badge(f"notebooks/exercises/{py.stem}.ipynb") in title
    assert colab.notebook_url(f"notebooks/{py.stem}.ipynb") not in title
    for cell in nb.cells:
        assert not cell.get("outputs") and cell.get("execution_count") is None


# ---- malformed markers fail with file:line ----------------------------------------------------------
GOOD = "def f(x):\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION\n\n\nchecks.check_rmsnorm(f)\n"
BAD = {
    "unclosed": ("def f(x):\n    # BEGIN SOLUTION\n    return x\n\n# %%\nchecks.check_rmsnorm(f)\n", 6, "not closed"),
    "nested": ("def f(x):\n    # BEGIN SOLUTION\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION\n", 7, "nested"),
    "end without begin": ("def f(x):\n    return x\n    # END SOLUTION\n", 7, "without a"),
    "indented differently": ("def f(x):\n    # BEGIN SOLUTION\n    return x\n# END SOLUTION\n", 8, "indented differently"),
    "misspelt": ("def f(x):\n    #BEGIN SOLUTION\n    return x\n", 6, "malformed solution marker"),
    "empty": ("def f(x):\n    # BEGIN SOLUTION\n    # END SOLUTION\n", 6, "empty solution region"),
    "no checker": ("def f(x):\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION\n", 8, "no checks.check_"),
}
HEADER = "# %% [markdown]\n# ## 1. A title\n\n# %%\n"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_markers_raise_naming_file_and_line(case, tmp_path):
    body, line, message = BAD[case]
    path = tmp_path / "42_bad.py"
    path.write_text(HEADER + body)
    with pytest.raises(ExerciseMarkerError, match=rf"^{re.escape(str(path))}:{line}: .*{re.escape(message)}"):
        find_regions(path)
    assert exercises.main(["--check", "--notebooks", str(tmp_path)]) == 2  # the command line says so too


def test_a_marker_in_markdown_is_refused(tmp_path):
    path = tmp_path / "42_bad.py"
    path.write_text("# %% [markdown]\n# Some text\n# BEGIN SOLUTION\n\n# %%\n" + GOOD)
    with pytest.raises(ExerciseMarkerError, match=rf"{re.escape(str(path))}:3: .*markdown"):
        find_regions(path)


def test_stub_is_named_after_the_function_else_the_section(tmp_path):
    path = tmp_path / "42_ok.py"
    path.write_text(HEADER + GOOD + "\n# %% [markdown]\n# ## 2. Count the bytes\n\n# %%\n"
                    "# BEGIN SOLUTION\nn_bytes = 3 * 4\n# END SOLUTION\nchecks.check_matmul_flops(lambda m, n, k: n_bytes)\n")
    first, second = find_regions(path)
    assert (first.name, first.checker, first.indent) == ("f", "check_rmsnorm", "    ")
    assert (second.name, second.indent) == ("Count the bytes", "")
    text = exercises.learner_text(path)
    assert '    raise NotImplementedError("Your turn: f — see the exercise above; checks.check_rmsnorm tells you' in text
    assert '\nraise NotImplementedError("Your turn: Count the bytes — see the exercise above; checks.check_matmul_flops' in text
    assert "return x" not in text and "n_bytes = 3 * 4" not in text
    assert exercises.render(path) == exercises.render(path)  # deterministic


# ---- the stubs really fail their checkers, in their notebooks ---------------------------------------
def _run(source: str, ns: dict, name: str) -> None:
    """Execute a cell as Jupyter does: its source registered in linecache (Triton reads kernels' source)."""
    filename = f"<{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), ns)


@pytest.mark.slow
@pytest.mark.parametrize("py", SOURCES, ids=ids)
def test_every_learner_stub_fails_its_checker_as_not_implemented(py, tmp_path, monkeypatch):
    """Run the solution notebook in this process up to its last exercise (CI sizes). At each exercise,
    first run the learner's cell (and the next code cell when the checker call sits there) on a copy of
    the namespace: the checker must raise CheckFailed "not implemented yet". Then run the solution."""
    monkeypatch.setenv("MOE_LAB_FAST", "1")
    monkeypatch.chdir(tmp_path)  # anything a notebook writes lands here
    matplotlib.use("Agg")
    solution = [c.source for c in nbformat.read(py.with_suffix(".ipynb"), as_version=4).cells if c.cell_type == "code"]
    learner = [c.source for c in _learner(py).cells if c.cell_type == "code"]
    assert len(solution) == len(learner)
    exercise_cells = [i for i, (s, lr) in enumerate(zip(solution, learner)) if s != lr]
    assert 1 <= len(exercise_cells) <= len(find_regions(py))
    ns = {"__name__": "__main__"}
    for i, (sol, lrn) in enumerate(zip(solution, learner)):
        if i > exercise_cells[-1]:
            break
        if i in exercise_cells:
            trial = dict(ns)
            with pytest.raises(checks.CheckFailed, match="not implemented yet") as failure:
                _run(lrn, trial, f"{py.stem}-learner-{i}")
                if "checks.check_" not in lrn:  # the checker call is in the next code cell
                    _run(learner[i + 1], trial, f"{py.stem}-learner-{i + 1}")
            assert "Your turn" in str(failure.value)
        _run(sol, ns, f"{py.stem}-{i}")
    import matplotlib.pyplot as plt

    plt.close("all")


# ---- a cell that draws calls the learner's functions before it opens a figure ---------------------
FIGURE = re.compile(r"plt\.(subplots|figure)\(")


@pytest.mark.parametrize("py", SOURCES, ids=ids)
def test_plot_cells_call_exercise_functions_before_opening_a_figure(py):
    """With an exercise unsolved, its stub raises: a cell that had already opened a figure would
    then draw empty axes under the traceback (notebook 08's clipped-surrogate plot did)."""
    names = {r.name for r in find_regions(py)}
    for cell in _learner(py).cells:
        if cell.cell_type != "code" or not (m := FIGURE.search(cell.source)):
            continue
        after = cell.source[m.start():]
        called = sorted(n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}\(", after))
        assert not called, f"{py.name}: a cell opens a figure, then calls {called}: call them first"
