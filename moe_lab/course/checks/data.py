"""Checkers for notebook 01 (data): a problem line of the arithmetic task, and the next-token shift."""
from __future__ import annotations

from typing import Callable

import torch

from moe_lab.course.checks.common import CheckFailed, _ok, checker
from moe_lab.data import ArithmeticTask

PAIRS = [(47, 85), (5, 5), (0, 0), (120, 3), (999, 1), (7, 310)]


@checker
def check_problem_line(line: Callable) -> None:
    """line(a, b) -> "a+b=" + the digits of a + b least-significant first + "\\n" (as ArithmeticTask.line)."""
    task = ArithmeticTask(op="add", n_digits=3)
    for a, b in PAIRS:
        expected, got = task.line(task.make(a, b)), line(a, b)
        if got == expected:
            continue
        if not isinstance(got, str):
            raise CheckFailed(f"check_problem_line: problem_line({a}, {b}) returned a {type(got).__name__}; "
                              f"expected the string {expected!r}")
        if got == expected[:-1]:
            raise CheckFailed(f"check_problem_line: problem_line({a}, {b}) = {got!r} has no final newline; the newline "
                              f"tells the model (and the verifier) that the answer is complete: {expected!r}")
        if got.rstrip("\n") == f"{a}+{b}={a + b}" and str(a + b) != str(a + b)[::-1]:
            raise CheckFailed(f"check_problem_line: problem_line({a}, {b}) = {got!r} writes the sum most-significant "
                              f"digit first; the course writes it reversed, least-significant first: {expected!r}")
        raise CheckFailed(f"check_problem_line: problem_line({a}, {b}) = {got!r}, expected {expected!r}")
    _ok("check_problem_line")


@checker
def check_next_token_shift(shift: Callable) -> None:
    """shift(ids (B, n+1), mask (B, n+1)) -> x = ids[:, :-1], y = ids[:, 1:], mask of y = mask[:, 1:]."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 99, (3, 9), generator=g)
    mask = (torch.rand(3, 9, generator=g) < 0.5).float()
    out = shift(ids.clone(), mask.clone())
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise CheckFailed(f"check_next_token_shift: return the three tensors (x, y, mask); got {type(out).__name__}"
                          + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    x, y, m = out
    for name, t in (("x", x), ("y", y), ("mask", m)):
        if not isinstance(t, torch.Tensor) or t.shape != (3, 8):
            raise CheckFailed(f"check_next_token_shift: {name} should be a tensor of shape (B, n) = (3, 8), got "
                              f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if torch.equal(x, ids[:, 1:]) and torch.equal(y, ids[:, :-1]):
        raise CheckFailed("check_next_token_shift: x and y are swapped: x is every id but the last (what the model "
                          "reads), y every id but the first (what it predicts)")
    if not torch.equal(x, ids[:, :-1]):
        raise CheckFailed("check_next_token_shift: x should be ids without its last column (the model reads ids 0..n-1)")
    if not torch.equal(y, ids[:, 1:]):
        raise CheckFailed("check_next_token_shift: y should be ids without its first column (position i predicts id i+1)")
    if torch.equal(m, mask[:, :-1]):
        raise CheckFailed("check_next_token_shift: the mask is shifted like x, but a mask entry belongs to the "
                          "*predicted* id: shift it like y (mask[:, 1:])")
    if not torch.equal(m.float(), mask[:, 1:]):
        raise CheckFailed("check_next_token_shift: the mask should be mask[:, 1:], the mask of each target y")
    _ok("check_next_token_shift")
