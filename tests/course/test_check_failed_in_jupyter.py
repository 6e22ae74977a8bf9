"""A failed check as a learner sees it in Jupyter: the message leads, the checker's internals are left out.

Run: .venv/bin/python -m pytest tests/course/test_check_failed_in_jupyter.py -q   (starts one kernel, ~10 s)
"""
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from moe_lab.course.checks.common import CheckFailed

WRONG_SCHEDULE = """from moe_lab.course import checks

def lr_schedule(step, cfg):
    return cfg.lr  # no warm-up, no decay

checks.check_lr_schedule(lr_schedule)
"""


def test_a_failed_check_leads_with_its_message_in_a_notebook(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(WRONG_SCHEDULE)])
    with pytest.raises(CellExecutionError):
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    error = next(o for o in nb.cells[0].outputs if o.output_type == "error")
    assert error.ename == "CheckFailed" and error.evalue.startswith("check_lr_schedule")
    shown = "\n".join(error.traceback)
    assert error.traceback[0].endswith(f"CheckFailed\x1b[0m: {error.evalue}"), error.traceback[0]
    assert "checks.check_lr_schedule(lr_schedule)" in shown  # where in the learner's cell
    assert "moe_lab/course/checks" not in shown and "wrapped" not in shown, shown


def test_the_rendering_keeps_only_frames_outside_the_package():
    def learner_cell():
        raise CheckFailed("check_x: the output is wrong")

    try:
        learner_cell()
    except CheckFailed as err:
        lines = err._render_traceback_()
    assert lines[0].endswith("CheckFailed\x1b[0m: check_x: the output is wrong")
    assert any("learner_cell()" in line for line in lines) and lines[2] == "called from:"
