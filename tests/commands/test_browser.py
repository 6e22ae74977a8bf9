"""The course in a real browser: JupyterLab started as `make lab` starts it, a notebook run in
headless Chromium through Playwright, every cell checked for errors, a widget seen on screen.

Run only this test: make test PYTEST_ARGS="-k browser"
                or: .venv/bin/python -m pytest -m browser tests/commands/test_browser.py -s
The screenshot goes to runs/browser/03_moe_layer.png (runs/ is not committed); its path is printed.

Needs Debian's `chromium` (/usr/bin/chromium, or the path in the CHROMIUM variable) and the
`playwright` package (the dev extra; its own browser download is never used). Without them the test
is skipped with the reason, except under CI (the CI variable set), where it fails: .ci/run installs
chromium, so a missing browser there is a broken set-up, not a reason to skip.

The notebooks are copied to a temporary folder and JupyterLab serves working copies of the copy, as
`make lab` does (moe_lab.commands.lab), so nothing the browser does (autosave included) can touch the
committed notebooks. It also checks that JupyterLab's news prompt is not on screen and that no widget
label is cut short. JupyterLab's configuration,
data, runtime and settings folders are temporary too; the widget extension is still found in the
virtual environment's share/jupyter, where pip put it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "03_moe_layer.ipynb"
SCREENSHOT = ROOT / "runs" / "browser" / "03_moe_layer.png"
# Flags that keep Chromium from calling home on a closed network (and let it run as root, without GPU).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on show (CSS)
START_TIMEOUT_S = 60  # JupyterLab answering
RUN_TIMEOUT_S = 120  # all cells executed (notebook 03 takes ~10 s under MOE_LAB_FAST=1)


def chromium_path() -> str | None:
    """$CHROMIUM when set (and nothing else), else /usr/bin/chromium or chromium on the PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"] if os.access(os.environ["CHROMIUM"], os.X_OK) else None
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")


def require_browser():
    """Skip (or, under CI, fail) with the reason when Chromium or Playwright is missing."""
    missing = []
    if chromium_path() is None:
        missing.append("Chromium (apt-get install chromium, or set CHROMIUM to its path)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if missing:
        why = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{why}; .ci/run installs Chromium before make test, so CI must have it")
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every process below pid (the lab's kernels), from /proc: {pid: its start time}, so that a
    pid the system has since given to another process is never mistaken for one of ours."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            fields = _stat(child)
            if fields:
                found[child] = fields[19]  # starttime, field 22 of stat
                todo.append(child)
    return found


def alive(pid: int, started: str) -> bool:
    """The process pid, started at `started`, still runs (a zombie has exited already)."""
    fields = _stat(pid)
    return bool(fields) and fields[19] == started and fields[0] != "Z"


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on a free port of 127.0.0.1, started as `make lab` starts it (moe_lab.commands.lab: the
    working copies of a copy of notebooks/, the kernels' environment, the news prompt off), stopped
    at the end whatever happened: (base URL, token, served folder, the server's process)."""
    from moe_lab.commands import lab as course_lab

    require_browser()
    course = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", course,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs", "__pycache__", "workspace"))
    served = course / course_lab.WORKSPACE_NAME
    course_lab.prepare_workspace(course, served)
    course_lab.silence_news()  # what make lab does: this environment's overrides.json
    home = tmp_path / "jupyter"
    env = course_lab.kernel_env(dict(os.environ))
    env.pop("MPLBACKEND", None)  # make test sets Agg; in the browser plots must render inline
    env.update(
        MOE_LAB_FAST="1",
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "lab-workspaces"),
    )
    # Render every cell, not only those in view, so the page can be checked cell by cell.
    tracker = home / "lab-settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    port, token = free_port(), secrets.token_hex(16)
    cmd = course_lab.lab_command(served, [
        "--no-browser", f"--port={port}", "--ServerApp.port_retries=0", "--ip=127.0.0.1",
        f"--IdentityProvider.token={token}", "--ServerApp.password=",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"])
    log_path = tmp_path / "jupyterlab.log"
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, cwd=served, env=env, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    kernels: dict[int, str] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token, served, server, kernels
    finally:
        kernels.update(descendants(server.pid))
        if server.poll() is None:
            server.terminate()  # SIGTERM: the server shuts its kernels down, then exits
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        for pid, started in kernels.items():  # anything the server left behind
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (port_open(port) or any(alive(*k) for k in kernels.items())):
            time.sleep(0.2)
        assert not port_open(port), f"port {port} still open after JupyterLab was stopped"
        assert not [p for p in kernels.items() if alive(*p)], "a kernel outlived JupyterLab"


def error_outputs(page) -> list[str]:
    """The text of every output that shows a Python error (a traceback) in the open notebook."""
    texts = page.locator(PANEL + " .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    return [t for t in texts if "Traceback" in t or re.search(r"^\w*(Error|Exception)\b", t, re.M)]


def prompts(page) -> list[str]:
    """The input prompt of every code cell: '[3]:' once run, '[*]:' while queued or running."""
    return [t.strip() for t in page.locator(PANEL + " .jp-CodeCell .jp-InputPrompt").all_inner_texts()]


def kernel_idle(base: str, token: str, name: str) -> bool:
    """The server says the kernel of notebook `name` has started and is idle."""
    with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as r:
        sessions = json.load(r)
    return any(s["path"].endswith(name) and s["kernel"]["execution_state"] == "idle" for s in sessions)


# How many characters of a code line JupyterLab shows in the open notebook without scrolling (the
# editor's width over the width of a character of its font): tests/test_repo.py keeps code lines within it.
VISIBLE_CHARACTERS_JS = """(panel) => {
  const scroller = document.querySelector(panel + ' .jp-CodeCell .cm-scroller');
  const line = scroller.querySelector('.cm-line');
  const style = getComputedStyle(line);
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = style.font;
  const gutters = scroller.querySelector('.cm-gutters');
  const room = scroller.clientWidth - (gutters ? gutters.offsetWidth : 0);
  return Math.floor((room - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)) / ctx.measureText('x').width);
}"""


def open_and_run_all(page, base: str, token: str, name: str, fail_fast: bool = True,
                     opened=None) -> list[str]:
    """Open notebook `name`, wait for its kernel, run all cells from the Run menu, wait until every
    code cell has an execution count and the kernel is idle. Returns the prompts. `opened(page)`, if
    given, is called once the kernel is idle, before anything runs."""
    # a workspace of its own per notebook: JupyterLab reopens nothing else in the page
    page.goto(f"{base}/lab/workspaces/{name.split('.')[0]}/tree/{name}?token={token}")
    page.locator(PANEL + " .jp-CodeCell").first.wait_for(timeout=60_000)
    indicator = page.locator(PANEL + " .jp-Notebook-ExecutionIndicator[data-status='idle']")
    # The page shows "idle" before its kernel exists; wait until the server agrees, for a second on end.
    deadline, steady = time.monotonic() + START_TIMEOUT_S, 0
    while steady < 4:
        steady = steady + 1 if indicator.count() and kernel_idle(base, token, name) else 0
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: the kernel did not become idle within {START_TIMEOUT_S} s")
        page.wait_for_timeout(250)
    if opened is not None:
        opened(page)
    for attempt in range(3):  # the menu, as a person would; again if the click came too early
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        started = time.monotonic() + 15
        while time.monotonic() < started and all(p == "[ ]:" for p in prompts(page)):
            page.wait_for_timeout(250)
        if not all(p == "[ ]:" for p in prompts(page)):
            break
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        shown = prompts(page)
        if shown and all(re.fullmatch(r"\[\d+\]:", p) for p in shown) and indicator.count():
            return shown
        errors = error_outputs(page) if fail_fast else []
        if errors:  # Run All stops at a failing cell: say why now rather than wait for the timeout
            raise AssertionError(f"{name}: a cell failed:\n{errors[0][-3000:]}")
        page.wait_for_timeout(500)
    raise AssertionError(f"{name}: not every cell ran within {RUN_TIMEOUT_S} s; prompts {prompts(page)}")


def test_notebook_runs_in_a_real_browser(lab):
    from playwright.sync_api import sync_playwright

    base, token, served, server, _ = lab
    # A notebook that must fail shows that errors are seen: the check below cannot pass by blindness.
    broken = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                         "source": "1 / 0"}],
              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
              "nbformat": 4, "nbformat_minor": 5}
    (served / "zz_broken.ipynb").write_text(json.dumps(broken))
    committed = (ROOT / "notebooks" / NOTEBOOK).read_bytes()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            open_and_run_all(page, base, token, "zz_broken.ipynb", fail_fast=False)
            seen = error_outputs(page)
            assert seen and "ZeroDivisionError" in seen[0], f"the error check missed 1 / 0: {seen}"

            assert page.get_by_text("Jupyter news").count() == 0, "JupyterLab's news prompt is on screen"
            seen_on_open = {}

            def on_open(pg):  # the working copy as opened, its kernel started, nothing run yet
                seen_on_open["dirty"] = pg.locator(".lm-TabBar-tab.jp-mod-dirty").count()
                seen_on_open["characters"] = pg.evaluate(VISIBLE_CHARACTERS_JS, PANEL)

            shown = open_and_run_all(page, base, token, NOTEBOOK, opened=on_open)
            # language_info written by `make notebooks`, its version by the lab: opening changes nothing
            assert seen_on_open["dirty"] == 0, "the working copy shows as modified as soon as it opened"
            print(f"\nJupyterLab at 1400 px shows {seen_on_open['characters']} characters of a code line")
            assert seen_on_open["characters"] >= 110, seen_on_open  # CODE_WIDTH of tests/test_repo.py
            assert len(descendants(server.pid)) >= 2, "expected the two notebooks' kernels under the server"
            errors = error_outputs(page)
            assert not errors, f"{NOTEBOOK}: cells show errors:\n" + "\n---\n".join(e[-1500:] for e in errors)
            counts = [int(p[1:-2]) for p in shown]
            assert len(counts) >= 10 and len(set(counts)) == len(counts), f"prompts {shown}"
            assert page.locator(PANEL + " .jp-OutputArea-output img").count() > 0, "no plot rendered"
            slider = page.locator(PANEL + " .jupyter-widgets .widget-slider").first
            slider.scroll_into_view_if_needed()
            assert slider.is_visible(), "the router explorer's sliders did not render"
            cut = page.evaluate("() => [...document.querySelectorAll('.widget-label')]"
                                ".filter(e => e.textContent && e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")
            assert not cut, f"widget labels cut short on screen: {cut}"
            page.wait_for_timeout(500)  # let the explorer's plot settle
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            print(f"\nscreenshot: {SCREENSHOT}")
        except BaseException:
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT.with_name("failure.png")))  # what the page showed
            print(f"\nscreenshot of the failure: {SCREENSHOT.with_name('failure.png')}")
            raise
        finally:
            browser.close()
    assert (ROOT / "notebooks" / NOTEBOOK).read_bytes() == committed  # the committed notebook is untouched
