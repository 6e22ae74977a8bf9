"""Tutorial Triton kernels of notebook 05: vector add, fused row softmax, tiled matmul.

Triton's model (Tillet et al., MAPL 2019): a kernel is one *program*; the launch grid runs many
programs, each told its index by `tl.program_id`. A program works on *blocks* (`tl.arange(0, BLOCK)`,
BLOCK a power of two known at compile time, `tl.constexpr`) and guards the ragged edge with masks.
Each kernel here comes the same way:

    1. a torch reference, with the memory traffic it causes in a comment;
    2. the kernel, a comment on each argument;
    3. a launcher that checks its inputs, allocates the output and picks the grid;
    4. FLOP and byte counts, so notebook 05 can say how far from the hardware's limits it runs: they
       are moe_lab.core.cost's (add_flops, softmax_bytes, matmul_bytes, ...), available here under the
       same names.

Run on a GPU they compile; on the CPU they run through Triton's interpreter (see moe_lab.kernels),
where bfloat16 is refused.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moe_lab.kernels import INTERPRETED, check_device, check_dtype_supported

import triton  # noqa: E402  (after moe_lab.kernels: it decides whether kernels are interpreted)
import triton.language as tl  # noqa: E402


# ----------------------------------------------------------------------------------------------
# 1. Vector add: out = x + y
# ----------------------------------------------------------------------------------------------
def add_reference(x: Tensor, y: Tensor) -> Tensor:
    """Read 2n elements, write n: one pass, as good as it gets; the kernel below does the same."""
    return x + y


@triton.jit
def add_kernel(
    x_ptr,  # pointer to the first input, n_elements contiguous values
    y_ptr,  # pointer to the second input, same length
    out_ptr,  # pointer to the output, same length
    n_elements,  # how many elements in total (the last block is partial: mask it)
    BLOCK_SIZE: tl.constexpr,  # elements per program; a power of two, fixed at compile time
):
    pid = tl.program_id(axis=0)  # which block this program owns
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # (BLOCK_SIZE,) element indices
    mask = offsets < n_elements  # False past the end: those lanes neither load nor store
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def add(x: Tensor, y: Tensor, block_size: int = 1024) -> Tensor:
    """x + y through `add_kernel`: one program per block of `block_size` elements."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype; got {x.dtype} and {y.dtype}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two; got {block_size}")
    check_dtype_supported(x=x, y=y)
    check_device(x=x, y=y)
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, block_size),)  # enough programs to cover every element
        add_kernel[grid](x, y, out, n, BLOCK_SIZE=block_size)
    return out


# ----------------------------------------------------------------------------------------------
# 2. Fused row softmax: softmax(x)[i, j] = exp(x[i, j] - max_j x[i]) / sum_j exp(x[i, j] - max_j x[i])
# ----------------------------------------------------------------------------------------------
def softmax_reference(x: Tensor) -> Tensor:
    """Row softmax in five torch ops, each a kernel that goes through DRAM (x is M x N):

        x_max = x.max(dim=1)       read MN,      write M
        z = x - x_max[:, None]     read MN + M,  write MN
        num = torch.exp(z)         read MN,      write MN
        den = num.sum(dim=1)       read MN,      write M
        out = num / den[:, None]   read MN + M,  write MN
                                   ------------------------
                                   read 5MN + 2M, write 3MN + 2M

    The fused kernel reads MN and writes MN: about 4x less traffic, so about 4x faster when bound
    by memory (which softmax is).
    """
    x_max = x.max(dim=1).values  # (M,)
    z = x - x_max[:, None]  # (M, N)
    num = torch.exp(z)  # (M, N)
    den = num.sum(dim=1)  # (M,)
    return num / den[:, None]  # (M, N)


@triton.jit
def softmax_kernel(
    out_ptr,  # pointer to the output, (n_rows, n_cols)
    in_ptr,  # pointer to the input, (n_rows, n_cols)
    in_row_stride,  # elements between the starts of two input rows (rows may be padded)
    out_row_stride,  # the same for the output
    n_cols,  # the true row length, at most BLOCK_SIZE
    BLOCK_SIZE: tl.constexpr,  # the next power of two >= n_cols: one block holds a whole row
):
    row = tl.program_id(axis=0)  # one program per row
    cols = tl.arange(0, BLOCK_SIZE)  # (BLOCK_SIZE,)
    mask = cols < n_cols
    # Lanes past the row's end read -inf: they never win the max and exp(-inf) = 0 adds nothing.
    x = tl.load(in_ptr + row * in_row_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    z = x - tl.max(x, axis=0)  # subtract the row max: exp never overflows
    num = tl.exp(z)
    out = num / tl.sum(num, axis=0)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


MAX_SOFTMAX_COLS = 1 << 16  # a row must fit in one block (registers / shared memory)


def softmax(x: Tensor) -> Tensor:
    """Row softmax of a 2-D tensor through `softmax_kernel` (computed in float32, stored in x's dtype)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols); got shape {tuple(x.shape)}")
    n_rows, n_cols = x.shape
    if n_cols > MAX_SOFTMAX_COLS:
        raise ValueError(f"x has {n_cols} columns; this one-block-per-row kernel takes at most {MAX_SOFTMAX_COLS}")
    check_dtype_supported(x=x)
    check_device(x=x)
    if x.stride(1) != 1:
        x = x.contiguous()  # the kernel assumes unit stride along a row
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    block = triton.next_power_of_2(n_cols)
    # More warps for longer rows: each warp's 32 threads share the row. (Ignored by the interpreter.)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    softmax_kernel[(n_rows,)](out, x, x.stride(0), out.stride(0), n_cols, BLOCK_SIZE=block, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------
# 3. Tiled matmul: C (M, N) = A (M, K) @ B (K, N)
# ----------------------------------------------------------------------------------------------
def matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """cuBLAS (GPU) or MKL/OpenBLAS (CPU). Ideal traffic: read MK + KN, write MN; 2MNK FLOPs.
    With M = N = K = n that is 3n^2 elements for 2n^3 FLOPs: compute-bound once n is large."""
    return a @ b


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,  # pointers to A (M, K), B (K, N) and the output C (M, N)
    M, N, K,  # the problem's sizes; none needs to be a multiple of a block size
    stride_am, stride_ak,  # elements between neighbours of A along M and along K
    stride_bk, stride_bn,  # the same for B
    stride_cm, stride_cn,  # the same for C
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # the tile of C one program computes
    BLOCK_K: tl.constexpr,  # how much of K one loop step consumes
    GROUP_M: tl.constexpr,  # tile rows per group in the program ordering (see below)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (as torch), "tf32" otherwise (unused for 16-bit)
):
    # Program ordering for L2 reuse. Row-major order (pid -> row pid // n_tiles_n) makes consecutive
    # programs sweep a whole row of C tiles: they share A's rows but each needs a different column
    # block of B, so B streams through L2 again for every row. Grouped order walks GROUP_M tile rows
    # column by column instead: programs running at the same time touch GROUP_M row blocks of A and
    # few column blocks of B, and both stay in L2.
    pid = tl.program_id(axis=0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * n_tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = min(n_tiles_m - first_m, GROUP_M)  # the last group may be shorter
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of C this program writes
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # accumulate in float32 whatever the inputs
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_ok = offs_k < K
        # Masked lanes load 0: a zero row of A or column of B adds nothing to the dot.
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, c, mask=m_ok[:, None] & n_ok[None, :])


def matmul_config(dtype: torch.dtype) -> dict:
    """Block sizes for `matmul`: small under the interpreter (it is slow per program, and small tiles
    exercise the masks); on the GPU a tile that fills an H100's tensor cores. Notebook 07 autotunes."""
    if INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # exact float32 runs on CUDA cores: smaller tiles
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def matmul(a: Tensor, b: Tensor, **config) -> Tensor:
    """a @ b through `matmul_kernel`, accumulating in float32 and returning a's dtype.
    Keyword arguments override `matmul_config` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, ...)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a must be (M, K) and b (K, N); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype; got {a.dtype} and {b.dtype}")
    check_dtype_supported(a=a, b=b)
    check_device(a=a, b=b)
    cfg = {**matmul_config(a.dtype), **config}
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if not INTERPRETED and cfg[name] < 16:
            raise ValueError(f"{name}={cfg[name]}: tl.dot needs blocks of at least 16 when compiled")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if c.numel() == 0:
        return c
    if K == 0:
        return c.zero_()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)  # one program per tile of C
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        c.stride(0), c.stride(1), DOT_PRECISION=precision, **cfg)
    return c


