"""Run a function on N local processes joined in a torch.distributed group, from a notebook.

    results = launch(fn, world_size, *args, timeout=60)

starts `world_size` processes on this machine, joins them in a process group (gloo: CPU tensors)
that talks over 127.0.0.1 only, calls fn(rank, world_size, *args) on each and returns the list of
their return values, in rank order. It always ends:

- a rank that raises: the others are stopped at once (they may be waiting in a collective for the
  failed rank, forever) and RankFailedError names the rank, its exception and its traceback;
- a rank that never finishes: after `timeout` seconds every rank is stopped and TimeoutError names
  the ranks that were still running;
- the calling process killed outright (a notebook kernel shut down: SIGKILL to its process group, or
  to the kernel alone): a guard process of its own session (moe_lab.distributed.guard) kills the
  ranks and removes the temporary folder; the forkserver and multiprocessing's resource tracker then
  end by themselves, and forkserver_cleanup removes the forkserver's `pymp-*` folder.

How it works. The parent opens the rendezvous (a TCPStore on a port the OS picks, so two launches
never race for a port) and keeps it open until the end; each rank connects to it, runs fn and
writes its result, or its error, to a private temporary folder; the parent watches that folder and
the processes. Results travel as files written by torch.save, so tensors come back whole.

`fn` must be importable by a fresh process: a function defined in a .py module, not in a notebook
cell (moe_lab.distributed.workers holds the course's). In a script, call launch() under
`if __name__ == "__main__":`, as multiprocessing requires. On Linux and macOS the processes are forked
from a server that has imported torch and moe_lab once ('forkserver'), so a launch takes a fraction
of a second after the first; edits to moe_lab after that first launch are not seen until the
Python session restarts.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from moe_lab.distributed.guard import GRACE_S, Guard

HOST = "127.0.0.1"


class RankFailedError(RuntimeError):
    """A rank of launch() raised (or died); carries the rank, the exception's type and traceback."""

    def __init__(self, rank: int, world_size: int, fn_name: str, exc_type: str, message: str, remote_traceback: str):
        self.rank, self.world_size, self.exc_type, self.remote_traceback = rank, world_size, exc_type, remote_traceback
        super().__init__(f"rank {rank} of {world_size} failed in {fn_name}: {exc_type}: {message}\n"
                         f"--- traceback on rank {rank} ---\n{remote_traceback}")


def _check_importable(fn: Callable) -> None:
    qualname = getattr(fn, "__qualname__", "")
    module = getattr(fn, "__module__", None)
    if not callable(fn) or "<lambda>" in qualname or "<locals>" in qualname:
        raise ValueError(f"fn={fn!r}: expected a function defined at the top level of a module (not a lambda or "
                         f"a nested function): the new processes import it by name")
    main = sys.modules.get("__main__")
    if module == "__main__" and not getattr(main, "__file__", None):
        raise ValueError(f"fn={qualname} is defined in a notebook or an interactive session; the new processes "
                         f"cannot import it: define it in a .py module (moe_lab.distributed.workers holds the "
                         f"course's workers)")


def _loopback_interface() -> Optional[str]:
    """The name of the loopback network interface ('lo' on Linux, 'lo0' on macOS), if one is found."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    tmp = str(path) + ".tmp"
    write(tmp)
    os.replace(tmp, path)  # the parent never sees a half-written file


def _run_rank(fn: Callable, rank: int, world_size: int, port: int, backend: str, timeout: float, folder: str,
              args: tuple) -> None:
    """Body of one launched process: join the group, run fn, leave the result (or the error) in folder."""
    out = Path(folder)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # do not oversubscribe the cores
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and _loopback_interface():
            os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()  # keep the traffic on 127.0.0.1
        wait = timedelta(seconds=timeout)
        store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=wait)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=wait)
        result = fn(rank, world_size, *args)
        _write_atomically(out / f"rank{rank}.pt", lambda p: torch.save(result, p))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure, even SystemExit, must reach the parent
        record = {"time": time.time(), "type": type(exc).__name__, "message": str(exc),
                  "traceback": traceback.format_exc()}
        _write_atomically(out / f"rank{rank}.err", lambda p: Path(p).write_text(json.dumps(record)))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip interpreter shutdown, which could wait on a collective that never ends


def _context(start_method: Optional[str]):
    if start_method is None:
        start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method={start_method!r}: expected 'forkserver', 'spawn' or None")
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # imported once, by the server; forkserver_cleanup removes the server's pymp-* socket folder
        # when it ends, even after its parent (a notebook kernel) was killed
        ctx.set_forkserver_preload(["moe_lab.distributed.forkserver_cleanup", "torch", "moe_lab.distributed"])
    return ctx


def _stop(procs: list) -> None:
    """Terminate every process still alive, then kill those that ignore it."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _failure(folder: Path, world_size: int, fn_name: str) -> Optional[RankFailedError]:
    """The earliest error any rank recorded: later ones are usually other ranks losing their peer."""
    records = []
    for path in folder.glob("rank*.err"):
        record = json.loads(path.read_text())
        records.append((record["time"], int(path.stem[4:]), record))
    if not records:
        return None
    _, rank, r = min(records)
    return RankFailedError(rank, world_size, fn_name, r["type"], r["message"], r["traceback"])


def launch(fn: Callable, world_size: int, *args: Any, timeout: float = 60.0, backend: str = "gloo",
           start_method: Optional[str] = None) -> list:
    """Run fn(rank, world_size, *args) on `world_size` new processes in one process group.

    Returns [result of rank 0, result of rank 1, ...]. Raises RankFailedError when a rank raises or
    dies, TimeoutError when the ranks have not all finished after `timeout` seconds; in both cases
    every rank has been stopped. Results and args must be picklable (return detached tensors).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: expected an integer >= 1")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout={timeout!r}: expected a number of seconds > 0")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: expected 'gloo' (CPU) or 'nccl' (one GPU per rank)")
    _check_importable(fn)
    fn_name = f"{fn.__module__}.{fn.__qualname__}"
    ctx = _context(start_method)
    folder = Path(tempfile.mkdtemp(prefix="moe_lab_launch_"))
    guard = Guard(folder)  # if this process is killed outright: stops the ranks, removes the folder
    try:
        # The rendezvous: port 0 lets the OS pick a free port; it is released when `store` is dropped.
        store = dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout))
    except BaseException:
        guard.done()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_run_rank, args=(fn, rank, world_size, store.port, backend, timeout, str(folder), args),
                            name=f"moe_lab-rank{rank}", daemon=True)
            p.start()
            procs.append(p)
            guard.kill(p.pid)
        deadline = time.monotonic() + timeout
        while True:
            error = _failure(folder, world_size, fn_name)
            if error is not None:
                _stop(procs)
                raise _failure(folder, world_size, fn_name) or error
            done = [(folder / f"rank{r}.pt").exists() for r in range(world_size)]
            if all(done):
                break
            for rank, p in enumerate(procs):
                if not done[rank] and p.exitcode is not None:
                    time.sleep(0.2)  # its error file may still be on its way
                    if (folder / f"rank{rank}.pt").exists() or (folder / f"rank{rank}.err").exists():
                        continue
                    _stop(procs)
                    raise RankFailedError(rank, world_size, fn_name, "ProcessExit",
                                          f"the process ended with exit code {p.exitcode} without a result", "")
            if time.monotonic() > deadline:
                running = [r for r in range(world_size) if not done[r]]
                _stop(procs)
                raise TimeoutError(f"launch({fn_name}, world_size={world_size}): rank(s) {running} had not "
                                   f"finished after timeout={timeout} s; every rank was stopped")
            time.sleep(0.02)
        results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]  # our own files
        for p in procs:
            p.join(5.0)
        return results
    finally:
        _stop(procs)
        del store
        shutil.rmtree(folder, ignore_errors=True)
        guard.done()


def run_torchrun(nproc: int, *args: str, timeout: float = 300.0) -> "subprocess.CompletedProcess":
    """`torchrun --standalone --nproc-per-node nproc -m moe_lab distributed *args`, output captured.

    Runs `python -m torch.distributed.run` (the module behind the torchrun command) with a private
    temporary folder (TMPDIR), removed afterwards: torchrun leaves a `torchelastic_*` log folder
    (and multiprocessing a `pymp-*` one) in the temporary directory after every run. From a shell,
    `TMPDIR=$(mktemp -d) torchrun ...; rm -r "$TMPDIR"` does the same. torchrun runs in a session of
    its own; if the caller is killed outright (a notebook kernel shut down), a guard (moe_lab.distributed.guard)
    asks torchrun to stop its workers and removes the folder. On a timeout or an interrupt, torchrun is
    stopped the same way (SIGTERM: it stops its workers; SIGKILL to its group if it has not after 20 s).
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc={nproc!r}: expected an integer >= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "moe_lab", "distributed", *map(str, args)]
    tmp = tempfile.mkdtemp(prefix="moe_lab_torchrun_")
    guard = Guard(tmp)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TMPDIR": tmp}, start_new_session=True)
        guard.term(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # a timeout, Ctrl-C: torchrun stops its workers on SIGTERM
            proc.terminate()
            try:
                proc.communicate(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                proc.kill()
                proc.communicate()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        guard.done()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
