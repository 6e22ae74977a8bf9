"""A killed run leaves nothing: a launch() or run_torchrun() whose caller is killed outright (SIGKILL to
its whole process group, as Jupyter and nbval stop a kernel, or to the caller alone) stops its ranks,
its forkserver, its resource tracker and torchrun's workers, and removes its moe_lab_launch_* or
moe_lab_torchrun_* folder and multiprocessing's pymp-* one.

Each test runs a caller in a private TMPDIR, kills it while its ranks run, then waits for that
TMPDIR to be empty and for no process to be left that runs with it. Linux only (the processes are
found in /proc). Heavy (a torch import per process): run under the shared lock.

Run: .venv/bin/python -m pytest tests/distributed/test_killed_runs.py -q
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes in /proc (Linux)")

ROOT = Path(__file__).resolve().parents[2]

LAUNCH = textwrap.dedent("""
    import sys
    from moe_lab.distributed import launch
    from moe_lab.distributed.workers import sleep_on_every_rank

    if __name__ == "__main__":
        launch(sleep_on_every_rank, 2, 600.0, sys.argv[1], timeout=900)
""")

TORCHRUN = textwrap.dedent("""
    from moe_lab.distributed.launch import run_torchrun

    if __name__ == "__main__":
        # the issue's run: its ranks are killed as soon as they start
        run_torchrun(2, "--tokens", "60000", "--d-model", "256", "--d-expert", "512", timeout=900)
""")


def processes_with_tmpdir(tmpdir: Path) -> dict:
    """{pid: command line} of the live processes whose TMPDIR is tmpdir or a folder in it."""
    found, mark = {}, f"TMPDIR={tmpdir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # ended, waiting to be reaped
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except (OSError, IndexError):
            continue
        if any(v == mark or v.startswith(mark + b"/") for v in env):
            found[int(entry)] = cmd
    return found


def torchrun_workers(tmpdir: Path) -> list:
    """pids of torchrun's workers (LOCAL_RANK set) running with a TMPDIR in tmpdir."""
    pids = []
    for pid in processes_with_tmpdir(tmpdir):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(v.startswith(b"LOCAL_RANK=") for v in f.read().split(b"\0")):
                    pids.append(pid)
        except OSError:
            pass
    return pids


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.1)


def run_and_kill(tmp_path: Path, script: str, args: list, started, whom: str) -> tuple:
    """Run script in a private TMPDIR (its own process group), wait for started(), kill it (`whom`:
    "group" or "caller"), then wait for what it left to go. Returns (what was running just before the
    kill, what the TMPDIR held then)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    caller = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, start_new_session=True,
                              env={**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: started() or caller.poll() is not None, 240, lambda: "the run never started")
        assert caller.poll() is None, caller.stderr.read().decode()
        running, held = processes_with_tmpdir(tmpdir), sorted(p.name for p in tmpdir.iterdir())
        if whom == "group":
            os.killpg(caller.pid, signal.SIGKILL)  # as Jupyter's "shut down now" and nbval do
        else:
            caller.kill()  # the caller alone
        caller.wait()
        wait_for(lambda: not processes_with_tmpdir(tmpdir), 60,
                 lambda: f"still running 60 s after the kill: {processes_with_tmpdir(tmpdir)}")
        wait_for(lambda: not any(tmpdir.iterdir()), 10,
                 lambda: f"left in TMPDIR: {sorted(p.name for p in tmpdir.iterdir())}")
    finally:
        for pid in processes_with_tmpdir(tmpdir):  # whatever the test failed to see stopped
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    return running, held


@pytest.mark.slow
@pytest.mark.parametrize("whom", ["group", "caller"])
def test_a_killed_launch_stops_its_ranks_and_removes_its_folders(tmp_path, whom):
    started_in = tmp_path / "started"
    started_in.mkdir()
    running, held = run_and_kill(tmp_path, LAUNCH, [str(started_in)],
                                 lambda: len(list(started_in.iterdir())) == 2, whom)
    # what there was to clean: the caller, the forkserver, the ranks, the tracker; both folders
    assert len(running) >= 5, running
    assert any(n.startswith("moe_lab_launch_") for n in held) and any(n.startswith("pymp-") for n in held), held
    for rank_file in started_in.iterdir():
        pid = int(rank_file.read_text())
        assert not Path(f"/proc/{pid}").exists() or b") Z " in Path(f"/proc/{pid}/stat").read_bytes(), rank_file.name


@pytest.mark.slow
@pytest.mark.parametrize("whom", ["group", "caller"])
def test_a_killed_run_torchrun_stops_its_workers_and_removes_its_folder(tmp_path, whom):
    tmpdir = tmp_path / "tmp"
    running, held = run_and_kill(tmp_path, TORCHRUN, [], lambda: len(torchrun_workers(tmpdir)) == 2, whom)
    assert len(running) >= 4, running  # the caller, torchrun's agent, two workers
    assert [n for n in held if n.startswith("moe_lab_torchrun_")], held
