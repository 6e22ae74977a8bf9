"""Cases for the Triton checkers of notebooks 05 and 06 (moe_lab.course.checks.kernels): the right kernel,
and wrong kernels a learner plausibly writes. tests/course/test_checks.py runs them (right answer passes,
each wrong one fails with a message naming the mistake, a stub is "not implemented yet"). On a CPU
the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

Run: .venv/bin/python -m pytest tests/course/test_checks.py -q
"""
import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from moe_lab.course import checks  # noqa: E402


# ---- swiglu_act (notebook 05): out = silu(a) * b ------------------------------------------------
# Each wrong kernel is its own @triton.jit function: the checkers read the kernel's source for its
# loads and stores, so a right variant must not share a source with an unmasked one.
@triton.jit
def _act_kernel(a_ptr, b_ptr, out_ptr, n, VARIANT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    if VARIANT == 0:  # right
        out = a * tl.sigmoid(a) * b
    elif VARIANT == 1:  # gate on the wrong input
        out = b * tl.sigmoid(b) * a
    else:  # sigmoid instead of silu
        out = tl.sigmoid(a) * b
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_store_unmasked(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The loads are masked, the store is not: the last block writes past the end."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs, mask=offs < n).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=offs < n).to(tl.float32)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty))


@triton.jit
def _act_no_mask(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """No mask at all: reads and writes past the end."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs).to(tl.float32)
    b = tl.load(b_ptr + offs).to(tl.float32)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty))


@triton.jit
def _act_lte(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """One past the end: `<=` where `<` belongs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs <= n
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_loads_unmasked(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The store is masked, the loads are not: every value is right, yet the last block reads past n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs).to(tl.float32)
    b = tl.load(b_ptr + offs).to(tl.float32)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=offs < n)


def _act(variant=0, floor_grid=False):
    def launch(a, b, block=1024, out=None):
        out = torch.zeros_like(a) if out is None else out
        grid = (a.numel() // block if floor_grid else triton.cdiv(a.numel(), block),)
        _act_kernel[grid](a, b, out, a.numel(), VARIANT=variant, BLOCK=block)
        return out
    return launch


def _act_with(kernel):
    def launch(a, b, block=1024, out=None):
        out = torch.zeros_like(a) if out is None else out
        kernel[(triton.cdiv(a.numel(), block),)](a, b, out, a.numel(), BLOCK=block)
        return out
    return launch


# ---- the ordered combine (notebook 06) ----------------------------------------------------------
@triton.jit
def _combine_kernel(buf_ptr, idx_ptr, y_ptr, T, d, TOP_K: tl.constexpr, VARIANT: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = offs_t < T, offs_d < d
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K if VARIANT != 2 else 1):  # VARIANT 2: only slot 0
        a = offs_t * TOP_K + j
        routed = tl.load(idx_ptr + a, mask=t_ok, other=-1) >= 0
        if VARIANT == 1:  # reads dropped slots too
            routed = t_ok
        if VARIANT == 4:  # (no column mask) the load reads into the next row
            acc += tl.load(buf_ptr + a[:, None] * d + offs_d[None, :], mask=routed[:, None], other=0.0).to(tl.float32)
        else:
            acc += tl.load(buf_ptr + a[:, None] * d + offs_d[None, :], mask=routed[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if VARIANT == 3:  # the store is not masked on T: the last block writes past y's last row
        tl.store(y_ptr + offs_t[:, None] * d + offs_d[None, :], acc.to(y_ptr.dtype.element_ty), mask=d_ok[None, :])
    elif VARIANT == 4:  # no column mask anywhere: a row's last block spills into the next row
        tl.store(y_ptr + offs_t[:, None] * d + offs_d[None, :], acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None])
    else:
        tl.store(y_ptr + offs_t[:, None] * d + offs_d[None, :], acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_loads_unmasked_on_t(buf_ptr, idx_ptr, y_ptr, T, d, TOP_K: tl.constexpr, STORE_MASKED: tl.constexpr,
                                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """No offs_t < T on the loads: the last block of tokens reads expert_idx and buf past their ends."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = offs_t * TOP_K + j
        routed = tl.load(idx_ptr + a) >= 0
        acc += tl.load(buf_ptr + a[:, None] * d + offs_d[None, :], mask=routed[:, None] & (offs_d < d)[None, :],
                       other=0.0).to(tl.float32)
    ptrs = y_ptr + offs_t[:, None] * d + offs_d[None, :]
    if STORE_MASKED:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & (offs_d < d)[None, :])
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _combine_block_stride(buf_ptr, idx_ptr, y_ptr, T, d, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Rows of buf stepped by BLOCK_D instead of d: the row stride is wrong, the masks are right."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = offs_t < T, offs_d < d
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = offs_t * TOP_K + j
        routed = tl.load(idx_ptr + a, mask=t_ok, other=-1) >= 0
        acc += tl.load(buf_ptr + a[:, None] * BLOCK_D + offs_d[None, :], mask=routed[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t[:, None] * d + offs_d[None, :], acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


def _combine(variant=0):
    def launch(buf, idx, block_t=8, block_d=16, out=None):
        T, k = idx.shape
        y = torch.zeros(T, buf.shape[1], device=buf.device, dtype=buf.dtype) if out is None else out
        grid = (triton.cdiv(T, block_t), triton.cdiv(buf.shape[1], block_d))
        _combine_kernel[grid](buf, idx.reshape(-1).contiguous(), y, T, buf.shape[1], TOP_K=k, VARIANT=variant,
                              BLOCK_T=block_t, BLOCK_D=block_d)
        return y
    return launch


def _combine_with(kernel, **meta):
    def launch(buf, idx, block_t=8, block_d=16, out=None):
        T, k = idx.shape
        y = torch.zeros(T, buf.shape[1], device=buf.device, dtype=buf.dtype) if out is None else out
        grid = (triton.cdiv(T, block_t), triton.cdiv(buf.shape[1], block_d))
        kernel[grid](buf, idx.reshape(-1).contiguous(), y, T, buf.shape[1], TOP_K=k, BLOCK_T=block_t, BLOCK_D=block_d,
                     **meta)
        return y
    return launch


_runs = {"n": 0}


def _combine_racy(buf, idx):
    """Right values, but the bits change between runs (as atomics in another order would)."""
    _runs["n"] += 1
    return _combine()(buf, idx) + (_runs["n"] % 2) * 1e-7 * buf.abs().nan_to_num().max()


# ---- rows_to_token_expert (notebook 06) ---------------------------------------------------------
def _rows_right(al):
    row_block = torch.arange(al.max_rows, device=al.sorted_ids.device) // al.block_m
    real = al.sorted_ids < al.n_assignments
    return (torch.where(real, al.sorted_ids.long() // al.top_k, -1),
            torch.where(real, al.block_expert[row_block].long(), -1))


def _rows_no_padding(al):
    row_block = torch.arange(al.max_rows, device=al.sorted_ids.device) // al.block_m
    return al.sorted_ids.long() // al.top_k, al.block_expert[row_block].long()


def _rows_assignment(al):
    t, e = _rows_right(al)
    return torch.where(t >= 0, al.sorted_ids.long(), -1), e


def _rows_expert_by_row(al):
    t, e = _rows_right(al)
    rows = torch.arange(al.max_rows, device=e.device)
    return t, torch.where(t >= 0, al.block_expert[(rows // al.block_m).clamp_max(len(al.block_expert) - 1)].long() * 0 + rows % 3, -1)


CASES = {
    "check_swiglu_act": (_act(), [
        (_act(variant=1), "swapped"),
        (_act(variant=2), "sigmoid\\(a\\) \\* b"),
        (_act(floor_grid=True), "last, partial block"),
        (_act_with(_act_store_unmasked), "^check_swiglu_act: your store has no mask: the last block writes past n"),
        (_act_with(_act_no_mask), "^check_swiglu_act: your store has no mask: the last block writes past n"),
        (_act_with(_act_lte), "^check_swiglu_act: mask offs <= n lets one element too many through"),
        (_act_with(_act_loads_unmasked), "^check_swiglu_act: your loads of a_ptr and b_ptr have no mask: the last block reads past n"),
    ]),
    "check_combine": (_combine(), [
        (_combine(variant=1), "dropped slot"),
        (_combine(variant=2), "only slot j = 0"),
        (_combine_racy, "different bits"),
        (_combine(variant=3), "^check_combine: your store's mask lets rows past T - 1 through"),
        (_combine(variant=4), "offs_d < d"),
        (_combine_with(_combine_loads_unmasked_on_t, STORE_MASKED=True),
         "^check_combine: your load of idx_ptr has no mask: the last block of tokens reads past the end"),
        (_combine_with(_combine_loads_unmasked_on_t, STORE_MASKED=False),
         "^check_combine: your store has no mask: the last block of tokens writes past row T - 1 of y"),
        (_combine_with(_combine_block_stride), "^check_combine: row stride: your pointer to buf_ptr steps .* by BLOCK_D.*d elements apart"),
    ]),
    "check_rows_to_token_expert": (_rows_right, [
        (_rows_no_padding, "padding rows"),
        (_rows_assignment, "a // top_k"),
        (_rows_expert_by_row, "belongs to expert"),
    ]),
}


def test_a_kernel_that_still_holds_the_stub_is_not_implemented_yet():
    """The learner notebook's stub sits inside a @triton.jit kernel: interpreted it raises, compiled it
    does not compile; either way the checker says "not implemented yet"."""
    with pytest.raises(checks.CheckFailed, match="not implemented yet"):
        checks.check_swiglu_act(_stub_launch)


@triton.jit
def _stub_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    raise NotImplementedError("Your turn: swiglu_act_kernel — see the exercise above")


def _stub_launch(a, b, block=1024):
    out = torch.empty_like(a)
    _stub_kernel[(triton.cdiv(a.numel(), block),)](a, b, out, a.numel(), BLOCK=block)
    return out


# ---- reading a kernel's source (moe_lab.course.checks.kernel_source) -----------------------------------
@triton.jit
def _positional_masks(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs <= n - 1  # the same as offs < n
    v = tl.load(x_ptr + offs, keep, 0.0)  # mask and other given by position
    tl.store(y_ptr + offs, v, keep)


def test_the_source_reader_takes_positional_masks_and_a_correct_lte():
    """A mask given by position is a mask; `offs <= n - 1` is right; `pid * BLOCK` is an offset, not a stride."""
    from moe_lab.course.checks import kernel_source

    (k,) = kernel_source.kernels_of(_act_with(_positional_masks))
    assert k.name == "_positional_masks" and [a.kind for a in k.accesses] == ["load", "store"]
    assert kernel_source.unmasked(k, "load") == kernel_source.unmasked(k, "store") == []
    assert kernel_source.masks_with_lte(k) == [] and kernel_source.block_as_stride(k) == []


def test_the_source_reader_names_what_the_wrong_kernels_do():
    from moe_lab.course.checks import kernel_source

    (k,) = kernel_source.kernels_of(_act_with(_act_loads_unmasked))
    assert kernel_source.unmasked(k, "load") == ["a_ptr", "b_ptr"] and kernel_source.unmasked(k, "store") == []
    (k,) = kernel_source.kernels_of(_act_with(_act_lte))
    assert {a.kind for a in kernel_source.masks_with_lte(k)} == {"load", "store"}
    (k,) = kernel_source.kernels_of(_combine_with(_combine_block_stride))
    assert kernel_source.block_as_stride(k) == [("buf_ptr", "BLOCK_D")]
    assert kernel_source.kernels_of(lambda a, b: a + b) == []  # no kernel: nothing to read, nothing reported
