"""The one command line, `python -m moe_lab COMMAND` (moe_lab/__main__.py): every command it names
runs its module's main, every module with a `main` is named, and a wrong command is a usage error.

Run: .venv/bin/python -m pytest tests/test_command_line.py -q
"""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lab.__main__ import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_with_a_main_is_a_command():
    with_main = set()
    for path in (ROOT / "moe_lab").rglob("*.py"):
        if path.name == "__main__.py" and path.parent.name == "moe_lab":
            continue
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body):
            with_main.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert with_main == {module for module, _ in COMMANDS.values()}


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"lab"}))  # lab hands its flags to JupyterLab
def test_each_command_answers_help(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.main)
    with pytest.raises(SystemExit) as info:
        code = main([name, "--help"])
        raise SystemExit(code)
    assert info.value.code in (0, None)
    assert "usage: python -m moe_lab " + name in capsys.readouterr().out


def test_help_lists_every_command_and_a_wrong_one_is_a_usage_error(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert main([]) == 2


def test_python_dash_m_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "moe_lab", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "cpu-bench" in out.stdout
