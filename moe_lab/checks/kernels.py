"""Checkers for notebooks 05 and 06 (Triton): grouped program order, the fused SwiGLU activation,
reading the block-aligned layout, and the ordered combine kernel.

Kernel checkers run the learner's launcher on float32 tensors on the CPU through Triton's
interpreter, and on the GPU (float32, then float16) when CUDA is available. A kernel that still holds
the learner notebook's stub fails to compile on a GPU; that is reported as "not implemented yet" too.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F

from moe_lab.checks.common import CheckFailed, _compare, _ok, checker


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _dtypes() -> list:
    return [torch.float32, torch.float16] if torch.cuda.is_available() else [torch.float32]


def _launch(name: str, fn: Callable, *args):
    """Run a learner's launcher; a compiled kernel that still holds the stub is 'not implemented yet'."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # Triton's CompilationError on a GPU, or an error inside the interpreter
        text = str(err)
        if "NotImplementedError" in text or "Your turn" in text:
            stub = re.search(r"Your turn: [^\"']*", text)
            raise CheckFailed(f"{name}: not implemented yet ({stub.group(0) if stub else 'the kernel still raises NotImplementedError'})") from None
        raise CheckFailed(f"{name}: the kernel failed with {type(err).__name__}: {text.strip().splitlines()[-1] if text.strip() else ''}") from err


def _first_bad(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    """Row-major index of the first wrong element, or None."""
    bad = ~torch.isclose(got.float(), expected.float(), rtol=rtol, atol=atol)  # NaN counts as wrong
    return None if not bad.any() else int(bad.flatten().nonzero()[0])


def _tol(dtype: torch.dtype) -> tuple:
    return (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-3)


@checker
def check_tile_of(tile_of: Callable) -> None:
    """tile_of(pid, n_tiles_m, n_tiles_n, group_m) -> (tile row, tile column) in grouped program order."""
    def reference(pid, n_m, n_n, gm):
        per_group = gm * n_n
        first = (pid // per_group) * gm
        rows = min(n_m - first, gm)
        return first + (pid % per_group) % rows, (pid % per_group) // rows

    for n_m, n_n, gm in [(4, 4, 1), (8, 8, 4), (7, 5, 3), (5, 3, 2), (3, 6, 4)]:
        got = [tuple(int(v) for v in tile_of(p, n_m, n_n, gm)) for p in range(n_m * n_n)]
        expected = [reference(p, n_m, n_n, gm) for p in range(n_m * n_n)]
        if got == expected:
            continue
        grid = f"a {n_m} x {n_n} grid of tiles with group_m={gm}"
        outside = [t for t in got if not (0 <= t[0] < n_m and 0 <= t[1] < n_n)]
        if outside:
            raise CheckFailed(f"check_tile_of: on {grid}, a program gets tile {outside[0]}, outside the grid")
        if len(set(got)) != len(got):
            twice = next(t for t in got if got.count(t) > 1)
            missing = sorted(set(expected) - set(got))
            raise CheckFailed(f"check_tile_of: on {grid}, tile {twice} gets two programs and {len(missing)} tiles none "
                              f"(e.g. {missing[0]}): is the last, shorter group handled (rows = min(n_tiles_m - first_m, group_m))?")
        if got == [(p // n_n, p % n_n) for p in range(n_m * n_n)]:
            raise CheckFailed(f"check_tile_of: on {grid} this is row-major order: a group walks down its group_m tile "
                              f"rows first, then moves one column right")
        p = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        raise CheckFailed(f"check_tile_of: on {grid}, program {p} gets tile {got[p]}, expected {expected[p]}")
    _ok("check_tile_of")


@checker
def check_swiglu_act(swiglu_act: Callable) -> None:
    """swiglu_act(a, b) -> silu(a) * b, elementwise, by a Triton kernel (any length, not a multiple of the block)."""
    dev = _device()
    g = torch.Generator().manual_seed(11)
    for dtype in _dtypes():
        for n in (5_003, 37):
            a = (torch.randn(n, generator=g) * 3).to(dev, dtype)
            b = torch.randn(n, generator=g).to(dev, dtype)
            got = _launch("check_swiglu_act", swiglu_act, a, b)
            expected = (F.silu(a.float()) * b.float()).to(dtype)
            rtol, atol = _tol(dtype)
            if not isinstance(got, torch.Tensor) or got.shape != a.shape:
                _compare("check_swiglu_act", got, expected)
            i = _first_bad(got, expected, rtol, atol)
            if i is None:
                continue
            where = f"({dtype}, n={n})"
            if torch.allclose(got.float(), F.silu(b.float()) * a.float(), rtol=rtol, atol=atol):
                raise CheckFailed(f"check_swiglu_act {where}: a and b are swapped: the gate silu applies to a (x @ w1)")
            if torch.allclose(got.float(), torch.sigmoid(a.float()) * b.float(), rtol=rtol, atol=atol):
                raise CheckFailed(f"check_swiglu_act {where}: that is sigmoid(a) * b; silu(a) = a * sigmoid(a)")
            if i > 0 and _first_bad(got[:i], expected[:i], rtol, atol) is None and \
                    not torch.isclose(got[i:].float(), expected[i:].float(), rtol=rtol, atol=atol).any():
                raise CheckFailed(f"check_swiglu_act {where}: elements 0..{i - 1} are right, every one from {i} on is "
                                  f"wrong: is the last, partial block launched (triton.cdiv) and masked correctly?")
            _compare(f"check_swiglu_act {where}", got, expected, atol=atol, rtol=rtol)
    _ok("check_swiglu_act")


def _layouts():
    """Routings and their layouts: drops, an empty expert, all tokens on one expert, top-1."""
    from moe_lab.kernels.moe_routing import moe_align

    dev = _device()
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(0, 6, (53, 3), generator=g)  # expert 6 of 7 stays empty
    idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < 0.2, -1)
    cases = [(idx, 7, 8), (torch.tensor([[2, 0], [0, 1], [2, -1], [1, 0], [0, 2], [1, 2], [2, 0]]), 4, 4),
             (torch.zeros(9, 1, dtype=torch.long), 3, 4)]
    return [(i.to(dev), moe_align(i.to(dev), E, bm)) for i, E, bm in cases]


@checker
def check_rows_to_token_expert(rows_to_token_expert: Callable) -> None:
    """rows_to_token_expert(align) -> (token, expert) of every sorted row, each (max_rows,), -1 on padding rows."""
    for idx, al in _layouts():
        token, expert = rows_to_token_expert(al)
        real = al.sorted_ids < al.n_assignments
        a = al.sorted_ids.long()
        exp_token = torch.where(real, a // al.top_k, -1)
        exp_expert = torch.where(real, idx.reshape(-1)[a.clamp_max(al.n_assignments - 1)], -1)
        case = f"(T={idx.shape[0]}, top_k={al.top_k}, block_m={al.block_m})"
        for name, got in (("token", token), ("expert", expert)):
            if not isinstance(got, torch.Tensor) or got.shape != (al.max_rows,):
                raise CheckFailed(f"check_rows_to_token_expert {case}: {name} should have shape (max_rows,) = "
                                  f"({al.max_rows},), got {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        token, expert = token.long().to(a.device), expert.long().to(a.device)
        if not (torch.equal(token[~real], exp_token[~real]) and torch.equal(expert[~real], exp_expert[~real])):
            raise CheckFailed(f"check_rows_to_token_expert {case}: padding rows (sorted_ids == n_assignments, the "
                              f"sentinel) must give token -1 and expert -1")
        if not torch.equal(token, exp_token):
            if torch.equal(token[real], a[real]):
                raise CheckFailed(f"check_rows_to_token_expert {case}: token holds the assignment a = t * top_k + j; "
                                  f"the token is a // top_k")
            r = int((token != exp_token).nonzero()[0])
            raise CheckFailed(f"check_rows_to_token_expert {case}: row {r} holds assignment {int(a[r])}: token "
                              f"{int(exp_token[r])}, you give {int(token[r])}")
        if not torch.equal(expert, exp_expert):
            r = int((expert != exp_expert).nonzero()[0])
            raise CheckFailed(f"check_rows_to_token_expert {case}: row {r} belongs to expert {int(exp_expert[r])} "
                              f"(block_expert[row // block_m]), you give {int(expert[r])}")
    _ok("check_rows_to_token_expert")


@checker
def check_combine(combine: Callable) -> None:
    """combine(buf (T*top_k, d), expert_idx (T, top_k)) -> y (T, d): routed slots summed in order j = 0, 1, ..."""
    dev = _device()
    g = torch.Generator().manual_seed(13)
    for dtype in _dtypes():
        for T, k, d in [(37, 2, 24), (5, 3, 40)]:
            idx = torch.randint(0, 4, (T, k), generator=g).masked_fill(torch.rand(T, k, generator=g) < 0.25, -1)
            idx[0] = -1  # a token with every assignment dropped
            buf = torch.randn(T * k, d, generator=g).masked_fill(idx.reshape(-1, 1) < 0, float("nan"))
            buf, idx = buf.to(dev, dtype), idx.to(dev)
            routed = (idx >= 0)[..., None]  # (T, k, 1)
            expected = torch.where(routed, buf.view(T, k, d).float(), 0.0).sum(1).to(dtype)  # (T, d)
            got = _launch("check_combine", combine, buf, idx)
            where = f"({dtype}, T={T}, top_k={k}, d={d})"
            if isinstance(got, torch.Tensor) and got.shape == expected.shape:
                if torch.isnan(got.float()).any():
                    t = int(torch.isnan(got.float()).any(1).nonzero()[0])
                    raise CheckFailed(f"check_combine {where}: token {t}'s output is NaN: a dropped slot (expert -1) was "
                                      f"read; its buffer row holds NaN here and must be skipped")
                only_first = torch.where(routed[:, :1], buf.view(T, k, d)[:, :1].float(), 0.0).sum(1).to(dtype)
                if torch.allclose(got.float(), only_first.float(), rtol=_tol(dtype)[0], atol=_tol(dtype)[1]):
                    raise CheckFailed(f"check_combine {where}: only slot j = 0 is added: loop over all TOP_K slots")
            rtol, atol = _tol(dtype)
            _compare(f"check_combine {where}", got, expected, atol=max(atol, 1e-5), rtol=rtol)
            again = _launch("check_combine", combine, buf, idx)
            if not torch.equal(again, got):
                raise CheckFailed(f"check_combine {where}: two runs give different bits: sum the slots in a fixed "
                                  f"order, without atomics")
    _ok("check_combine")
