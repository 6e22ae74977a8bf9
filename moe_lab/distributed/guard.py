"""A guard that outlives a killed caller: it stops the processes a run started and removes its folder.

launch() and run_torchrun() start processes and make a temporary folder; when they end (normally,
with an error, on Ctrl-C) they stop the processes and remove the folder themselves. But a caller can
be killed outright: Jupyter's "shut down now" and nbval send SIGKILL to the kernel's whole process
group, and a SIGKILL to the kernel alone leaves its children running. No clean-up code runs then.

So each run starts a guard first: a small Python process of its own session (a signal to the
caller's process group does not reach it) that imports nothing but the standard library and reads
its instructions from a pipe whose write end only the caller holds:

    kill PID     on abandonment, SIGKILL this process (a rank of launch())
    term PID     on abandonment, SIGTERM this process (torchrun's agent, which then stops its
                 workers), and SIGKILL its process group if it is still there after a grace period
    done         the caller ended and cleaned up: exit

When the pipe closes without `done` (the caller died, however it died), the guard sends those
signals, waits for the processes to end, removes the folder, and exits. Linux and macOS; where a
guard cannot start, the run goes on without one.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Union

GRACE_S = 20.0  # how long a `term` process has to stop its children before its group is killed
WAIT_S = 10.0  # how long the guard waits for killed processes to end before removing the folder


class Guard:
    """The caller's side: start(folder), then kill(pid) / term(pid) for each process started, then done()."""

    def __init__(self, folder: Union[str, Path]):
        self.folder = str(folder)
        self._proc: Optional[subprocess.Popen] = None
        if os.name != "posix":
            return
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), self.folder], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except OSError:
            self._proc = None

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):  # the guard is gone: nothing to tell it
            pass

    def kill(self, pid: int) -> None:
        """On abandonment, SIGKILL pid."""
        self._send(f"kill {int(pid)}")

    def term(self, pid: int) -> None:
        """On abandonment, SIGTERM pid (it stops its own children), then SIGKILL its group after GRACE_S."""
        self._send(f"term {int(pid)}")

    def done(self) -> None:
        """The caller ended and cleaned up itself: the guard exits (and is reaped)."""
        if self._proc is None:
            return
        self._send("done")
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


# --------------------------------------------------------------------------------------------------
# The guard process (run as a script: standard library only, no moe_lab or torch)
# --------------------------------------------------------------------------------------------------
def _running(pid: int) -> bool:
    """Whether pid is a process that has not ended (a zombie nobody reaps counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(pids: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _serve(folder: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    kills, terms = [], []
    for line in sys.stdin.buffer:
        word, _, arg = line.decode(errors="replace").strip().partition(" ")
        if word == "done":
            return
        if word in ("kill", "term") and arg.isdigit():
            (kills if word == "kill" else terms).append(int(arg))
    # the pipe closed without `done`: the caller was killed
    for pid in kills:
        _signal(pid, signal.SIGKILL)
    for pid in terms:
        _signal(pid, signal.SIGTERM)
    _wait(terms, GRACE_S)
    for pid in terms:
        if _running(pid):
            _signal(pid, signal.SIGKILL, group=True)
            _signal(pid, signal.SIGKILL)
    _wait(kills + terms, WAIT_S)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    _serve(sys.argv[1])
