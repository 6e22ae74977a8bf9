"""Imported only by the forkserver process launch() starts: its socket folder goes when it ends.

multiprocessing's forkserver listens on a Unix socket in a `pymp-*` folder of the temporary
directory. That folder belongs to the process that started the server (a notebook's kernel) and is
removed when that process exits normally; but a kernel that is killed (Jupyter's "shut down now",
nbval at the end of a notebook: SIGKILL to the kernel's whole process group, the forkserver and the
ranks included) runs no clean-up, and the folder stays behind.

So, when the forkserver starts, this module forks a tiny watcher into a session of its own (a
signal to the kernel's process group does not reach it). The watcher holds nothing but the read
end of a pipe whose write end only the forkserver and its children hold; when they have all ended,
however they ended, the read returns, and the watcher removes the socket and its folder (only if
the folder is then empty) and exits. Linux and macOS; elsewhere (no fork) it does nothing.
"""
from __future__ import annotations

import os
import socket
import stat


def listening_unix_sockets() -> list[str]:
    """Paths of the Unix sockets this process holds open (Linux /proc, or /dev/fd elsewhere)."""
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            fds = [int(n) for n in os.listdir(fd_dir)]
        except (OSError, ValueError):
            continue
        paths = []
        for fd in fds:
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                name = s.getsockname() if s.family == socket.AF_UNIX else None
            except OSError:
                name = None
            finally:
                s.close()  # closes the duplicate only
            if isinstance(name, str) and name:
                paths.append(name)
        return paths
    return []


def remove_socket_folders(paths: list[str]) -> None:
    """Remove each multiprocessing listener socket and its pymp-* folder once that folder is empty."""
    for path in paths:
        folder = os.path.dirname(path)
        try:
            os.unlink(path)
        except OSError:
            pass
        try:
            os.rmdir(folder)  # only when empty: anything else in it is not ours to remove
        except OSError:
            pass


def start_watcher(paths: list[str]) -> None:
    """Fork a process, in its own session, that removes `paths` once this process and its children are gone."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watcher: no Python clean-up, only system calls, then os._exit
        try:
            os.setsid()
            os.close(w)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)  # hold none of the kernel's pipes open
            os.closerange(3, r)
            os.closerange(r + 1, 1 << 16)
            while os.read(r, 1):
                pass  # returns b"" once every holder of the write end has ended
            remove_socket_folders(paths)
        finally:
            os._exit(0)
    os.close(r)  # the forkserver keeps w open (non-inheritable across exec, inherited by forked ranks)
    os.waitpid(pid, os.WNOHANG)


def _main() -> None:
    ours = [p for p in listening_unix_sockets()
            if os.path.basename(p).startswith("listener-") and os.path.basename(os.path.dirname(p)).startswith("pymp-")]
    if ours and hasattr(os, "fork") and hasattr(os, "setsid"):
        start_watcher(ours)


_main()
