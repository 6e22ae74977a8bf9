"""build_stdlib_corpus checks its output path first and writes atomically: a folder, a path under a file or a
read-only folder is an error naming it, and no temporary file is left behind.

Run: .venv/bin/python -m pytest tests/data/test_reliability_corpus.py -q
"""
import os
from pathlib import Path

import pytest

import moe_lab.core.files as files
from moe_lab.core.files import OutputPathError
from moe_lab.data import corpus


def _tmp_left(folder: Path) -> list:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_an_existing_folder_is_named_and_nothing_is_left(tmp_path):
    out = tmp_path / "c.txt"
    out.mkdir()
    with pytest.raises(OutputPathError, match=r"c\.txt: is a folder"):
        corpus.build_stdlib_corpus(out, 2000)
    assert _tmp_left(tmp_path) == []  # <name>.<pid>.tmp was left


def test_a_path_under_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, so no folder can be made there"):
        corpus.build_stdlib_corpus(tmp_path / "f" / "c.txt", 2000)


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, m, *a, **k: False if Path(p) == tmp_path else real(p, m, *a, **k))
    with pytest.raises(OutputPathError, match="is not writable"):
        corpus.build_stdlib_corpus(tmp_path / "c.txt", 2000)


def test_a_folder_made_after_the_check_leaves_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "c.txt"
    check = corpus.check_output_path

    def check_then_block(path, *a, **k):
        result = check(path, *a, **k)
        out.mkdir()
        return result

    monkeypatch.setattr(corpus, "check_output_path", check_then_block)
    with pytest.raises(IsADirectoryError):
        corpus.build_stdlib_corpus(out, 2000)
    assert _tmp_left(tmp_path) == []


def test_a_good_path_still_gets_the_corpus(tmp_path):
    out = corpus.build_stdlib_corpus(tmp_path / "sub" / "c.txt", 2000)
    text = out.read_text(encoding="ascii")
    assert 0 < len(text) <= 2000 and text.startswith("# ==== ") and _tmp_left(tmp_path) == []


@pytest.mark.parametrize("chars", ["0", "-5", "x"])
def test_the_command_names_a_bad_chars(chars, capsys, monkeypatch):
    monkeypatch.setattr(corpus, "build_stdlib_corpus", lambda *a, **k: pytest.fail("built despite a bad --chars"))
    with pytest.raises(SystemExit) as info:
        corpus.main(["--build", "--chars", chars])
    assert info.value.code == 2 and "argument --chars" in capsys.readouterr().err


def test_the_command_checks_the_corpus_file_before_building(tmp_path, capsys, monkeypatch):
    (tmp_path / "python_stdlib.txt").mkdir()
    monkeypatch.setattr(corpus, "corpus_path", lambda name="python_stdlib": tmp_path / "python_stdlib.txt")
    monkeypatch.setattr(corpus, "build_stdlib_corpus", lambda *a, **k: pytest.fail("built despite a bad path"))
    with pytest.raises(SystemExit) as info:
        corpus.main(["--build"])
    assert info.value.code == 2 and "the corpus file:" in capsys.readouterr().err
