"""Writing the package's files: one check of an output path before any work, one atomic writer.

Every command that writes a file (records, tables, checkpoints, corpora) checks its output path with
`check_output_path` before it starts working, so a bad path costs no run, and writes through
`atomic_write_bytes` (or `write_record` for JSON): the file appears whole or not at all, and the
temporary file beside it is removed on any failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, os.PathLike]


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the path and why."""

    def __init__(self, path: PathLike, why: str):
        self.path = Path(path)
        super().__init__(f"{path}: {why}")


def check_output_path(path: PathLike, suffix: str | None = None) -> Path:
    """The path a command will write, checked before any work: an OutputPathError if it cannot be.

    Refused: a folder, a path under a file, a folder we may not write in, and (when `suffix` is
    given) a name that does not end in it."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise OutputPathError(path, f"expected a file name ending in {suffix}")
    if path.is_dir():
        raise OutputPathError(path, "is a folder: expected the path of a file to write")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputPathError(path, f"{parent} is a file, so no folder can be made there")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(path, f"the folder {parent} is not writable")
    return path


def temporary_sibling(path: Path) -> Path:
    """The temporary name a write to `path` goes through: hidden, beside it, unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _process_ended(pid: int) -> bool:
    """Whether no process has this pid here (a process of another user still counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError, OverflowError):
        return False
    return False


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary siblings of `path` that writers which ended without cleaning up left
    (a save killed with SIGKILL, a machine that lost power): `.<name>.<pid>.<hex>.tmp` whose pid is
    no running process. A live writer's file (another process, or this one's other threads) stays."""
    removed = []
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        pid, _, rest = name[len(prefix):].partition(".")
        if not (name.startswith(prefix) and name.endswith(".tmp") and pid.isdigit() and rest.count(".") == 1):
            continue
        if int(pid) == os.getpid() or not _process_ended(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.remove(path.parent / name)
            removed.append(path.parent / name)
    return removed


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write data to path through a temporary file beside it, renamed over it once on disk; the
    temporary file is removed on any failure (a full disk, an interrupt), and those of earlier
    writers that were killed are removed first (`remove_stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies: a file's usual mode
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_record(record: dict, paths: Union[PathLike, Iterable[PathLike]], quiet: bool = False) -> None:
    """Write a record as JSON to each path, atomically (a reader never sees half a file); says where unless quiet."""
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        if not quiet:
            print(f"wrote {path}")
