"""Checkers for notebooks 05 and 06 (Triton): grouped program order, the fused SwiGLU activation,
reading the block-aligned layout, and the ordered combine kernel.

Kernel checkers run the learner's launcher on float32 tensors on the CPU through Triton's
interpreter, and on the GPU (float32, then float16) when CUDA is available. A kernel that still holds
the learner notebook's stub fails to compile on a GPU; that is reported as "not implemented yet" too.

Masks are what these exercises teach, so every mask mistake is caught, each by what shows it:
- a store past the end: the output is a view of a larger buffer whose tail (the guard) holds
  OUT_GUARD, a value no kernel here writes; the guard is compared exactly after every launch;
- a wrong value at the ragged edge (a missing column mask, a last block not launched): the values;
- a load past the end: in an elementwise kernel whose store is masked it changes no value anyone can
  see (under the interpreter it reads the input's guard, on a GPU out of bounds), so the kernel's
  source is read instead (moe_lab.course.checks.kernel_source): every tl.load and tl.store must have a mask.
The source also names what the values only hint at: `offs <= n`, or a BLOCK size used as a row stride.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F

from moe_lab.core.runtime import default_device
from moe_lab.course.checks import kernel_source
from moe_lab.course.checks.common import CheckFailed, _compare, _ok, checker

OUT_GUARD = -1234.0  # what an output's guard holds: exact in float16, far from any value these kernels write


def _device() -> torch.device:
    return torch.device(default_device())


def _dtypes() -> list:
    return [torch.float32, torch.float16] if _device().type == "cuda" else [torch.float32]


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
        raw = [tile_of(p, n_m, n_n, gm) for p in range(n_m * n_n)]
        floats = [t for t in raw if any(isinstance(v, float) for v in t)]
        if floats:
            raise CheckFailed(f"check_tile_of: program indices must be integers, got {floats[0]}: use integer division "
                              f"`//` (in Triton too, `/` gives a float)")
        got = [tuple(int(v) for v in t) for t in raw]
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


def _call_with_out(name: str, launcher: Callable, args: tuple, out: torch.Tensor):
    """Run the launcher writing into `out` (a view whose storage continues past its end, so a store
    the kernel forgot to mask lands in the guard, not in someone else's memory); launchers without
    an `out=` argument allocate their own."""
    try:
        return _launch(name, lambda: launcher(*args, out=out))
    except CheckFailed as err:
        if "unexpected keyword argument 'out'" not in str(err):
            raise
        return _launch(name, launcher, *args)


def _guarded(n_rows: int, row_shape: tuple, guard_rows: int, dtype, dev, fill: float = float("nan")):
    """A tensor of n_rows + guard_rows rows filled with `fill`: returns (the first n_rows, the guard)."""
    big = torch.full((n_rows + guard_rows, *row_shape), fill, dtype=dtype, device=dev)
    return big[:n_rows], big[n_rows:]


def _guard_intact(guard: torch.Tensor, fill: float = float("nan")) -> bool:
    return bool(torch.isnan(guard).all()) if fill != fill else bool((guard == fill).all())


def _kernels(launcher: Callable) -> list:
    try:
        return kernel_source.kernels_of(launcher)
    except Exception:  # reading the source is a diagnosis, never a reason to fail a right kernel
        return []


def _lte(kernels: list, kind: str):
    """The first `offs <= n`-style comparison in a mask of a load or store (kind), as written; None if none."""
    import ast

    for k in kernels:
        for a in kernel_source.masks_with_lte(k):
            if a.kind == kind:
                for c in ast.walk(ast.parse(a.mask, mode="eval")):
                    if isinstance(c, ast.Compare) and any(isinstance(op, ast.LtE) for op in c.ops):
                        return ast.unparse(c)
    return None


def _stride_mistake(name: str, kernels: list) -> None:
    """A pointer expression that steps rows by a BLOCK size: named as a row stride."""
    for k in kernels:
        for base, block in kernel_source.block_as_stride(k):
            raise CheckFailed(f"{name}: row stride: your pointer to {base} steps from one row to the next by {block}, "
                              f"but the rows of a contiguous (rows, d) tensor are d elements apart: row a starts at "
                              f"a * d, whatever block of columns a program owns")


def _plural(names: list, one: str, many: str) -> str:
    return (one if len(names) == 1 else many).format(names=" and ".join(names))


@checker
def check_swiglu_act(swiglu_act: Callable) -> None:
    """swiglu_act(a, b, out=None) -> silu(a) * b, elementwise, by a Triton kernel (any length).

    First a length that is a multiple of the block, then ragged ones. Inputs and output are views of
    larger buffers: the inputs' tails hold NaN, the output's tail holds OUT_GUARD and is compared
    exactly, so a store past the end shows (and corrupts no memory). A load past the end changes no
    value here, so the kernel's loads and stores are read from its source: each needs a mask."""
    dev = _device()
    g = torch.Generator().manual_seed(11)
    guard = 4096  # more than any block size the launcher may use
    kernels = _kernels(swiglu_act)
    exact_ok = False
    for dtype in _dtypes():
        for n in (2048, 5_003, 37):
            a_v, _ = _guarded(n, (), guard, dtype, dev)
            b_v, _ = _guarded(n, (), guard, dtype, dev)
            a_v.copy_((torch.randn(n, generator=g) * 3).to(dev, dtype))
            b_v.copy_(torch.randn(n, generator=g).to(dev, dtype))
            out_v, out_guard = _guarded(n, (), guard, dtype, dev, fill=OUT_GUARD)
            got = _call_with_out("check_swiglu_act", swiglu_act, (a_v, b_v), out_v)
            expected = (F.silu(a_v.float()) * b_v.float()).to(dtype)
            rtol, atol = _tol(dtype)
            where = f"({str(dtype).replace('torch.', '')}, n={n})"
            ragged = n % 1024 != 0
            if got is out_v or (isinstance(got, torch.Tensor) and got.data_ptr() == out_v.data_ptr()):
                changed = out_guard != OUT_GUARD  # NaN counts as changed
                if changed.any():
                    past = int(changed.sum())
                    if kernel_source_unmasked(kernels, "store"):
                        raise CheckFailed(f"check_swiglu_act: your store has no mask: the last block writes past n "
                                          f"({past} elements after element n-1 = {n - 1} changed {where}). Mask it "
                                          f"with offs < n")
                    lte = _lte(kernels, "store")
                    if lte or (past == 1 and bool(changed[0])):
                        raise CheckFailed(f"check_swiglu_act: mask {lte or 'offs <= n'} lets one element too many "
                                          f"through: element n = {n} of the output was written {where}. The last "
                                          f"valid element is n - 1: use offs < n")
                    raise CheckFailed(f"check_swiglu_act: your store's mask lets lanes past n through: {past} elements "
                                      f"after element n-1 = {n - 1} changed {where}. Mask the store with offs < n")
            if not isinstance(got, torch.Tensor) or got.shape != a_v.shape:
                _compare("check_swiglu_act", got, expected)
            i = _first_bad(got, expected, rtol, atol)
            if i is None:
                exact_ok = exact_ok or not ragged
                continue
            if torch.allclose(got.float(), F.silu(b_v.float()) * a_v.float(), rtol=rtol, atol=atol):
                raise CheckFailed(f"check_swiglu_act: a and b are swapped: the gate silu applies to a (x @ w1) {where}")
            if torch.allclose(got.float(), torch.sigmoid(a_v.float()) * b_v.float(), rtol=rtol, atol=atol):
                raise CheckFailed(f"check_swiglu_act: that is sigmoid(a) * b; silu(a) = a * sigmoid(a) {where}")
            if ragged and exact_ok:
                raise CheckFailed(f"check_swiglu_act: right when n is a multiple of the block, wrong from element "
                                  f"{i} of a ragged n {where}: is the last, partial block launched (triton.cdiv) and "
                                  f"are its loads and store masked with offs < n?")
            _compare(f"check_swiglu_act {where}", got, expected, atol=atol, rtol=rtol)
    loads = kernel_source_unmasked(kernels, "load")
    if loads:
        raise CheckFailed("check_swiglu_act: " + _plural(loads, "your load of {names} has", "your loads of {names} have")
                          + " no mask: the last block reads past n. Every value is right only because the store is "
                          "masked; on a GPU those lanes read memory past the tensor. Mask "
                          + _plural(loads, "it", "them") + " with offs < n")
    lte = _lte(kernels, "load")
    if lte:
        raise CheckFailed(f"check_swiglu_act: mask {lte} lets one element too many through: your loads read element "
                          f"n, past the end. Use offs < n")
    _ok("check_swiglu_act")


def kernel_source_unmasked(kernels: list, kind: str) -> list:
    """Pointer names of the loads or stores (kind) without a mask, over the launcher's kernels."""
    return list(dict.fromkeys(b for k in kernels for b in kernel_source.unmasked(k, kind)))


def _layouts():
    """Routings and their layouts: drops, an empty expert, all tokens on one expert, top-1."""
    from moe_lab.kernels.moe_routing import moe_align  # Triton is optional; its interpreter is chosen first

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
    """combine(buf (T*top_k, d), expert_idx (T, top_k), out=None) -> y (T, d): routed slots summed in order j = 0, 1, ...

    First T and d that are multiples of the launcher's blocks, then ragged ones. buf, expert_idx and
    the output are views of larger buffers (guard rows: NaN in buf, expert 0 in expert_idx, OUT_GUARD
    in y, compared exactly), so a store past the end shows as a changed guard and a missing column mask
    as a wrong value, never as a crash. A load past the last token changes no value (its lanes are not
    stored), so the kernel's loads and stores are read from its source: each needs a mask."""
    dev = _device()
    g = torch.Generator().manual_seed(13)
    exact_ok = False
    guard = 64  # guard rows, more than any BLOCK_T the launcher may use
    kernels = _kernels(combine)
    for dtype in _dtypes():
        for T, k, d in [(16, 2, 32), (37, 2, 24), (5, 3, 40)]:
            ragged = T % 8 != 0 or d % 16 != 0  # the launcher's default block_t=8, block_d=16
            idx = torch.randint(0, 4, (T, k), generator=g).masked_fill(torch.rand(T, k, generator=g) < 0.25, -1)
            idx[0] = -1  # a token with every assignment dropped
            values = torch.randn(T * k, d, generator=g).masked_fill(idx.reshape(-1, 1) < 0, float("nan"))
            buf, _ = _guarded(T * k, (d,), guard * k, dtype, dev)  # (wide guard: a load without a mask on T reads it)
            buf.copy_(values.to(dev, dtype))
            idx_v, _ = _guarded(T, (k,), guard, torch.long, dev, fill=0)
            idx_v.copy_(idx.to(dev))
            out_v, out_guard = _guarded(T, (d,), guard, dtype, dev, fill=OUT_GUARD)
            routed = (idx_v >= 0)[..., None]  # (T, k, 1)
            expected = torch.where(routed, buf.view(T, k, d).float(), 0.0).sum(1).to(dtype)  # (T, d)
            got = _call_with_out("check_combine", combine, (buf, idx_v), out_v)
            where = f"({str(dtype).replace('torch.', '')}, T={T}, top_k={k}, d={d})"
            if isinstance(got, torch.Tensor) and got.data_ptr() == out_v.data_ptr():
                changed = (out_guard != OUT_GUARD).any(1)  # (guard rows,) NaN counts as changed
                if changed.any():
                    _stride_mistake("check_combine", kernels)
                    rows = int(changed.sum())
                    if kernel_source_unmasked(kernels, "store"):
                        raise CheckFailed(f"check_combine: your store has no mask: the last block of tokens writes past "
                                          f"row T - 1 of y ({rows} rows after it changed {where}). Mask it with "
                                          f"offs_t < T and offs_d < d")
                    lte = _lte(kernels, "store")
                    if lte:
                        raise CheckFailed(f"check_combine: mask {lte} lets one row too many through: row T = {T} of y "
                                          f"was written {where}. Use offs_t < T")
                    raise CheckFailed(f"check_combine: your store's mask lets rows past T - 1 through: {rows} rows after "
                                      f"the last row of y changed {where}. Mask the store with offs_t < T (and "
                                      f"offs_d < d)")
            rtol, atol = _tol(dtype)
            if isinstance(got, torch.Tensor) and got.shape == expected.shape:
                wrong = _first_bad(got, expected, rtol, max(atol, 1e-5))
                if wrong is not None:
                    _stride_mistake("check_combine", kernels)
                if wrong is not None and ragged and exact_ok:
                    t, c = divmod(wrong, d)
                    raise CheckFailed(f"check_combine: right when T and d are multiples of the blocks, wrong at "
                                      f"token {t}, column {c} here {where}: mask the ragged edges, offs_t < T and "
                                      f"offs_d < d, in the loads and in the store")
                if torch.isnan(got.float()).any():
                    t = int(torch.isnan(got.float()).any(1).nonzero()[0])
                    raise CheckFailed(f"check_combine: token {t}'s output is NaN {where}: a dropped slot (expert -1) "
                                      f"was read; its buffer row holds NaN here and must be skipped")
                only_first = torch.where(routed[:, :1], buf.view(T, k, d)[:, :1].float(), 0.0).sum(1).to(dtype)
                if torch.allclose(got.float(), only_first.float(), rtol=rtol, atol=atol):
                    raise CheckFailed(f"check_combine: only slot j = 0 is added {where}: loop over all TOP_K slots")
            _compare(f"check_combine {where}", got, expected, atol=max(atol, 1e-5), rtol=rtol)
            exact_ok = exact_ok or not ragged
            first = got.clone()
            again = _call_with_out("check_combine", combine, (buf, idx_v), out_v)
            if not torch.equal(again, first):
                raise CheckFailed(f"check_combine: two runs give different bits {where}: sum the slots in a fixed "
                                  f"order, without atomics")
    loads = kernel_source_unmasked(kernels, "load")
    if loads:
        raise CheckFailed("check_combine: " + _plural(loads, "your load of {names} has", "your loads of {names} have")
                          + " no mask: the last block of tokens reads past the end of "
                          + _plural(loads, "its tensor", "their tensors") + ". Every value is right only because the "
                          "store is masked; on a GPU those lanes read memory past the tensor. Mask the loads of "
                          "expert_idx with offs_t < T (other=-1: a lane past T counts as dropped), and the load of "
                          "buf with the routed mask and offs_d < d")
    lte = _lte(kernels, "load")
    if lte:
        raise CheckFailed(f"check_combine: mask {lte} lets one row too many through: your loads read past the last "
                          f"token. Use offs_t < T")
    _ok("check_combine")
