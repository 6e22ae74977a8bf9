"""`make lab` in a damaged place: an unreadable manifest is moved aside and rebuilt (the learner's copies
untouched), a workspace that is a file or read-only is a clear error saying what to do, and
`lab --contention` checks its arguments and output before starting any child.

Run: .venv/bin/python -m pytest tests/commands/test_reliability_lab.py -q
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

import moe_lab.core.files as files
from moe_lab.commands import lab


def _course(root: Path) -> Path:
    nbs = root / "notebooks"
    (nbs / "exercises").mkdir(parents=True)
    for rel, text in [("00_a.ipynb", "print('a')"), ("01_b.ipynb", "print('b')"), ("exercises/00_a.ipynb", "pass")]:
        (nbs / rel).write_text(nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(text)])))
    return nbs


@pytest.mark.parametrize("damage", ["corrupt", "a_list", "a_folder", "binary"])
def test_an_unreadable_manifest_is_rebuilt_and_no_copy_is_lost(damage, tmp_path):
    """A corrupt .sources.json (JSONDecodeError) or a folder (IsADirectoryError) stopped the lab for good."""
    nbs = _course(tmp_path)
    ws = nbs / "workspace"
    lab.prepare_workspace(nbs, ws)
    edited = ws / "01_b.ipynb"
    edited.write_text(edited.read_text().replace("print('b')", "print('my answer')"))
    manifest = ws / lab.MANIFEST
    manifest.unlink()
    if damage == "corrupt":
        manifest.write_text('{"00_a.ipynb": "ab')
    elif damage == "a_list":
        manifest.write_text("[1, 2]")
    elif damage == "a_folder":
        manifest.mkdir()
        (manifest / "something.txt").write_text("kept")
    else:
        manifest.write_bytes(b"\xff\xfe\x00")
    before = {p.relative_to(ws): p.read_bytes() for p in ws.rglob("*.ipynb")}
    report = lab.prepare_workspace(nbs, ws)
    assert {p.relative_to(ws): p.read_bytes() for p in ws.rglob("*.ipynb")} == before  # every copy as it was
    assert "could not be read" in report["manifest"] and "rebuilt it" in report["manifest"]
    assert "1 differ" in report["manifest"] and "01_b.ipynb" in report["manifest"]
    rebuilt = json.loads(manifest.read_text())
    assert sorted(rebuilt) == ["00_a.ipynb", "exercises/00_a.ipynb"]  # the edited copy: origin unknown
    aside = [p for p in ws.iterdir() if p.name.startswith(lab.MANIFEST + ".unreadable-")]
    assert len(aside) == 1  # moved aside, not deleted
    if damage == "a_folder":
        assert (aside[0] / "something.txt").read_text() == "kept"
    assert "could not be read" in lab.describe(report, ws)
    again = lab.prepare_workspace(nbs, ws)  # and the next start is an ordinary one
    assert again["manifest"] is None and again["outdated"] == []


def test_a_rebuilt_manifest_still_finds_outdated_copies(tmp_path):
    nbs = _course(tmp_path)
    ws = nbs / "workspace"
    lab.prepare_workspace(nbs, ws)
    (ws / lab.MANIFEST).write_text("not json")
    lab.prepare_workspace(nbs, ws)
    (nbs / "00_a.ipynb").write_text(nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])))
    assert lab.prepare_workspace(nbs, ws)["outdated"] == ["00_a.ipynb"]


def test_a_workspace_that_is_a_file_is_a_clear_error(tmp_path):
    nbs = _course(tmp_path)
    (nbs / "workspace").write_text("my notes")
    with pytest.raises(lab.WorkspaceError, match="workspace .* is a file, not a folder: rename or remove it"):
        lab.prepare_workspace(nbs, nbs / "workspace")
    assert (nbs / "workspace").read_text() == "my notes"


def test_a_read_only_workspace_is_a_clear_error(tmp_path, monkeypatch):
    nbs = _course(tmp_path)
    ws = nbs / "workspace"
    ws.mkdir()
    real = os.access
    monkeypatch.setattr(lab.os, "access", lambda p, mode, *a, **k: False if Path(p) == ws else real(p, mode, *a, **k))
    with pytest.raises(lab.WorkspaceError, match=r"is not writable .*read-only.*make it writable"):
        lab.prepare_workspace(nbs, ws)
    assert list(ws.iterdir()) == []


def test_a_write_that_fails_midway_is_a_workspace_error(tmp_path, monkeypatch):
    nbs = _course(tmp_path)
    ws = nbs / "workspace"
    write, calls = lab.atomic_write_text, []

    def disk_full_on_the_second(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        write(path, text)

    monkeypatch.setattr(lab, "atomic_write_text", disk_full_on_the_second)
    with pytest.raises(lab.WorkspaceError, match=r"workspace .* could not be prepared: .*No space left on device"):
        lab.prepare_workspace(nbs, ws)
    assert [p.name for p in ws.rglob("*.ipynb")] == ["00_a.ipynb"]  # the copy made before is whole
    monkeypatch.setattr(lab, "atomic_write_text", write)
    assert sorted(lab.prepare_workspace(nbs, ws)["copied"]) == ["01_b.ipynb", "exercises/00_a.ipynb"]


def test_main_reports_a_workspace_error_without_a_traceback(tmp_path, monkeypatch, capsys):
    nbs = _course(tmp_path)
    (nbs / "workspace").write_text("x")
    monkeypatch.setattr(lab, "NOTEBOOKS", nbs)
    monkeypatch.setattr(lab.subprocess, "call", lambda *a, **k: pytest.fail("started JupyterLab"))
    assert lab.main(["--prepare-only"]) == 1
    assert "python -m moe_lab lab: error: the workspace" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--steps", "abc"], "argument --steps: 'abc'"),  # ValueError
    (["--steps"], "argument --steps: expected one argument"),  # IndexError
    (["--steps", "0"], "argument --steps: 0"),  # 56 s, then RuntimeError
    (["--repeats", "-1"], "argument --repeats: -1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_contention_names_a_bad_argument_before_any_child(args, words, capsys, monkeypatch):
    monkeypatch.setattr(lab.cpu_bench, "main", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as info:
        lab.main(["--contention", *args])
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_contention_checks_its_output_before_any_child(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lab.cpu_bench, "main", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as info:
        lab.main(["--contention", "--out", str(tmp_path)])
    assert info.value.code == 2 and "argument --out:" in capsys.readouterr().err


def test_a_news_setting_that_cannot_be_written_does_not_stop_the_lab(tmp_path, monkeypatch, capsys):
    nbs = _course(tmp_path)
    monkeypatch.setattr(lab, "NOTEBOOKS", nbs)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lab, "silence_news", read_only)
    monkeypatch.setattr(lab.subprocess, "call", lambda *a, **k: 0)
    assert lab.main(["--no-browser"]) == 0
    assert "could not switch JupyterLab's news prompt off" in capsys.readouterr().err


def test_two_unreadable_manifests_in_one_second_are_both_kept(tmp_path):
    nbs = _course(tmp_path)
    ws = nbs / "workspace"
    lab.prepare_workspace(nbs, ws)
    (ws / lab.MANIFEST).write_text("{")
    lab.prepare_workspace(nbs, ws)
    (ws / lab.MANIFEST).unlink()
    (ws / lab.MANIFEST).mkdir()  # a folder this time: its rename must not land on the first one
    assert "rebuilt it" in lab.prepare_workspace(nbs, ws)["manifest"]
    assert len([p for p in ws.iterdir() if p.name.startswith(lab.MANIFEST + ".unreadable-")]) == 2
