"""Tile arithmetic for the Triton kernels of notebooks 05 and 06, as plain functions and pictures.

A tiled matmul C (M, N) = A (M, K) @ B (K, N) launches one program per BLOCK_M x BLOCK_N tile of C;
each program steps along K, BLOCK_K at a time, loading a BLOCK_M x BLOCK_K tile of A and a
BLOCK_K x BLOCK_N tile of B (moe_lab.kernels.intro.matmul). `matmul_tiling` counts what that costs:
the grid, the loads per program, the bytes moved from global memory, the arithmetic intensity, the
shared memory the tiles need, and the work spent on masked-out lanes at the ragged edges.

The MoE grouped GEMM (moe_lab.kernels.moe_gemm) first pads every expert's rows up to a multiple of
BLOCK_M (moe_lab.kernels.moe_routing.moe_align; MegaBlocks, Gale et al. 2022), so that each block of
rows belongs to one expert. `grouped_gemm_tiling` counts the padding, the wasted fraction and the
programs, with the same formulas as moe_align (tests check the two agree on random routings).

Nothing here imports Triton: the counts run anywhere, and the widgets in moe_lab.course.widgets are thin
layers over them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from moe_lab.core import cost, machine

# The GPUs the explorer compares a tile with, and the shared memory one program may use on each
# (moe_lab.core.machine.KNOWN_GPUS).
SHARED_MEMORY_LIMITS = {gpu: machine.KNOWN_GPUS[gpu]["shared_memory"] for gpu in ("H100", "A100", "T4")}

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _si(x: float, unit: str) -> str:
    """1.5e9, "FLOPs" -> "1.50 GFLOPs": a number with a readable prefix."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _check_size(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_block(name: str, value: int) -> None:
    # tl.arange(0, BLOCK) needs a power of two, fixed at compile time
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two (tl.arange needs one); got {value!r}")


# ----------------------------------------------------------------------------------------------
# 1. A tiled matmul
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatmulTiling:
    """What a tiled matmul launch costs (see `matmul_tiling`). Byte counts assume no cache: every
    program reads its tiles from global memory (DRAM); L2 brings the real figure down towards
    `ideal_bytes`.

    Attributes:
        M, N, K, block_m, block_n, block_k, num_stages, itemsize: the inputs (itemsize in bytes)
        grid:            (tiles along M, tiles along N); one program per tile of C
        n_programs:      grid[0] * grid[1]
        k_steps:         loop steps per program, ceil(K / block_k)
        tile_loads_per_program: 2 * k_steps (one tile of A and one of B per step)
        elements_loaded_per_program: k_steps * (block_m*block_k + block_k*block_n), masked lanes included
        flops:           2*M*N*K, the useful work
        flops_executed:  what tl.dot computes, masked (zero) lanes included
        bytes_moved:     A read once per tile column, B once per tile row, C written once
        ideal_bytes:     each matrix moved once (MK + KN + MN elements)
        shared_memory_bytes: num_stages copies of one A tile and one B tile (an estimate: the
                         compiler may add a little for layout conversions)
        output_waste:    fraction of the computed C elements that are masked out (edge tiles)
        k_waste:         fraction of the K loop spent on masked lanes (last step partial)
    """

    M: int
    N: int
    K: int
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    itemsize: int
    grid: tuple
    n_programs: int
    k_steps: int
    tile_loads_per_program: int
    elements_loaded_per_program: int
    flops: int
    flops_executed: int
    bytes_moved: int
    ideal_bytes: int
    shared_memory_bytes: int
    output_waste: float
    k_waste: float

    @property
    def arithmetic_intensity(self) -> float:
        """Useful FLOPs per byte moved without cache."""
        return self.flops / self.bytes_moved

    @property
    def ideal_intensity(self) -> float:
        """Useful FLOPs per byte when each matrix moves once (a perfect cache)."""
        return self.flops / self.ideal_bytes

    @property
    def compute_waste(self) -> float:
        """Fraction of the executed FLOPs spent on masked lanes (edges along M, N and K)."""
        return 1 - self.flops / self.flops_executed

    @property
    def fits(self) -> dict:
        """{GPU name: whether shared_memory_bytes fits that GPU's per-block limit}."""
        return {gpu: self.shared_memory_bytes <= limit for gpu, limit in SHARED_MEMORY_LIMITS.items()}

    def tile_waste(self) -> torch.Tensor:
        """(grid[0], grid[1]) masked-out fraction of each tile of C: 0 inside, > 0 on the ragged edges."""
        rows = torch.clamp(self.M - torch.arange(self.grid[0]) * self.block_m, max=self.block_m)  # valid rows per tile row
        cols = torch.clamp(self.N - torch.arange(self.grid[1]) * self.block_n, max=self.block_n)
        return 1 - (rows[:, None] * cols[None, :]).double() / (self.block_m * self.block_n)

    def summary(self) -> str:
        fits = ", ".join(f"{g} {'fits' if ok else 'too big'} ({SHARED_MEMORY_LIMITS[g] // 1024} KiB)"
                         for g, ok in self.fits.items())
        return "\n".join([
            f"C ({self.M} x {self.N}) = A ({self.M} x {self.K}) @ B ({self.K} x {self.N}), "
            f"tiles {self.block_m} x {self.block_n}, BLOCK_K {self.block_k}, {self.itemsize} bytes/element",
            f"grid {self.grid[0]} x {self.grid[1]} = {self.n_programs} programs, {self.k_steps} K-steps each "
            f"({self.tile_loads_per_program} tile loads, {self.elements_loaded_per_program:,} elements)",
            f"{_si(self.flops, 'FLOPs')} useful, {_si(self.flops_executed, 'FLOPs')} executed "
            f"({self.compute_waste:.1%} on masked lanes; {self.output_waste:.1%} of C's tile area is masked)",
            f"{_si(self.bytes_moved, 'B')} moved without cache, {_si(self.ideal_bytes, 'B')} ideal; "
            f"intensity {self.arithmetic_intensity:.1f} FLOP/B ({self.ideal_intensity:.1f} ideal)",
            f"shared memory {self.shared_memory_bytes / 1024:.1f} KiB for {self.num_stages} stage(s): {fits}",
        ])


def matmul_tiling(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, dtype="float32",
                  num_stages: int = 1) -> MatmulTiling:
    """Count the grid, loads, bytes, FLOPs, shared memory and edge waste of the tiled matmul
    moe_lab.kernels.intro.matmul with these block sizes (powers of two, as tl.arange requires).

    num_stages: how many K-steps Triton's software pipeline keeps in flight on a GPU; each needs its
    own A and B tiles in shared memory (the kernels of this course use 3 when compiled, 1 under the
    interpreter).

    >>> t = matmul_tiling(100, 64, 64, 32, 32, 32)
    >>> t.grid, t.k_steps
    ((4, 2), 2)
    """
    for name, v in (("M", M), ("N", N), ("K", K)):
        _check_size(name, v)
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        _check_block(name, v)
    _check_size("num_stages", num_stages)
    size = cost.kernel_itemsize(dtype)
    tm, tn, ks = _cdiv(M, block_m), _cdiv(N, block_n), _cdiv(K, block_k)
    a_tile, b_tile = block_m * block_k, block_k * block_n
    return MatmulTiling(
        M=M, N=N, K=K, block_m=block_m, block_n=block_n, block_k=block_k, num_stages=num_stages, itemsize=size,
        grid=(tm, tn), n_programs=tm * tn, k_steps=ks, tile_loads_per_program=2 * ks,
        elements_loaded_per_program=ks * (a_tile + b_tile),
        flops=cost.matmul_flops(M, N, K),
        flops_executed=cost.matmul_flops(tm * block_m, tn * block_n, ks * block_k),
        bytes_moved=cost.matmul_bytes(M, N, K, size, block_m=block_m, block_n=block_n),
        ideal_bytes=cost.matmul_bytes(M, N, K, size),
        shared_memory_bytes=num_stages * (a_tile + b_tile) * size,
        output_waste=1 - (M * N) / (tm * block_m * tn * block_n),
        k_waste=1 - K / (ks * block_k),
    )


def plot_matmul_tiles(t: MatmulTiling, ax=None):
    """The output matrix C cut into tiles, one per program; edge tiles shaded by their masked-out
    fraction. Returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5))
    tm, tn = t.grid
    waste = t.tile_waste().numpy()
    xs = [j * t.block_n for j in range(tn + 1)]
    ys = [i * t.block_m for i in range(tm + 1)]
    grid_lines = tm <= 64 and tn <= 64  # past that, lines would paint the picture black
    mesh = ax.pcolormesh(xs, ys, waste, cmap="Reds", vmin=0, vmax=1, edgecolors="0.4" if grid_lines else "face",
                         linewidth=0.5 if grid_lines else 0)
    ax.add_patch(plt.Rectangle((0, 0), t.N, t.M, fill=False, ec="C0", lw=2, label=f"C: {t.M} x {t.N}"))
    if tm * tn <= 64:
        for i in range(tm):
            for j in range(tn):
                if waste[i, j] > 0:
                    ax.text((j + 0.5) * t.block_n, (i + 0.5) * t.block_m, f"{waste[i, j]:.0%}",
                            ha="center", va="center", fontsize=8)
    ax.set_xlim(0, tn * t.block_n)
    ax.set_ylim(tm * t.block_m, 0)  # row 0 at the top, as a matrix is written
    ax.set_aspect("equal")
    ax.set_xlabel(f"column of C (N = {t.N}; BLOCK_N = {t.block_n})")
    ax.set_ylabel(f"row of C (M = {t.M}; BLOCK_M = {t.block_m})")
    ax.set_title(f"{tm} x {tn} = {t.n_programs} programs; {t.output_waste:.1%} of the tiles' area is masked out")
    ax.legend(loc="lower left", fontsize=8)
    plt.colorbar(mesh, ax=ax, label="masked-out fraction of the tile")
    return ax


# ----------------------------------------------------------------------------------------------
# 2. The MoE grouped GEMM: rows padded per expert
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupedGemmTiling:
    """The block-aligned layout of moe_align and what one grouped projection (rows x k) @ (k x n) per
    expert costs on it (see `grouped_gemm_tiling`).

    Attributes:
        tokens_per_expert: (E,) rows routed to each expert (assignments, not tokens, when top_k > 1)
        block_m, block_n:  rows per block (the layout's) and output columns per program
        padded_per_expert: each count rounded up to a multiple of block_m
        offsets:           (E + 1,) padded start rows, as moe_align's offsets
        padded_rows:       offsets[E], the rows the kernels compute
        real_rows:         sum of tokens_per_expert
        used_blocks:       padded_rows / block_m, the blocks with an expert
        max_rows, max_blocks: the buffer bound moe_align allocates before it knows the counts
        programs_launched: max_blocks * ceil(n / block_n); the unused blocks' programs return at once
        programs_working:  used_blocks * ceil(n / block_n)
        flops, flops_executed: 2 * rows * k * n for the real rows and for the padded rows
        bytes_moved:       x rows read once per column block, each expert's weights once per row
                           block, the output written once (no cache)
    """

    tokens_per_expert: tuple
    block_m: int
    block_n: int
    k: int
    n: int
    itemsize: int
    padded_per_expert: tuple
    offsets: tuple
    padded_rows: int
    real_rows: int
    used_blocks: int
    max_rows: int
    max_blocks: int
    programs_launched: int
    programs_working: int
    flops: int
    flops_executed: int
    bytes_moved: int

    @property
    def waste_fraction(self) -> float:
        """Padding rows / all computed rows: the share of the GEMM's work that is thrown away."""
        return 1 - self.real_rows / self.padded_rows if self.padded_rows else 0.0

    @property
    def overhead(self) -> float:
        """Padding rows / real rows (notebook 06's 'padding overhead': offsets[E] / rows routed - 1)."""
        return self.padded_rows / self.real_rows - 1 if self.real_rows else 0.0

    @property
    def arithmetic_intensity(self) -> float:
        """Useful FLOPs per byte moved without cache: few rows per expert read each weight for little work."""
        return self.flops / self.bytes_moved if self.bytes_moved else 0.0

    def summary(self) -> str:
        E = len(self.tokens_per_expert)
        return "\n".join([
            f"{E} experts, {self.real_rows} routed rows, BLOCK_M {self.block_m}: {self.padded_rows} rows after "
            f"padding ({self.waste_fraction:.1%} of them padding, overhead {self.overhead:.1%})",
            f"{self.used_blocks} blocks used of {self.max_blocks} allocated; programs: {self.programs_working} "
            f"working, {self.programs_launched} launched (n = {self.n}, BLOCK_N = {self.block_n})",
            f"one projection (rows x {self.k}) @ ({self.k} x {self.n}): {_si(self.flops, 'FLOPs')} useful, "
            f"{_si(self.flops_executed, 'FLOPs')} executed; {_si(self.bytes_moved, 'B')} moved without cache, "
            f"{self.arithmetic_intensity:.1f} FLOP/B",
        ])


def grouped_gemm_tiling(tokens_per_expert: Sequence[int], block_m: int, k: int, n: int, block_n: int = 32,
                        dtype="float32", n_assignments: Optional[int] = None) -> GroupedGemmTiling:
    """Pad each expert's rows to a multiple of block_m, as moe_align does, and count rows, waste,
    programs, FLOPs and bytes of one grouped projection (k -> n) over that layout.

    tokens_per_expert: rows routed to each expert (zero allowed: such an expert gets no block).
    n_assignments: T * top_k including dropped assignments, which sizes moe_align's buffers
        (default: the routed rows, i.e. nothing dropped).

    >>> g = grouped_gemm_tiling([5, 3, 5, 0], block_m=4, k=8, n=8)
    >>> g.padded_per_expert, g.padded_rows, g.used_blocks
    ((8, 4, 8, 0), 20, 5)
    """
    counts = [int(c) for c in tokens_per_expert]
    if not counts:
        raise ValueError("tokens_per_expert is empty: expected one count per expert")
    if any(c < 0 for c in counts):
        raise ValueError(f"tokens_per_expert must be counts >= 0; got {counts}")
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    _check_size("k", k)
    _check_size("n", n)
    size = cost.kernel_itemsize(dtype)
    real = sum(counts)
    A = real if n_assignments is None else n_assignments
    if A < real:
        raise ValueError(f"n_assignments={A} is fewer than the {real} routed rows")
    padded = tuple(cost.padded_rows(counts, block_m))
    offsets = [0]
    for p in padded:
        offsets.append(offsets[-1] + p)
    rows = offsets[-1]
    max_rows = cost.max_padded_rows(A, len(counts), block_m)
    col_blocks = _cdiv(n, block_n)
    return GroupedGemmTiling(
        tokens_per_expert=tuple(counts), block_m=block_m, block_n=block_n, k=k, n=n, itemsize=size,
        padded_per_expert=padded, offsets=tuple(offsets), padded_rows=rows, real_rows=real,
        used_blocks=rows // block_m, max_rows=max_rows, max_blocks=max_rows // block_m,
        programs_launched=(max_rows // block_m) * col_blocks, programs_working=(rows // block_m) * col_blocks,
        flops=cost.matmul_flops(real, n, k), flops_executed=cost.matmul_flops(rows, n, k),
        # padding rows are masked on load: only real rows are read, once per column block
        bytes_moved=(real * k * col_blocks + (rows // block_m) * k * n + real * n) * size,
    )


def random_expert_counts(n_tokens: int, n_experts: int, top_k: int, skew: float = 0.0, seed: int = 0) -> list:
    """Rows per expert when n_tokens tokens each pick top_k distinct experts at random; skew > 0 favours
    low-numbered experts (their scores get skew * (1 - e / E) added). Returns a list of E counts."""
    _check_size("n_tokens", n_tokens)
    _check_size("n_experts", n_experts)
    _check_size("top_k", top_k)
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} is more than n_experts={n_experts}")
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_tokens, n_experts, generator=g) + skew * (1 - torch.arange(n_experts) / n_experts)
    idx = scores.topk(top_k, dim=1).indices  # (T, top_k)
    return torch.bincount(idx.reshape(-1), minlength=n_experts).tolist()


def plot_moe_padding(g: GroupedGemmTiling, ax=None):
    """Each expert's routed rows and the padding up to a multiple of BLOCK_M, with block boundaries.
    Returns the Axes."""
    import matplotlib.pyplot as plt

    E = len(g.tokens_per_expert)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, min(8.0, 1.2 + 0.25 * E)))
    experts = list(range(E))
    pad = [p - c for p, c in zip(g.padded_per_expert, g.tokens_per_expert)]
    ax.barh(experts, g.tokens_per_expert, color="C0", label="routed rows")
    ax.barh(experts, pad, left=g.tokens_per_expert, color="C3", alpha=0.35, hatch="//", label="padding")
    widest = max(g.padded_per_expert) or g.block_m
    lines = widest // g.block_m <= 64  # block boundaries, while they stay readable
    if lines:  # drawn over the bars: a padded bar ends on a line
        for b in range(1, widest // g.block_m + 1):
            ax.axvline(b * g.block_m, color="0.35", lw=0.8, ls="--", zorder=3)
    ax.set_xlim(0, widest * 1.02)
    ax.set_ylim(E - 0.5, -0.5)  # expert 0 at the top
    ax.set_xlabel(f"rows (dashed grey lines: block boundaries, BLOCK_M = {g.block_m})" if lines
                  else f"rows (blocks of BLOCK_M = {g.block_m})")
    ax.set_ylabel("expert")
    ax.set_title(f"{g.real_rows} rows -> {g.padded_rows} after padding: {g.waste_fraction:.1%} of the work is padding")
    ax.legend(loc="lower right", fontsize=8)
    return ax
