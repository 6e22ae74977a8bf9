"""The cost model of the course, in one place: FLOPs, bytes, arithmetic intensity and the padding
arithmetic of the MoE layout. The tutorial kernels (moe_lab.kernels.intro), the routing layout
(moe_lab.kernels.moe_routing), the tile counts (moe_lab.tiling), the roofline (moe_lab.profiling),
the bench and the notebooks all use these definitions. Nothing here needs Triton or a GPU.

1. Elementwise and softmax (notebook 05): an add reads two values and writes one; a fused softmax
   reads and writes each element once, the five-op torch version about four times as much.
2. Matmul (notebooks 00, 05, 07): C (M, N) = A (M, K) @ B (K, N) costs 2*M*N*K FLOPs (a multiply
   and an add per term); ideally each matrix moves once; a tiled kernel without cache re-reads A once
   per column of tiles and B once per row of tiles. Its backward (dA and dB) costs twice the forward.
3. The MoE expert layer (notebook 07). A SwiGLU layer (Shazeer 2020) with T tokens, top-k routing,
   width d and expert width f runs N = T*k routed rows through three matmuls:

       gate  x @ w1   2*N*d*f          forward = 6*N*d*f = 6*T*k*d*f
       up    x @ w3   2*N*d*f          backward = 2 x forward: each matmul needs the gradient of
       down  h @ w2   2*N*f*d          its input (dX = dY W^T) and of its weight (dW = X^T dY)

   SwiGLU's elementwise work and the routing weights (about 5*N*f + 2*N*d FLOPs: 2.3 % of the
   matmuls at the cpu preset, under 1 % from the gpu preset up) are left out, as torch.utils.flop_counter also leaves them out. Its bytes come in
   three parts (`moe_bytes`): the weights of the experts that receive tokens (under random routing,
   E * (1 - (1 - k/E)^T) of them: `expected_active_experts`), the activations, and the intermediates
   each implementation writes and reads back (INTERMEDIATE_TRAFFIC; "minimal" is the lower bound).
4. Padding (notebook 06): the layout pads each expert's rows to whole blocks of block_m rows.
"""
from __future__ import annotations

from typing import Literal, Optional

Pass = Literal["forward", "backward", "forward+backward"]
PASSES = ("forward", "backward", "forward+backward")


def _check_pass(mode: str) -> None:
    if mode not in PASSES:
        raise ValueError(f"mode={mode!r}: expected one of {PASSES}")


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name}={v!r}: expected a number >= 0")



# ----------------------------------------------------------------------------------------------
# 0. Sizes and intensity
# ----------------------------------------------------------------------------------------------
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def itemsize(dtype) -> int:
    """Bytes per element: a torch dtype, its name ("bfloat16"), or already a number of bytes."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype < 1:
            raise ValueError(f"itemsize={dtype}: expected a positive number of bytes")
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPE_BYTES)} or a number of bytes")
    return DTYPE_BYTES[name]


def arithmetic_intensity(flops: float, n_bytes: float) -> float:
    """FLOPs per byte moved. Compare it with the device's peak FLOP/s divided by its bandwidth (the
    roofline's ridge point) to see whether a kernel is bound by memory or by compute. Zero bytes has
    no intensity: a ValueError, as for a negative count."""
    if not n_bytes > 0:
        raise ValueError(f"n_bytes={n_bytes}: expected a positive number of bytes")
    return flops / n_bytes


# ----------------------------------------------------------------------------------------------
# 1. Elementwise add and row softmax
# ----------------------------------------------------------------------------------------------
def add_flops(n: int) -> int:
    """One addition per element."""
    return n


def add_bytes(n: int, dtype) -> int:
    """Read x and y, write out: 3n elements."""
    return 3 * n * itemsize(dtype)


def softmax_flops(n_rows: int, n_cols: int) -> int:
    """Per element: compare for the max, subtract, exp, add for the sum, divide (exp counted as 1)."""
    return 5 * n_rows * n_cols


def softmax_bytes(n_rows: int, n_cols: int, dtype, fused: bool = True) -> int:
    """DRAM traffic: fused reads and writes each element once; the five-op torch version (see
    moe_lab.kernels.intro.softmax_reference) reads 5MN + 2M and writes 3MN + 2M elements."""
    m, n = n_rows, n_cols
    elements = 2 * m * n if fused else (5 * m * n + 2 * m) + (3 * m * n + 2 * m)
    return elements * itemsize(dtype)


# ----------------------------------------------------------------------------------------------
# 2. Matmul C (M, N) = A (M, K) @ B (K, N)
# ----------------------------------------------------------------------------------------------
def matmul_flops(M: int, N: int, K: int) -> int:
    """A multiply and an add for each of the M*N*K products."""
    return 2 * M * N * K


def matmul_bytes(M: int, N: int, K: int, dtype, block_m: Optional[int] = None, block_n: Optional[int] = None,
                 mode: Pass = "forward") -> int:
    """DRAM traffic of C (M, N) = A (M, K) @ B (K, N). Without blocks: the ideal, each matrix moved
    once (MK + KN + MN). With (block_m, block_n) and no cache: every tile of C re-reads its rows of A
    and columns of B, so A is read ceil(N / block_n) times and B ceil(M / block_m) times; L2 (and
    grouped ordering) is what brings the real figure down towards the ideal. mode="backward" counts
    the ideal traffic of dA = dC B^T and dB = A^T dC (dC, A, B read; dA, dB written), and
    "forward+backward" both passes."""
    _check_pass(mode)
    size = itemsize(dtype)
    if mode != "forward":
        if block_m is not None or block_n is not None:
            raise ValueError("block_m and block_n count a forward tiling: use them with mode='forward'")
        fwd = M * K + K * N + M * N
        bwd = M * N + M * K + K * N + M * K + K * N
        return (bwd if mode == "backward" else fwd + bwd) * size
    if block_m is None or block_n is None:
        elements = M * K + K * N + M * N
    else:
        elements = M * K * -(-N // block_n) + K * N * -(-M // block_m) + M * N
    return elements * size


# ----------------------------------------------------------------------------------------------
# 3. The MoE expert layer: FLOPs and bytes
# ----------------------------------------------------------------------------------------------
def moe_flops_breakdown(tokens: int, d_model: int, d_expert: int, top_k: int) -> dict[str, int]:
    """Forward FLOPs of each matmul of a SwiGLU expert layer: {"gate", "up", "down"}."""
    _check_positive(tokens=tokens, d_model=d_model, d_expert=d_expert, top_k=top_k)
    n = tokens * top_k  # routed rows
    return {"gate": 2 * n * d_model * d_expert, "up": 2 * n * d_model * d_expert, "down": 2 * n * d_expert * d_model}


def moe_flops(tokens: int, d_model: int, d_expert: int, top_k: int, mode: Pass = "forward") -> int:
    """Matmul FLOPs of a SwiGLU expert layer: 6*T*k*d*f forward, twice that backward, three times
    that for forward+backward (see the module docstring)."""
    _check_pass(mode)
    fwd = sum(moe_flops_breakdown(tokens, d_model, d_expert, top_k).values())
    return {"forward": fwd, "backward": 2 * fwd, "forward+backward": 3 * fwd}[mode]


def dense_equal_flops_shape(tokens: int, d_model: int, d_expert: int, top_k: int) -> tuple[int, int, int]:
    """(M, K, N) of one dense matmul with the forward FLOPs of the expert layer: (T*k, d) @ (d, 3f),
    2*(T*k)*d*(3f) = 6*T*k*d*f. Its backward (dA and dB) also costs twice its forward."""
    return tokens * top_k, d_model, 3 * d_expert


def expected_active_experts(tokens: int, n_experts: int, top_k: int) -> float:
    """Expected number of experts that receive at least one of T tokens, when each token picks top_k
    distinct experts uniformly at random, independently of the others: E * (1 - (1 - k/E)^T)."""
    _check_positive(tokens=tokens, n_experts=n_experts, top_k=top_k)
    if n_experts < 1 or not 0 < top_k <= n_experts:
        raise ValueError(f"top_k={top_k}, n_experts={n_experts}: expected 1 <= top_k <= n_experts")
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


# Intermediate traffic in units of N*d, N*f, T*d and (active experts)*T*d, N = T*k routed rows.
# Counted op by op from each implementation's code (moe_lab.model.experts, moe_lab.kernels); each
# op reads its inputs and writes its output once. "forward" is inference (no saved tensors);
# "backward" is the extra traffic of the backward pass after a training forward.
INTERMEDIATE_TRAFFIC = {
    # backend: {pass: (Nd, Nf, Td, E_active*Td)}
    "minimal": {"forward": (0, 0, 0, 0), "backward": (0, 0, 0, 0)},
    # forward: h written and read (2Nf), the (N, d) per-assignment buffer written and read by the
    # combine (2Nd); training also writes a1, a3 (2Nf). Backward: a1, a3 read and da1, da3 written
    # (4Nf), da1, da3 read by the dx and the dW1/dW3 kernels (4Nf), h read by dW2 (Nf); dy gathered
    # twice and x once per row (3Nd), the dx buffer written and combined (2Nd).
    "triton": {"forward": (2, 2, 0, 0), "backward": (5, 9, 0, 0)},
    # forward: permuted copy of x (write 1, read 2), a1, a3, silu(a1), h (write + read each: 8Nf),
    # expert outputs, torch.cat, weighting (2Nd each), and index_add into zeros (2Td).
    "sorted": {"forward": (9, 8, 2, 0), "backward": (16, 15, 2, 0)},
    # as sorted without the torch.cat (the grouped matmul writes one (N, d) output)
    "grouped_mm": {"forward": (7, 8, 2, 0), "backward": (16, 15, 2, 0)},
    # as grouped_mm, counted at perfect balance (padding adds (max load / mean load - 1) of every
    # N-sized term), plus the gate-and-up weights concatenated per call (weights, not counted here)
    "padded": {"forward": (7, 8, 2, 0), "backward": (16, 15, 2, 0)},
    # as grouped_mm, but y = y.index_add(...) copies all of y once per active expert (2Td each),
    # and the backward of x[token] accumulates a (T, d) gradient per active expert (4Td each).
    "reference": {"forward": (7, 8, 1, 2), "backward": (16, 15, 0, 4)},
}


def moe_bytes(tokens: int, d_model: int, d_expert: int, n_experts: int, top_k: int, itemsize: int,
              backend: str = "minimal", mode: Pass = "forward", active_experts: Optional[float] = None) -> dict:
    """Bytes an expert layer moves, as {"weights", "activations", "intermediates", "total"}.

    active_experts: how many experts receive tokens (default: `expected_active_experts`).
    backend: a key of INTERMEDIATE_TRAFFIC ("minimal" = weights and activations only, the lower bound).
    Backward weights: w1, w3, w2 of the active experts read again, and all E weight gradients written.
    """
    _check_pass(mode)
    if backend not in INTERMEDIATE_TRAFFIC:
        raise ValueError(f"backend={backend!r}: expected one of {tuple(INTERMEDIATE_TRAFFIC)}")
    T, d, f, E, k = tokens, d_model, d_expert, n_experts, top_k
    act = expected_active_experts(T, E, k) if active_experts is None else active_experts
    if not 0 <= act <= E:
        raise ValueError(f"active_experts={active_experts}: expected a number in [0, n_experts={E}]")
    N = T * k
    per_expert = 3 * d * f  # w1, w3, w2
    parts = {"forward": {"weights": act * per_expert, "activations": 2 * T * d},
             "backward": {"weights": (act + E) * per_expert, "activations": 3 * T * d}}
    passes = ["forward", "backward"] if mode == "forward+backward" else [mode]
    out = {"weights": 0.0, "activations": 0.0, "intermediates": 0.0}
    for p in passes:
        cNd, cNf, cTd, cETd = INTERMEDIATE_TRAFFIC[backend][p]
        if p == "forward" and mode == "forward+backward" and backend == "triton":
            cNf += 2  # the training forward also writes a1 and a3 for the backward
        out["weights"] += parts[p]["weights"]
        out["activations"] += parts[p]["activations"]
        out["intermediates"] += cNd * N * d + cNf * N * f + cTd * T * d + cETd * act * T * d
    out = {name: v * itemsize for name, v in out.items()}
    out["total"] = out["weights"] + out["activations"] + out["intermediates"]
    return out



# ----------------------------------------------------------------------------------------------
# 4. Padding of the block-aligned layout (moe_lab.kernels.moe_routing)
# ----------------------------------------------------------------------------------------------
def max_padded_rows(n_assignments: int, n_experts: int, block_m: int) -> int:
    """Rows the layout may need, known without looking at the routing: each non-empty expert (at most
    min(E, A) of them) wastes fewer than block_m rows of padding. Rounded up to whole blocks."""
    rows = n_assignments + min(n_experts, n_assignments) * (block_m - 1)
    return -(-rows // block_m) * block_m


def padded_rows(rows_per_expert, block_m: int) -> list:
    """Each expert's rows rounded up to whole blocks of block_m (an expert with no rows takes none)."""
    return [-(-int(n) // block_m) * block_m for n in rows_per_expert]
