# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Triton basics: programs, blocks and masks
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/05_triton_basics.ipynb)
#
# PyTorch runs an MoE layer as a chain of separate kernels, and each one reads its inputs from GPU
# memory and writes its result back. For most of the layer that memory traffic costs more time than
# the arithmetic. **Triton** lets you write your own GPU kernels in Python. In one kernel you can
# fuse several steps, so the intermediate results stay in registers and never go to memory. This
# notebook teaches Triton's programming model with three kernels of growing difficulty: a vector
# add, a fused row softmax and a tiled matrix multiply. Notebook 06 then uses the same ideas to
# write the MoE expert path.
#
# **What you will learn**
# - Triton's model: a *kernel* is one *program*; a *launch grid* runs many programs, and each one works on a *block* of data
# - how `tl.program_id`, `tl.arange`, masks, strides and `tl.constexpr` fit together
# - how fusion cuts memory traffic (softmax: about 4× fewer bytes than five torch ops)
# - tiling and grouped program order in a matmul, and why a matmul is compute-bound while add and softmax are memory-bound
# - how to count FLOPs and bytes, and what *arithmetic intensity* tells you
# - Triton's CPU interpreter compared with compiled GPU kernels, and why the interpreter must not be given bfloat16
#
# **Prerequisites**: notebook 00 (mode, device and the interpreter). Some NumPy-style indexing helps.
# You do not need to know CUDA. **Time to run**: CPU (2 cores): 12 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. Compiled on a GPU, interpreted on a CPU
#
# A function decorated with `@triton.jit` is a **kernel**. On a GPU, Triton compiles it the first
# time you launch it (Python → Triton IR → LLVM → PTX → machine code) and then reuses the binary.
# Without a GPU, Triton's **interpreter** runs the same kernel on CPU tensors, one program after
# another, using NumPy for each block operation. It is slow, but it really executes every index,
# mask and dot product, so the kernels in this notebook are checked on a laptop as well.
#
# Triton 3.8 decides between the two when `triton` is **first imported**: the environment variable
# `TRITON_INTERPRET=1` must already be set at that moment. `runtime.setup()` in the cell above set it
# (on a CPU machine). That is why every kernel notebook calls setup before `import triton`.
# `moe_lab.kernels` makes the same check and raises an error if the order was wrong.

# %%
import os
import time

import matplotlib.pyplot as plt
import torch

import triton
import triton.language as tl

from moe_lab.core.config import notebook_sizes
from moe_lab.core import cost  # the course's FLOP and byte counts (moe_lab.core.cost)
from moe_lab.kernels import INTERPRETED, intro  # intro: the canonical kernels of this notebook

dev = rt.device  # where kernel inputs live: 'cuda' (compiled) or 'cpu' (interpreter)
print("TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET", "(unset)"), "| kernels run",
      "through the interpreter" if INTERPRETED else "compiled for the GPU")
assert INTERPRETED == (not rt.on_gpu)

# %% [markdown]
# ## 2. Programs and blocks: who owns which element?
#
# A Triton kernel describes **one program**. Launching it as `kernel[grid](...)` starts
# `grid[0]` programs (and `grid[1]`, `grid[2]` along more axes). On a GPU they run in parallel, each
# on a streaming multiprocessor. A program learns its index from `tl.program_id(0)` and works on a
# whole **block** of values at once: `tl.arange(0, BLOCK)` is a vector of BLOCK offsets, and loads,
# stores and arithmetic act on the whole vector. CUDA is written per *thread*; Triton is written per
# *block*, and the compiler spreads the block over the threads for you.
#
# `BLOCK` is declared `tl.constexpr`. Its value is fixed when the kernel is compiled, so the block
# shape is known, and a new value means a new compiled binary. `tl.arange` also needs a power of
# two. Usually the data length is not a multiple of the block. The last program's block then runs
# past the end, and a **mask** switches those lanes off: they load nothing and store nothing.
#
# The smallest useful kernel writes, into each element, the index of the program that owns it:

# %%
@triton.jit
def owner_kernel(
    out_ptr,  # pointer to an int32 vector of n elements
    n,  # its length; the last block is partial
    BLOCK: tl.constexpr,  # elements per program, known at compile time
):
    pid = tl.program_id(axis=0)  # this program's index in the grid
    offsets = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) the elements this program owns
    mask = offsets < n  # lanes past the end are switched off
    tl.store(out_ptr + offsets, tl.full((BLOCK,), 0, tl.int32) + pid, mask=mask)


n, BLOCK = 10, 4
owner = torch.full((n,), -1, dtype=torch.int32, device=dev)
grid = (triton.cdiv(n, BLOCK),)  # ceil(10 / 4) = 3 programs
owner_kernel[grid](owner, n, BLOCK=BLOCK)
print(f"{grid[0]} programs of {BLOCK} lanes over {n} elements:", owner.tolist())
assert owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # program 2 has 2 lanes masked off

# %% [markdown]
# Program 2 owns elements 8 to 11. Only 8 and 9 exist, so the mask switches off lanes 10 and 11.
# Without the mask, program 2 would write past the end of `owner`, into memory that belongs to
# some other tensor. On a GPU that usually fails silently.
#
# ## 3. Vector add
#
# **Motivation.** `x + y` is the simplest memory-bound kernel: one addition for every 12 bytes it
# moves (float32). Its speed is set by memory bandwidth alone, which makes it a good first kernel
# and a yardstick for the bandwidth of a device.
#
# **The torch reference** and its memory traffic:

# %%
def add_torch(x, y):
    # read 2n elements (x and y), write n (the output): 3n elements, n FLOPs
    return x + y


# %% [markdown]
# **The kernel.** Every argument has a comment. Pointers are the tensors themselves: Triton passes a
# torch tensor as a pointer to its first element, and `ptr + offsets` is a block of pointers.

# %%
@triton.jit
def add_kernel(
    x_ptr,  # pointer to the first input: n_elements contiguous values
    y_ptr,  # pointer to the second input, same length
    out_ptr,  # pointer to the output, same length
    n_elements,  # total length; not a multiple of BLOCK_SIZE in general
    BLOCK_SIZE: tl.constexpr,  # elements per program: a power of two fixed at compile time
):
    pid = tl.program_id(axis=0)  # which block this program owns
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # (BLOCK_SIZE,) element indices
    mask = offsets < n_elements  # False past the end
    x = tl.load(x_ptr + offsets, mask=mask)  # masked lanes are not read
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)  # ... and not written


def add_triton(x, y, block_size=1024):
    """The launcher: check inputs, allocate the output, choose the grid, launch."""
    assert x.shape == y.shape and x.is_contiguous() and y.is_contiguous(), "same shape, contiguous"
    out = torch.empty_like(x)
    n_elements = out.numel()
    grid = (triton.cdiv(n_elements, block_size),)  # enough programs to cover every element
    add_kernel[grid](x, y, out, n_elements, BLOCK_SIZE=block_size)
    return out


# %% [markdown]
# **Check on an awkward shape.** 98,431 is not a multiple of any block size (it is odd), so the last
# program is only partly full. Compare with torch and with the canonical version,
# `moe_lab.kernels.intro.add` (the same kernel; its launcher also checks dtypes and devices). An add
# is a single rounding, so the results must agree **bit for bit**.

# %%
n = 98_431
x = torch.randn(n, device=dev)
y = torch.randn(n, device=dev)
out = add_triton(x, y)
assert torch.equal(out, add_torch(x, y)), "the kernel differs from torch"
assert torch.equal(out, intro.add(x, y)), "the kernel differs from moe_lab.kernels.intro.add"
for block in (128, 4096):  # a different block size gives a different grid and the same result
    assert torch.equal(add_triton(x, y, block_size=block), out)
print(f"add: {n:,} elements, {triton.cdiv(n, 1024)} programs of 1024; identical to torch and to intro.add")

# %% [markdown]
# **FLOPs and bytes.** Counting them by hand gives one FLOP per element and 3n elements moved. The
# canonical counts `cost.add_flops` / `cost.add_bytes` must agree:

# %%
itemsize = x.element_size()
assert cost.add_flops(n) == n
assert cost.add_bytes(n, x.dtype) == 3 * n * itemsize
print(f"add: {cost.add_flops(n):,} FLOPs, {cost.add_bytes(n, x.dtype):,} bytes -> "
      f"{cost.arithmetic_intensity(cost.add_flops(n), cost.add_bytes(n, x.dtype)):.3f} FLOP/byte")

# %% [markdown]
# 0.083 FLOP per byte. By its data sheet an H100 does about 300 bf16 FLOPs in the time it takes to
# move one byte from HBM (section 6 calls this ratio the *ridge point*), so a vector add leaves its arithmetic units idle more than 99.9% of the time. The best a
# kernel like this can do is to move each byte exactly once. Triton's add already does that, and so
# does torch's. The gains come when *several* operations are fused, as in the softmax below.
#
# ## 4. A fused row softmax
#
# **Motivation.** Softmax appears in attention and in every softmax router of notebook 03. Written
# as plain torch operations, it launches five kernels, and each one makes a full pass over memory.
# A single Triton kernel can load a row once, do all the work in registers, and write the row once.
#
# **The torch reference** and its memory traffic (x has M rows of N values):

# %%
def softmax_torch(x):
    x_max = x.max(dim=1).values  # read MN,      write M
    z = x - x_max[:, None]  # read MN + M,  write MN
    num = torch.exp(z)  # read MN,      write MN
    den = num.sum(dim=1)  # read MN,      write M
    return num / den[:, None]  # read MN + M,  write MN
    # total: read 5MN + 2M, write 3MN + 2M elements. A fused kernel reads MN and writes MN.


# %% [markdown]
# **The kernel.** One program per row. The block must hold a whole row, so `BLOCK_SIZE` is the next
# power of two at or above N, and the mask covers the gap. The masked lanes load `-inf`, because
# `-inf` never wins the max and `exp(-inf) = 0` adds nothing to the sum.
#
# This kernel introduces **strides**: the number of elements from the start of one row to the start
# of the next. A column slice `x[:, :781]` of a wider matrix has a row stride larger than 781. Passing
# the stride lets the kernel read such a view in place, with no copy.

# %%
@triton.jit
def softmax_kernel(
    out_ptr,  # pointer to the output (n_rows, n_cols)
    in_ptr,  # pointer to the input (n_rows, n_cols), rows possibly padded
    in_row_stride,  # elements between the starts of two input rows
    out_row_stride,  # the same for the output
    n_cols,  # the true row length (<= BLOCK_SIZE)
    BLOCK_SIZE: tl.constexpr,  # next power of two >= n_cols: one block holds a whole row
):
    row = tl.program_id(axis=0)  # one program per row
    cols = tl.arange(0, BLOCK_SIZE)  # (BLOCK_SIZE,)
    mask = cols < n_cols
    x = tl.load(in_ptr + row * in_row_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    z = x - tl.max(x, axis=0)  # subtract the row max: exp cannot overflow
    num = tl.exp(z)
    out = num / tl.sum(num, axis=0)  # max, exp, sum and divide all happen in registers
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def softmax_triton(x):
    assert x.dim() == 2 and x.stride(1) == 1, "2-D with contiguous rows"
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(n_cols)
    softmax_kernel[(n_rows,)](out, x, x.stride(0), out.stride(0), n_cols, BLOCK_SIZE=block)
    return out


# %% [markdown]
# **Check on an awkward shape**, given as a strided view: the rows are slices of wider rows. The
# results should match torch's softmax to float32 rounding, and match `moe_lab.kernels.intro.softmax`.

# %%
M, N = notebook_sizes("05", rt.mode)["softmax"]  # not powers of two: the masks must work
wide = torch.randn(M, N + 19, device=dev) * 3
x = wide[:, :N]  # (M, N) view with row stride N + 19
assert not x.is_contiguous() and x.stride(0) == N + 19
out = softmax_triton(x)
torch.testing.assert_close(out, torch.softmax(x, dim=1), rtol=1e-6, atol=1e-6)
torch.testing.assert_close(out, softmax_torch(x), rtol=1e-6, atol=1e-6)
torch.testing.assert_close(out, intro.softmax(x), rtol=1e-6, atol=1e-7)  # the same kernel
print(f"softmax: {M} x {N} (row stride {x.stride(0)}), block {triton.next_power_of_2(N)}: matches torch and "
      f"intro.softmax")

big = torch.tensor([[1000.0, 1000.0, -1000.0]], device=dev)  # exp(1000) would overflow without the max
assert torch.isfinite(softmax_triton(big)).all()

# %% [markdown]
# **FLOPs and bytes.** Five FLOPs per element (compare, subtract, exp, add, divide; exp counted as
# one). The traffic is 2MN elements fused and 8MN + 4M for the five torch ops:

# %%
fused, unfused = cost.softmax_bytes(M, N, x.dtype), cost.softmax_bytes(M, N, x.dtype, fused=False)
assert fused == 2 * M * N * itemsize and unfused == (8 * M * N + 4 * M) * itemsize
assert cost.softmax_flops(M, N) == 5 * M * N
print(f"softmax {M}x{N}: {cost.softmax_flops(M, N):,} FLOPs; fused {fused / 1e6:.1f} MB, five torch ops "
      f"{unfused / 1e6:.1f} MB ({unfused / fused:.2f}x more)")
assert 3.9 < unfused / fused < 4.1

# %% [markdown]
# Fusion does not save a single FLOP. It saves **bytes**: about 4× fewer, and since softmax is
# memory-bound, that makes it about 4× faster. (`torch.softmax` is itself a fused kernel; the fair
# comparison in section 7 is with the five-op version.) FlashAttention is this idea taken
# further: it fuses the whole attention computation so that the T×T score matrix never goes to memory.
#
# ## 5. A tiled matrix multiply
#
# **Motivation.** Every expert of an MoE layer is three matmuls. A matmul reuses its data heavily:
# 2MNK FLOPs from only MK + KN + MN elements. The kernel's job is to make that reuse happen
# on-chip. Each program computes one **tile** of C (BLOCK_M × BLOCK_N). It steps along K, loading a
# BLOCK_M × BLOCK_K tile of A and a BLOCK_K × BLOCK_N tile of B, and accumulates their product with
# `tl.dot`, which runs on the GPU's tensor cores.
#
# **The torch reference:**

# %%
def matmul_torch(a, b):
    # cuBLAS on a GPU, MKL/OpenBLAS on a CPU: 2MNK FLOPs; ideal traffic: read MK + KN, write MN
    return a @ b


# %% [markdown]
# **Program order.** Programs that run at the same time share the L2 cache. With *row-major* order
# (program p → tile row p // n_tiles_n), the first programs sweep along one row of C. They share
# A's rows, but each needs a different column block of B. *Grouped* order walks GROUP_M tile rows
# down one column at a time, so programs in flight touch fewer blocks of A and B in total.
#
# **Exercise: grouped order.** Write the mapping in plain Python (the kernel below uses the same
# arithmetic). Programs come in groups of `group_m * n_tiles_n`; group g covers tile rows
# `g * group_m` onwards (the last group may have fewer rows), and inside a group the program
# index walks down the group's rows first, then moves one tile column right. Every tile must get
# exactly one program; `group_m=1` is row-major order.

# %%
def tile_of(pid, n_tiles_m, n_tiles_n, group_m):
    """(tile row, tile column) of program pid in grouped order; group_m=1 is row-major."""
    # BEGIN SOLUTION
    per_group = group_m * n_tiles_n
    first_m = (pid // per_group) * group_m
    rows = min(n_tiles_m - first_m, group_m)  # the last group may be shorter
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows
    # END SOLUTION


from moe_lab.course import checks

checks.check_tile_of(tile_of)  # the same arithmetic as intro.matmul_kernel's first lines

# %% [markdown]
# Count the distinct blocks of A and B read by the first 16 programs on an 8×8 grid of tiles:

# %%
n_tm = n_tn = 8  # an 8 x 8 grid of C tiles
in_flight = 16  # suppose 16 programs run at the same time
orders, blocks_read = {}, {}
# every call of tile_of before a figure opens (an unsolved exercise stops here, no empty axes)
for gm in (1, 4):
    order = torch.zeros(n_tm, n_tn, dtype=torch.long)
    for pid in range(n_tm * n_tn):
        order[tile_of(pid, n_tm, n_tn, gm)] = pid
    first = [tile_of(p, n_tm, n_tn, gm) for p in range(in_flight)]
    # row blocks of A + column blocks of B
    blocks_read[gm] = len({m for m, _ in first}) + len({nn for _, nn in first})
    orders[gm] = order
row_major = [tile_of(p, 4, 4, 1) for p in range(5)]
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
for ax, (gm, order) in zip(axes, orders.items()):
    ax.imshow((order < in_flight).float().numpy(), cmap="Blues", vmin=0, vmax=1.6)
    for (m, nn), pid in zip(torch.cartesian_prod(torch.arange(n_tm), torch.arange(n_tn)).tolist(),
                            order.flatten().tolist()):
        ax.text(nn, m, pid, ha="center", va="center", fontsize=8)
    ax.set_title(f"GROUP_M={gm}: programs 0-{in_flight - 1} read\n{blocks_read[gm]} blocks of A and B")
    ax.set_xlabel("tile column of C (pid_n)")
    ax.set_ylabel("tile row of C (pid_m)")
fig.suptitle("which program computes each tile of C (shaded: the first 16)")
plt.tight_layout()
plt.show()
assert row_major == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]  # GROUP_M = 1 is row-major
assert blocks_read == {1: 2 + 8, 4: 4 + 4}  # grouped order reads fewer blocks for the same work

# %% [markdown]
# **The kernel.** Two kinds of masks guard the ragged edges: rows and columns past M or N are not
# stored, and K steps past K load zeros, which add nothing to the dot product. The accumulator is
# float32 whatever the input dtype. `DOT_PRECISION="ieee"` keeps float32 products exact. Otherwise
# GPUs would use TF32, which is about 1e-3 off.

# %%
@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,  # pointers to A (M, K), B (K, N), C (M, N)
    M, N, K,  # problem sizes; none needs to be a multiple of a block
    stride_am, stride_ak,  # elements between neighbours of A along M and along K
    stride_bk, stride_bn,  # the same for B
    stride_cm, stride_cn,  # the same for C
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # the C tile one program computes
    BLOCK_K: tl.constexpr,  # the slice of K consumed per loop step
    GROUP_M: tl.constexpr,  # tile rows per group of the program order
    DOT_PRECISION: tl.constexpr,  # "ieee" (exact float32) or "tf32"
):
    # 1. which tile of C: grouped order, as in tile_of above
    pid = tl.program_id(axis=0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = min(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    # 2. the rows and columns of C this program owns
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    # 3. pointers to the first K-slice: a 2-D block of addresses built by broadcasting
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0  # the last K-slice may be partial
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)  # acc += a @ b
        a_ptrs += BLOCK_K * stride_ak  # slide along K
        b_ptrs += BLOCK_K * stride_bk
    # 4. write the tile, masked at the edges of C
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul_triton(a, b, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, **launch):
    (M, K), (_, N) = a.shape, b.shape
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)  # one program per tile of C
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        c.stride(0), c.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                        GROUP_M=GROUP_M, DOT_PRECISION=precision, **launch)
    return c


# %% [markdown]
# **Check on an awkward shape**: no dimension is a multiple of 32, and B is passed transposed (a
# column-major view). The strides handle that without a copy. We compare with torch and with
# `moe_lab.kernels.intro.matmul`, using row-major and grouped order.

# %%
M, N, K = notebook_sizes("05", rt.mode)["matmul"]
a = torch.randn(M, K, device=dev)
b = torch.randn(N, K, device=dev).t()  # (K, N) with strides (1, K)
assert b.stride() == (1, K)
c = matmul_triton(a, b)
torch.testing.assert_close(c, matmul_torch(a, b), rtol=1e-4, atol=1e-4)
torch.testing.assert_close(c, intro.matmul(a, b, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4), rtol=1e-5,
                           atol=1e-5)
# order changes nothing but speed
torch.testing.assert_close(matmul_triton(a, b, GROUP_M=1), c, rtol=0, atol=0)
print(f"matmul: ({M} x {K}) @ ({K} x {N}), {triton.cdiv(M, 32) * triton.cdiv(N, 32)} programs: "
      f"largest difference from torch {(c - a @ b).abs().max().item():.1e}")

# %% [markdown]
# Why 1e-4 and not bit-exact? A dot product of K=131 terms adds them in a different order in the
# kernel (32 at a time, accumulated) than in BLAS, and float32 addition is not associative. The
# difference stays at the level of float32 rounding. Changing GROUP_M changes only *which program
# computes which tile*, not the arithmetic, so the results stay bit-identical.
#
# **FLOPs and bytes.** 2MNK FLOPs. The ideal traffic moves each matrix once. Without a cache, every
# program would re-read its rows of A and columns of B: A once per tile column and B once per tile
# row. The L2 cache, helped by grouped order, brings the real traffic close to the ideal:

# %%
ideal = cost.matmul_bytes(M, N, K, a.dtype)
no_cache = cost.matmul_bytes(M, N, K, a.dtype, block_m=32, block_n=32)
assert cost.matmul_flops(M, N, K) == 2 * M * N * K
assert ideal == (M * K + K * N + M * N) * itemsize
assert no_cache == (M * K * triton.cdiv(N, 32) + K * N * triton.cdiv(M, 32) + M * N) * itemsize
print(f"matmul {M}x{N}x{K}: {cost.matmul_flops(M, N, K) / 1e6:.1f} MFLOPs; ideal {ideal / 1e6:.2f} MB, "
      f"32x32 tiles re-reading from memory {no_cache / 1e6:.2f} MB ({no_cache / ideal:.1f}x)")

# %% [markdown]
# **Explore the tiles.** `moe_lab.course.tiling.matmul_tiling` does this counting for any sizes and block
# sizes: the grid, the K-steps and tile loads of each program, the bytes, the arithmetic intensity,
# the shared memory the tiles need, and the work spent on masked-out lanes at the edges. On a GPU
# Triton overlaps loads with compute by keeping `num_stages` K-steps in flight, each with its own A
# and B tiles in shared memory, so the need grows with the stages. The picture shows C cut into
# tiles, one per program; edge tiles are shaded by how much of them is masked out. First the launch
# above, then an explorer: move the sliders (try M = 1, a single token, or blocks bigger than the
# matrix, or float32 tiles of 256 with 3 stages).

# %%
from moe_lab.course import tiling
from moe_lab.course.widgets import tiling_explorer

launch = tiling.matmul_tiling(M, N, K, 32, 32, 32, dtype=a.dtype)  # the 32 x 32 x 32 launch above
print(launch.summary())
tiling.plot_matmul_tiles(launch)
plt.show()
assert launch.n_programs == triton.cdiv(M, 32) * triton.cdiv(N, 32)
assert launch.bytes_moved == no_cache and launch.ideal_bytes == ideal  # the counts of the cell above
# intro.matmul_config on a GPU
gpu_tile = tiling.matmul_tiling(4096, 4096, 4096, 128, 128, 64, dtype="bfloat16", num_stages=3)
print(f"intro.matmul's GPU tile (128 x 128 x 64, bf16, 3 stages) needs about "
      f"{gpu_tile.shared_memory_bytes // 1024} KiB of shared memory; fits per GPU: {gpu_tile.fits}")
assert gpu_tile.fits["H100"] and not gpu_tile.fits["T4"]
tiling_explorer()

# %% [markdown]
# ## 6. Arithmetic intensity: which kernels are memory-bound?
#
# Divide a kernel's FLOPs by the bytes it moves to get its **arithmetic intensity**. A device
# reaches peak FLOP/s only when a kernel's intensity exceeds the device's *ridge point*, its peak
# FLOP/s divided by its memory bandwidth. Below the ridge the kernel is memory-bound, and its time
# is its bytes divided by the bandwidth. Here are the counts at the sizes a GPU runs, in bfloat16,
# compared with an H100's ridge from its data sheet (989 TFLOP/s, 3.35 TB/s: about 295 FLOP/byte).
# Real ceilings sit below data sheets: notebook 07 measures them, and on the course's recorded H200
# run the measured ridge is 179 FLOP/byte. The verdicts below are the same with either:

# %%
H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak, H100 SXM data sheet
H100_HBM_BYTES_PER_S = 3.35e12  # HBM3 bandwidth, H100 SXM data sheet
ridge = H100_BF16_FLOPS / H100_HBM_BYTES_PER_S  # FLOP per byte
bf16 = torch.bfloat16
cases = {
    "add, 2^24 elements": (cost.add_flops(1 << 24), cost.add_bytes(1 << 24, bf16)),
    "softmax 4096x4096, 5 torch ops": (cost.softmax_flops(4096, 4096),
                                       cost.softmax_bytes(4096, 4096, bf16, fused=False)),
    "softmax 4096x4096, fused": (cost.softmax_flops(4096, 4096), cost.softmax_bytes(4096, 4096, bf16)),
    "matmul 16x4096x4096 (16 tokens)": (cost.matmul_flops(16, 4096, 4096),
                                        cost.matmul_bytes(16, 4096, 4096, bf16)),
    "matmul 4096^3": (cost.matmul_flops(4096, 4096, 4096), cost.matmul_bytes(4096, 4096, 4096, bf16)),
}
intensity = {name: cost.arithmetic_intensity(fl, by) for name, (fl, by) in cases.items()}
print(f"{'kernel':34s} {'GFLOP':>9s} {'MB moved':>9s} {'FLOP/byte':>10s}  bound by")
for name, (fl, by) in cases.items():
    print(f"{name:34s} {fl / 1e9:9.3f} {by / 1e6:9.1f} {intensity[name]:10.2f}  "
          f"{'memory' if intensity[name] < ridge else 'compute'}")

fig, ax = plt.subplots(figsize=(7, 3.2))
ax.barh(list(intensity), list(intensity.values()),
        color=["C0" if v < ridge else "C3" for v in intensity.values()])
ax.axvline(ridge, color="k", ls="--", lw=1, label=f"H100 ridge point ≈ {ridge:.0f} FLOP/byte")
ax.set_xscale("log")
ax.set_xlabel("arithmetic intensity (FLOP per byte of memory traffic, bf16)")
ax.invert_yaxis()
ax.legend(loc="upper right")
ax.set_title("blue: memory-bound, red: compute-bound")
plt.show()
assert intensity["add, 2^24 elements"] < 1 < ridge < intensity["matmul 4096^3"]
from moe_lab.studies.bench_records import load_bench_records

measured_ridges = [r["ceilings"]["ridge_flop_per_byte"] for r in load_bench_records() if r.get("ceilings")]
# the same verdicts with the measured ridge
assert all((v < ridge) == (v < m) for v in intensity.values() for m in measured_ridges)
# few rows: memory-bound, like a lightly used expert
assert intensity["matmul 16x4096x4096 (16 tokens)"] < ridge

# %% [markdown]
# Reading the plot: add and softmax are far below the ridge, so for them only bytes matter, and
# fusion is the tool. A large square matmul is far above it, so it can keep the tensor cores busy.
# A matmul with only 16 rows has intensity below 16 FLOP/byte, because each weight byte is used
# only 16 times. This is what happens to an expert that receives few tokens. Notebook 06 therefore
# groups each expert's tokens into one block-aligned GEMM (GEneral Matrix Multiply, the BLAS name for
# C = A @ B, and what kernel writers call a matmul kernel), and never runs one small matmul per token.
#
# ## 7. bfloat16 and the interpreter
#
# bfloat16 keeps float32's exponent with a 7-bit mantissa, and GPUs multiply it at full tensor-core
# speed. NumPy has no bfloat16. Triton 3.8's interpreter therefore hands the kernel the *raw bits*
# as if they were another type, and the results are garbage. Below, our own `add_kernel` (which
# checks nothing) is launched directly on bf16 tensors, and then the canonical `intro.add` is
# called; the canonical version refuses bf16 under the interpreter:

# %%
xb = torch.tensor([1.0, 2.0, 3.0, 0.5], device=dev, dtype=torch.bfloat16)
yb = torch.tensor([1.0, 1.0, 1.0, 0.25], device=dev, dtype=torch.bfloat16)
raw = torch.empty_like(xb)
add_kernel[(1,)](xb, yb, raw, 4, BLOCK_SIZE=4)
print("our unchecked kernel, bf16:", raw.float().tolist(), "| torch:", (xb + yb).float().tolist(),
      "| match:", torch.equal(raw, xb + yb))
try:
    out_b = intro.add(xb, yb)
    print("intro.add ran in bfloat16 (compiled):", out_b.float().tolist())
    assert not INTERPRETED and torch.equal(out_b, xb + yb)
except TypeError as err:
    print("intro.add refused:", err)
    assert INTERPRETED  # only the interpreter refuses bf16

# %% [markdown]
# On a GPU both calls print `[2, 3, 4, 0.75]`. Under the interpreter the unchecked kernel returns
# nonsense, and `intro.add` raises a `TypeError` that names the argument and tells you to use float32.
# That is why CPU runs of the course use float32 (`rt.dtype`), and why every launcher in
# `moe_lab.kernels` calls `check_dtype_supported` first.
#
# ## 8. Timings: only meaningful when compiled
#
# On a GPU, `triton.testing.do_bench` runs a function repeatedly and reports its runtime in
# milliseconds. It warms up first (the first launch compiles), flushes the L2 cache between runs,
# and synchronises the GPU. Dividing bytes by time gives GB/s; dividing FLOPs by time gives TFLOP/s.
# Under the interpreter such numbers would be meaningless: they measure Python and NumPy running
# one program after another, not the kernel.

# %%
if rt.on_gpu:
    from triton.testing import do_bench

    dt = rt.dtype  # bf16 on Ampere and newer
    xa, ya = torch.randn(1 << 24, device=dev, dtype=dt), torch.randn(1 << 24, device=dev, dtype=dt)
    xs = torch.randn(4096, 4096, device=dev, dtype=dt)
    am, bm = torch.randn(4096, 4096, device=dev, dtype=dt), torch.randn(4096, 4096, device=dev, dtype=dt)
    big_tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    assert torch.equal(add_triton(xa, ya), xa + ya)
    torch.testing.assert_close(softmax_triton(xs), torch.softmax(xs.float(), 1).to(dt), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(matmul_triton(am, bm, **big_tile).float(), (am @ bm).float(), rtol=3e-2,
                               atol=1.0)
    runs = {  # name: (function, FLOPs, bytes it must move at least)
        "add torch": (lambda: xa + ya, cost.add_flops(1 << 24), cost.add_bytes(1 << 24, dt)),
        "add triton": (lambda: add_triton(xa, ya), cost.add_flops(1 << 24), cost.add_bytes(1 << 24, dt)),
        "softmax 5 torch ops": (lambda: softmax_torch(xs), cost.softmax_flops(4096, 4096),
                                cost.softmax_bytes(4096, 4096, dt)),
        "softmax torch.softmax": (lambda: torch.softmax(xs, 1), cost.softmax_flops(4096, 4096),
                                  cost.softmax_bytes(4096, 4096, dt)),
        "softmax triton": (lambda: softmax_triton(xs), cost.softmax_flops(4096, 4096),
                           cost.softmax_bytes(4096, 4096, dt)),
        "matmul torch (cuBLAS)": (lambda: am @ bm, cost.matmul_flops(4096, 4096, 4096),
                                  cost.matmul_bytes(4096, 4096, 4096, dt)),
        "matmul triton": (lambda: matmul_triton(am, bm, **big_tile), cost.matmul_flops(4096, 4096, 4096),
                          cost.matmul_bytes(4096, 4096, 4096, dt)),
    }
    ms = {name: do_bench(fn) for name, (fn, _, _) in runs.items()}
    print(f"{'kernel':24s} {'ms':>8s} {'GB/s':>8s} {'TFLOP/s':>8s}")
    for name, (_, fl, by) in runs.items():
        print(f"{name:24s} {ms[name]:8.3f} {by / ms[name] / 1e6:8.0f} {fl / ms[name] / 1e9:8.1f}")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(list(ms), [runs[k][2] / ms[k] / 1e6 for k in ms])
    ax.set_xlabel("effective bandwidth, GB/s (minimum bytes / time)")
    ax.invert_yaxis()
    ax.set_title(f"{torch.cuda.get_device_name()}, {str(dt).replace('torch.', '')}")
    plt.show()
    assert ms["softmax triton"] < ms["softmax 5 torch ops"]  # fewer bytes, less time
else:
    x_cpu, y_cpu = torch.randn(98_431), torch.randn(98_431)
    def best_of(fn, repeats=5):  # the fastest of a few runs, in seconds
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_interp, t_torch = best_of(lambda: add_triton(x_cpu, y_cpu), 2), best_of(lambda: x_cpu + y_cpu)
    print(f"Interpreter: add took {t_interp * 1e3:.1f} ms, torch on the CPU {t_torch * 1e3:.3f} ms. "
          "That measures Python and NumPy, not a kernel: meaningless for performance.\n"
          "On a GPU this cell times add, softmax and matmul against torch with triton.testing.do_bench; "
          "notebook 07 shows recorded GPU figures.")

# %% [markdown]
# What to expect on a GPU. The two adds reach the same bandwidth: each moves every byte once, and
# that is the best possible. The fused Triton softmax runs close to `torch.softmax` (which is fused
# too) and several times faster than the five-op version, roughly in proportion to the bytes saved.
# The Triton matmul with one fixed tile size gets within a modest factor of cuBLAS. Its speed also
# depends on the block sizes, on the number of **warps** (a warp is a group of 32 GPU threads that
# execute each instruction together; a program runs on `num_warps` of them) and on the pipeline
# stages: notebook 07 shows how the course's MoE kernels choose them.
#
# ## 9. Exercise: fuse SwiGLU's activation
#
# A SwiGLU expert computes `silu(a) * b` after its two up-projections. In torch, `F.silu(a) * b`
# runs two kernels: silu reads a and writes s (2n elements), and the multiply reads s and b and
# writes the output (3n), 5n in total. A fused kernel reads a and b and writes the output once,
# 3n in total. Write the kernel's body; the launcher is given.
# (Hint: `tl.sigmoid`; compute in float32 with `.to(tl.float32)` and cast back on store.)
# Notebook 06 fuses this exact step into the *epilogue* of the expert's up-projection GEMM: the code
# that runs after the matmul's loop, on the result still in registers.
#
# The check runs your launcher on awkward lengths and reads your kernel: every `tl.load` and
# `tl.store` needs a mask. A store past the end shows in the values (the output continues into a
# guard region the check inspects), but a load past the end changes no value here: it reads
# whatever follows the input, and on a GPU that is memory the kernel must not touch.

# %%
@triton.jit
def swiglu_act_kernel(
    a_ptr,  # pointer to the gate pre-activation (x @ w1), n contiguous values
    b_ptr,  # pointer to the up pre-activation (x @ w3)
    out_ptr,  # pointer to the output silu(a) * b
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    # BEGIN SOLUTION
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)
    # END SOLUTION


def swiglu_act(a, b, block=1024, out=None):  # out: where to write (the checker passes its own buffer)
    out = torch.empty_like(a) if out is None else out
    swiglu_act_kernel[(triton.cdiv(a.numel(), block),)](a, b, out, a.numel(), BLOCK=block)
    return out


checks.check_swiglu_act(swiglu_act)  # float32 on this device (interpreter on a CPU), float16 too on a GPU
print("swiglu_act moves 3n elements instead of 5n")

# %% [markdown]
# ## Summary
# - A Triton kernel is **one program**. The launch grid runs many programs, each owns a block
#   (`tl.program_id`, `tl.arange`), and **masks** guard the ragged edge.
# - `tl.constexpr` arguments (block sizes) are fixed at compile time. **Strides** let a kernel read
#   views (slices, transposes) in place.
# - **Fusion** saves bytes, not FLOPs. The fused softmax moves about 4× less memory than five torch
#   ops. A **tiled matmul** reuses each loaded tile for a whole BLOCK_M × BLOCK_N output tile, and
#   **grouped program order** helps L2 reuse.
# - **Arithmetic intensity** (FLOP/byte) compared with the device's ridge point tells you whether
#   a kernel is memory- or compute-bound. A matmul with few rows, such as a lightly loaded expert,
#   is memory-bound.
# - On a CPU, kernels run through Triton's interpreter: they are correct for float32 and float16,
#   wrong for bfloat16 (refused by the course's launchers), and meaningless for timing. On a GPU
#   they compile, and `triton.testing.do_bench` times them.
# - The canonical versions of this notebook's kernels live in `moe_lab.kernels.intro`.
#
# ## Papers and further reading
# - Tillet, Kung, Cox. *Triton: an intermediate language and compiler for tiled neural network computations* (MAPL 2019).
# - The Triton tutorials (vector add, fused softmax, matrix multiplication) in the Triton documentation.
# - Williams, Waterman, Patterson. *Roofline: an insightful visual performance model for multicore architectures* (2009).
# - Dao et al. *FlashAttention: fast and memory-efficient exact attention with IO-awareness* (2022): fusion taken to attention.
# - Gale et al. *MegaBlocks: efficient sparse training with mixture-of-experts* (2022); Tan et al. *Scattered mixture-of-experts implementation* (ScatterMoE, 2024): the MoE kernels of notebook 06.
# - DeepSeek-AI. *DeepSeek-V3 technical report* (2024): FP8 GEMMs and the hardware view of MoE training.
