"""Learner versions of the notebooks: every solution region replaced by a "your turn" stub.

Run `make exercises` (or `python -m moe_lab exercises`) after editing a notebook's py:percent
source; `python -m moe_lab exercises --check` only compares and exits with status 1, naming the
files that drifted. tests/commands/test_exercises.py regenerates them and compares with the committed ones.

The convention, inside a code cell of `notebooks/NN_name.py`:

    def rmsnorm(x, weight, eps=1e-5):
        # BEGIN SOLUTION
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        # END SOLUTION


    checks.check_rmsnorm(rmsnorm)

The markers are indented like the code they enclose; regions are never nested and never cross a
cell boundary, and the same cell or the next code cell calls a `checks.check_*` function. The
learner version (`notebooks/exercises/NN_name.ipynb`, no outputs) replaces each region with

        raise NotImplementedError("Your turn: rmsnorm — see the exercise above; checks.check_rmsnorm tells you what is wrong")

at the markers' indentation. The stub's name is the enclosing `def` (else the title of the
section the region sits in). A note cell at the top says where the learner version comes from,
and the Colab badge of the title cell points to the learner version.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jupytext
import nbformat

from moe_lab.commands.lab import LANGUAGE_INFO
from moe_lab.core import paths
from moe_lab.course import colab

ROOT = paths.repository() or paths.PACKAGE.parent  # a repository command: it works on a clone
NOTEBOOKS = ROOT / "notebooks"
OUT_DIR_NAME = "exercises"

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
_MARKER = re.compile(r"^(?P<indent>[ \t]*)# (?P<kind>BEGIN|END) SOLUTION[ \t]*$")
_LOOSE_MARKER = re.compile(r"(BEGIN|END)\s+SOLUTION")  # catches misspelt markers: "#BEGIN SOLUTION", "# END SOLUTION:"
_CELL = re.compile(r"^# %%(?P<rest>.*)$")
_DEF = re.compile(r"^(?P<indent>[ \t]*)def (?P<name>\w+)\(")
_HEADING = re.compile(r"^# #+ (?:\d+\.\s*)?(?P<title>.+)$")
_CHECK_CALL = re.compile(r"\bchecks\.(?P<name>check_\w+)\(")


class ExerciseMarkerError(ValueError):
    """A malformed solution region; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Region:
    """One solution region of a notebook's py:percent source (line numbers are 1-based)."""

    path: Path
    begin: int  # line of "# BEGIN SOLUTION"
    end: int  # line of "# END SOLUTION"
    indent: str  # the markers' indentation, which the stub keeps
    name: str  # what the stub calls the exercise
    checker: str  # the checks.check_* function that verifies it
    lines: tuple  # the solution lines between the markers

    def stub(self) -> str:
        return (f'{self.indent}raise NotImplementedError("Your turn: {self.name} — see the exercise above; '
                f'checks.{self.checker} tells you what is wrong")')


def _fail(path: Path, line: int, message: str) -> None:
    raise ExerciseMarkerError(f"{path}:{line}: {message}")


def _cells(lines: list[str]) -> list[tuple[int, int, str]]:
    """(first line index, end index exclusive, "code" or "markdown") of each py:percent cell."""
    starts = [(i, "markdown" if "[markdown]" in m.group("rest") else "code")
              for i, line in enumerate(lines) if (m := _CELL.match(line))]
    return [(s + 1, starts[j + 1][0] if j + 1 < len(starts) else len(lines), kind) for j, (s, kind) in enumerate(starts)]


def find_regions(path: Path, text: Optional[str] = None) -> list[Region]:
    """The solution regions of a py:percent notebook, validated; ExerciseMarkerError names file and line."""
    path = Path(path)
    lines = (path.read_text() if text is None else text).splitlines()
    cells = _cells(lines)
    regions = []
    title = path.stem
    for c, (start, stop, kind) in enumerate(cells):
        open_at: Optional[int] = None
        for i in range(start, stop):
            line = lines[i]
            m = _MARKER.match(line)
            if kind == "markdown":
                if (h := _HEADING.match(line)):
                    title = h.group("title").strip()
                if m or _LOOSE_MARKER.search(line):
                    _fail(path, i + 1, "a solution marker in a markdown cell: regions belong in code cells")
                continue
            if not m:
                if _LOOSE_MARKER.search(line):
                    _fail(path, i + 1, f"malformed solution marker {line.strip()!r}: write exactly {BEGIN!r} or {END!r} "
                                       f"on a line of its own")
                continue
            if m.group("kind") == "BEGIN":
                if open_at is not None:
                    _fail(path, i + 1, f"nested {BEGIN!r}: the region opened at line {open_at + 1} is not closed yet")
                open_at = i
                continue
            if open_at is None:
                _fail(path, i + 1, f"{END!r} without a {BEGIN!r} before it in this cell")
            indent = lines[open_at][: len(lines[open_at]) - len(lines[open_at].lstrip())]
            if m.group("indent") != indent:
                _fail(path, i + 1, f"{END!r} is indented differently from the {BEGIN!r} at line {open_at + 1}")
            body = tuple(lines[open_at + 1: i])
            if not any(b.strip() for b in body):
                _fail(path, open_at + 1, "an empty solution region")
            regions.append(Region(path, open_at + 1, i + 1, indent, _name(lines, open_at, indent, title),
                                  _checker(path, lines, cells, c, i), body))
            open_at = None
        if open_at is not None:
            _fail(path, open_at + 1, f"{BEGIN!r} is not closed by {END!r} in the same cell")
    return regions


def _name(lines: list[str], begin: int, indent: str, title: str) -> str:
    """The enclosing function's name, else the section title."""
    for j in range(begin - 1, -1, -1):
        if _CELL.match(lines[j]):
            break
        if (m := _DEF.match(lines[j])) and len(m.group("indent")) < len(indent):
            return m.group("name")
    return title.replace('"', "'")


def _checker(path: Path, lines: list[str], cells, c: int, end: int) -> str:
    """The first checks.check_* call after the region, in its cell or the next code cell."""
    candidates = [(end + 1, cells[c][1])]
    nxt = next(((s, e) for s, e, kind in cells[c + 1:] if kind == "code"), None)
    if nxt:
        candidates.append(nxt)
    for s, e in candidates:
        for i in range(s, e):
            if (m := _CHECK_CALL.search(lines[i])):
                return m.group("name")
    _fail(path, end + 1, "no checks.check_*(...) call after this region, in its cell or the next code cell: every "
                         "exercise needs a checker (moe_lab.course.checks)")


def learner_text(path: Path) -> str:
    """The learner version of a notebook's py:percent source, with every region replaced by its stub."""
    text = Path(path).read_text()
    lines = text.splitlines()
    regions = find_regions(path, text)
    for r in reversed(regions):
        lines[r.begin - 1: r.end] = [r.stub()]
    return "\n".join(lines) + "\n"


def _note(stem: str) -> str:
    return (f"**Learner version**: generated from [`../{stem}.ipynb`](../{stem}.ipynb) by `make exercises`; the "
            "solutions are in the original.\n\n"
            'Each exercise is a `raise NotImplementedError("Your turn: ...")` for you to replace. The '
            "`checks.check_...` call after it tests your code and says what is wrong: shape, values, or "
            "gradient. Cells that use an exercise you have not solved yet fail too.")


def learner_notebook(path: Path) -> nbformat.NotebookNode:
    """The learner notebook (nbformat 4.5, no outputs, fixed cell ids) of a notebook's py:percent source."""
    path = Path(path)
    parsed = jupytext.reads(learner_text(path), fmt="py:percent")
    solution_url = colab.notebook_url(f"notebooks/{path.stem}.ipynb")
    learner_url = colab.notebook_url(f"notebooks/{OUT_DIR_NAME}/{path.stem}.ipynb")
    cells = [nbformat.v4.new_markdown_cell(_note(path.stem))]
    for cell in parsed.cells:
        source = cell.source.replace(solution_url, learner_url) if cell.cell_type == "markdown" else cell.source
        new = nbformat.v4.new_markdown_cell if cell.cell_type == "markdown" else nbformat.v4.new_code_cell
        cells.append(new(source))
    for i, cell in enumerate(cells):
        cell["id"] = f"{path.stem[:2]}-{i:03d}"  # deterministic: regenerating gives the same bytes
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": dict(parsed.metadata.get("kernelspec", {})) or
                   {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                   "language_info": dict(LANGUAGE_INFO)}
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def render(path: Path) -> str:
    """The learner notebook as the exact text written to disk."""
    return nbformat.writes(learner_notebook(path), version=4) + "\n"


def sources(notebooks_dir: Path = NOTEBOOKS) -> list[Path]:
    """Every course notebook's py:percent source: notebooks/NN_*.py."""
    return sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.py"))


def with_language_info(ipynb: Path) -> str:
    """A solution notebook (as jupytext wrote it from its .py) with the kernel's language_info in its
    metadata (jupytext leaves it out), as the exact text to write."""
    nb = nbformat.read(ipynb, as_version=4)
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    return nbformat.writes(nb, version=4) + "\n"


def generate(notebooks_dir: Path = NOTEBOOKS, out_dir: Optional[Path] = None, check: bool = False) -> list[Path]:
    """Write (or, with check, only compare) every learner notebook, and the language_info of every
    solution notebook; returns the files that differed."""
    notebooks_dir = Path(notebooks_dir)
    out_dir = Path(out_dir) if out_dir is not None else notebooks_dir / OUT_DIR_NAME
    expected = {out_dir / f"{p.stem}.ipynb": render(p) for p in sources(notebooks_dir)}
    expected.update({p.with_suffix(".ipynb"): with_language_info(p.with_suffix(".ipynb"))
                     for p in sources(notebooks_dir) if p.with_suffix(".ipynb").is_file()})
    drifted = [p for p, text in expected.items() if not p.exists() or p.read_text() != text]
    stale = sorted(set(out_dir.glob("*.ipynb")) - set(expected)) if out_dir.exists() else []
    if not check:
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in drifted:
            p.write_text(expected[p])
        for p in stale:
            p.unlink()
    return drifted + stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lab exercises", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 naming the files that drifted")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="folder of the NN_*.py sources")
    args = parser.parse_args(argv)
    try:
        changed = generate(args.notebooks, check=args.check)
    except ExerciseMarkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = len(sources(args.notebooks))
    if args.check:
        if changed:
            print("notebooks out of date (learner versions, or a solution's language_info; run `make exercises`):\n  " + "\n  ".join(map(str, changed)),
                  file=sys.stderr)
            return 1
        print(f"{n} learner notebooks up to date")
        return 0
    print(f"{n} learner notebooks in {args.notebooks / OUT_DIR_NAME}: {len(changed)} written or removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
