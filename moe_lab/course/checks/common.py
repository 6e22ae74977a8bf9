"""What every checker shares: the CheckFailed error, the success line, and tensor comparison."""
from __future__ import annotations

import functools
import traceback
from pathlib import Path
from typing import Callable

import torch

PACKAGE = Path(__file__).resolve().parents[2]  # moe_lab/: frames inside it are the checker's, not the learner's


class CheckFailed(AssertionError):
    """Raised by a checker: the message says what is wrong and what was expected."""

    def _render_traceback_(self) -> list[str]:
        """How Jupyter (IPython) shows a failed check: the message first, then the lines of your cells
        that called the check, without the checker's own frames (they say nothing about your code)."""
        lines = [f"\x1b[1;31mCheckFailed\x1b[0m: {self}"]
        yours = [f for f in traceback.extract_tb(self.__traceback__)
                 if not Path(f.filename).resolve().is_relative_to(PACKAGE)]
        if yours:
            lines += ["", "called from:"] + [f"  {f.filename}, line {f.lineno}: {(f.line or '').strip()}"
                                             for f in yours]
        return lines


def _ok(name: str) -> None:
    print(f"✅ {name}: correct")


def checker(fn: Callable) -> Callable:
    """Decorate a checker: a learner's stub (NotImplementedError("Your turn: ...")) is reported as 'not
    implemented yet'; any other NotImplementedError (an operation torch lacks here) says so instead."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CheckFailed as e:  # shown from the learner's call: the message, not the checker's inner frames
            short = CheckFailed(str(e))
            short.__cause__ = e.__cause__  # the learner's own error (a kernel that failed) stays shown above
            short.__suppress_context__ = True
            raise short.with_traceback(None)
        except NotImplementedError as e:
            if "your turn" in str(e).lower():  # the stub of a learner notebook
                raise CheckFailed(f"{fn.__name__}: not implemented yet ({e})") from None
            raise CheckFailed(f"{fn.__name__}: your code called something that is not implemented here "
                              f"(NotImplementedError: {e}); try another torch operation or dtype") from e
    return wrapped


def _compare(name: str, got, expected, atol: float = 1e-5, rtol: float = 1e-4, what: str = "output") -> None:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{name}: the {what} should be a torch.Tensor, got {type(got).__name__}")
    if got.shape != expected.shape:
        raise CheckFailed(f"{name}: the {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if not torch.isfinite(got.float()).all():
        raise CheckFailed(f"{name}: the {what} contains NaN or inf")
    diff = (got.float() - expected.float()).abs()
    bad = diff > atol + rtol * expected.float().abs()
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckFailed(f"{name}: the {what} is wrong at index {where}: got {got[where].item():.6g}, expected "
                          f"{expected[where].item():.6g} ({int(bad.sum())} of {bad.numel()} values differ; "
                          f"largest error {diff.max().item():.3g})")
