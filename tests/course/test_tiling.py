"""Tile and padding arithmetic of moe_lab.course.tiling: by hand on small cases, against the kernels' own
formulas and moe_align's metadata, edge cases, bad input, and the widgets built over it.

Run: MPLBACKEND=Agg .venv/bin/python -m pytest tests/course/test_tiling.py -q
"""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_lab.core import cost
from moe_lab.course import tiling  # noqa: E402
from moe_lab.course.tiling import grouped_gemm_tiling, matmul_tiling  # noqa: E402


# ----------------------------------------------------------------------------------------------
# the tiled matmul
# ----------------------------------------------------------------------------------------------
def test_matmul_counts_by_hand():
    # C (100 x 70) = A (100 x 33) @ B (33 x 70) in 32 x 32 tiles, BLOCK_K 32, float32
    t = matmul_tiling(100, 70, 33, 32, 32, 32, dtype="float32")
    assert t.grid == (4, 3) and t.n_programs == 12  # ceil(100/32), ceil(70/32)
    assert t.k_steps == 2 and t.tile_loads_per_program == 4  # ceil(33/32) steps, an A and a B tile each
    assert t.elements_loaded_per_program == 2 * (32 * 32 + 32 * 32)
    assert t.flops == 2 * 100 * 70 * 33
    assert t.flops_executed == 2 * 128 * 96 * 64  # the padded tiles, padded K
    # A (3300 elements) read once per tile column (3), B (2310) once per tile row (4), C written once
    assert t.bytes_moved == (3300 * 3 + 2310 * 4 + 7000) * 4
    assert t.ideal_bytes == (3300 + 2310 + 7000) * 4
    assert t.shared_memory_bytes == (32 * 32 + 32 * 32) * 4  # one stage
    assert t.output_waste == pytest.approx(1 - 7000 / (128 * 96))
    assert t.k_waste == pytest.approx(1 - 33 / 64)
    assert t.compute_waste == pytest.approx(1 - 462_000 / 1_572_864)
    assert t.arithmetic_intensity == pytest.approx(462_000 / t.bytes_moved)
    waste = t.tile_waste()
    assert waste.shape == (4, 3)
    assert (waste[:3, :2] == 0).all()  # interior tiles compute nothing masked
    assert waste[3, 0].item() == pytest.approx(1 - 4 * 32 / 1024)  # last tile row holds 100 - 96 = 4 rows
    assert waste[0, 2].item() == pytest.approx(1 - 32 * 6 / 1024)  # last tile column holds 70 - 64 = 6 columns
    assert waste[3, 2].item() == pytest.approx(1 - 4 * 6 / 1024)
    # the mean masked fraction over tiles is the output waste
    assert waste.mean().item() == pytest.approx(t.output_waste)


@pytest.mark.parametrize("M,N,K,bm,bn", [(1823, 781, 517, 128, 128), (127, 95, 131, 32, 32), (1, 4096, 4096, 64, 64),
                                          (4096, 4096, 4096, 128, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_bytes_and_grid_match_the_cost_model(M, N, K, bm, bn, dtype):
    t = matmul_tiling(M, N, K, bm, bn, 32, dtype=dtype)
    assert t.bytes_moved == cost.matmul_bytes(M, N, K, dtype, block_m=bm, block_n=bn)
    assert t.ideal_bytes == cost.matmul_bytes(M, N, K, dtype)
    assert t.flops == cost.matmul_flops(M, N, K)
    import triton

    assert t.n_programs == triton.cdiv(M, bm) * triton.cdiv(N, bn)  # intro.matmul's grid


def test_shared_memory_against_named_gpus():
    # intro.matmul's GPU tile for 16-bit inputs: 128 x 128 x 64, 3 stages
    t = matmul_tiling(4096, 4096, 4096, 128, 128, 64, dtype="bfloat16", num_stages=3)
    assert t.shared_memory_bytes == 3 * (128 * 64 + 64 * 128) * 2 == 96 * 1024
    assert t.fits == {"H100": True, "A100": True, "T4": False}
    assert "T4 too big (64 KiB)" in t.summary() and "H100 fits (227 KiB)" in t.summary()
    assert matmul_tiling(4096, 4096, 4096, 128, 128, 64, "float16", num_stages=2).fits["T4"]  # exactly 64 KiB
    big = matmul_tiling(4096, 4096, 4096, 256, 256, 128, "float32", num_stages=3)  # 768 KiB
    assert not any(big.fits.values())
    assert tiling.SHARED_MEMORY_LIMITS["H100"] == 227 * 1024 and tiling.SHARED_MEMORY_LIMITS["T4"] == 64 * 1024


def test_block_bigger_than_the_matrix_and_one_row():
    t = matmul_tiling(5, 3, 7, 16, 16, 16)
    assert t.grid == (1, 1) and t.k_steps == 1
    assert t.output_waste == pytest.approx(1 - 15 / 256)
    assert t.flops_executed == 2 * 16 * 16 * 16
    row = matmul_tiling(1, 256, 64, 64, 64, 32)  # M = 1: a single token through a weight matrix
    assert row.grid == (1, 4) and row.output_waste == pytest.approx(63 / 64)
    # B is read once (one tile row), A four times; intensity ~1 FLOP/B: hopelessly memory-bound
    assert row.bytes_moved == (64 * 4 + 64 * 256 + 256) * 4
    assert row.arithmetic_intensity < 1


def test_exact_multiples_waste_nothing():
    t = matmul_tiling(64, 128, 96, 32, 64, 32)
    assert t.output_waste == 0 and t.k_waste == 0 and t.compute_waste == 0
    assert (t.tile_waste() == 0).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(block_m=48), "block_m must be a power of two.*got 48"),
    (dict(block_k=0), "block_k must be a power of two.*got 0"),
    (dict(M=0), "M must be an integer >= 1; got 0"),
    (dict(K=-3), "K must be an integer >= 1; got -3"),
    (dict(num_stages=0), "num_stages must be an integer >= 1; got 0"),
    (dict(dtype="int8"), "dtype='int8': expected one of"),
])
def test_matmul_bad_input_names_the_value(kwargs, message):
    args = dict(M=64, N=64, K=64, block_m=32, block_n=32, block_k=32) | kwargs
    with pytest.raises(ValueError, match=message):
        matmul_tiling(**args)


# ----------------------------------------------------------------------------------------------
# the MoE grouped GEMM
# ----------------------------------------------------------------------------------------------
def test_grouped_gemm_by_hand():
    # notebook 06's example: counts 5, 3, 5, 0 in blocks of 4; T*top_k = 14 (one assignment dropped)
    g = grouped_gemm_tiling([5, 3, 5, 0], block_m=4, k=8, n=40, block_n=32, n_assignments=14)
    assert g.padded_per_expert == (8, 4, 8, 0)
    assert g.offsets == (0, 8, 12, 20, 20) and g.padded_rows == 20 and g.real_rows == 13
    assert g.waste_fraction == pytest.approx(7 / 20) and g.overhead == pytest.approx(20 / 13 - 1)
    assert g.used_blocks == 5
    assert g.max_rows == 28 and g.max_blocks == 7  # 14 + min(4, 14) * 3 = 26, rounded up to blocks of 4
    assert g.programs_working == 5 * 2 and g.programs_launched == 7 * 2  # ceil(40 / 32) column blocks
    assert g.flops == 2 * 13 * 8 * 40 and g.flops_executed == 2 * 20 * 8 * 40
    # x: 13 real rows x 8, once per column block; weights: 8 x 40 once per used row block; out 13 x 40
    assert g.bytes_moved == (13 * 8 * 2 + 5 * 8 * 40 + 13 * 40) * 4


def test_grouped_gemm_edge_cases():
    none = grouped_gemm_tiling([0, 0, 0], block_m=16, k=8, n=8)
    assert none.padded_rows == 0 and none.used_blocks == 0 and none.max_rows == 0
    assert none.waste_fraction == 0 and none.programs_launched == 0
    exact = grouped_gemm_tiling([32, 0, 64], block_m=32, k=8, n=8)
    assert exact.waste_fraction == 0 and exact.padded_per_expert == (32, 0, 64)
    one = grouped_gemm_tiling([1], block_m=64, k=8, n=8)  # one row in a block of 64
    assert one.padded_rows == 64 and one.waste_fraction == pytest.approx(63 / 64)
    block_one = grouped_gemm_tiling([3, 5], block_m=1, k=8, n=8)
    assert block_one.padded_rows == 8 and block_one.waste_fraction == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(tokens_per_expert=[]), "tokens_per_expert is empty"),
    (dict(tokens_per_expert=[3, -1]), r"counts >= 0; got \[3, -1\]"),
    (dict(block_m=24), "block_m must be a power of two.*got 24"),
    (dict(k=0), "k must be an integer >= 1; got 0"),
    (dict(n_assignments=2), "n_assignments=2 is fewer than the 8 routed rows"),
])
def test_grouped_gemm_bad_input(kwargs, message):
    args = dict(tokens_per_expert=[3, 5], block_m=16, k=8, n=8) | kwargs
    with pytest.raises(ValueError, match=message):
        grouped_gemm_tiling(**args)


@pytest.mark.parametrize("seed", range(12))
def test_grouped_gemm_agrees_with_moe_align(seed):
    """The layout counted here is the one the kernels get: padded rows, offsets, used blocks and the
    buffer bound equal moe_align's metadata on random routings with drops and idle experts."""
    routing = pytest.importorskip("moe_lab.kernels.moe_routing", reason="moe_lab.kernels needs Triton (Linux)")
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 300, (1,), generator=g))
    E = int(torch.randint(1, 40, (1,), generator=g))
    top_k = int(torch.randint(1, min(E, 6) + 1, (1,), generator=g))
    block_m = 2 ** int(torch.randint(0, 8, (1,), generator=g))  # 1 .. 128
    used = max(1, E - int(torch.randint(0, E, (1,), generator=g)))  # experts >= used stay idle
    idx = torch.rand(T, used, generator=g).topk(min(top_k, used), dim=1).indices
    idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < 0.15, -1)  # some assignments dropped
    align = routing.moe_align(idx, E, block_m)
    counts = align.counts.tolist()
    t = grouped_gemm_tiling(counts, block_m, k=16, n=16, n_assignments=idx.numel())
    assert list(t.offsets) == align.offsets.tolist()
    assert t.padded_rows == int(align.offsets[-1])
    assert t.used_blocks == int((align.block_expert >= 0).sum())
    assert t.max_rows == align.max_rows and t.max_blocks == align.max_blocks
    assert t.max_rows == routing.max_padded_rows(idx.numel(), E, block_m)
    # rows that hold a real assignment (sorted_ids below the sentinel) are the routed rows
    assert t.real_rows == int((align.sorted_ids < align.n_assignments).sum())


def test_random_expert_counts():
    counts = tiling.random_expert_counts(500, 16, 4, seed=3)
    assert len(counts) == 16 and sum(counts) == 500 * 4 and max(counts) <= 500
    assert counts == tiling.random_expert_counts(500, 16, 4, seed=3)  # seeded
    skewed = tiling.random_expert_counts(500, 16, 4, skew=3.0)
    assert skewed[0] > 0.9 * 500 and skewed[0] > 4 * max(skewed[-1], 1)  # expert 0: nearly every token
    with pytest.raises(ValueError, match="top_k=5 is more than n_experts=4"):
        tiling.random_expert_counts(10, 4, 5)


# ----------------------------------------------------------------------------------------------
# pictures and widgets
# ----------------------------------------------------------------------------------------------
def test_plots_show_the_numbers_with_labelled_axes():
    t = matmul_tiling(100, 70, 33, 32, 32, 32)
    ax = tiling.plot_matmul_tiles(t)
    assert ax.get_xlabel() and ax.get_ylabel() and "12 programs" in ax.get_title()
    mesh = ax.collections[0]
    assert torch.allclose(torch.as_tensor(mesh.get_array()).reshape(4, 3).double(), t.tile_waste())  # shading = waste
    g = grouped_gemm_tiling([5, 3, 5, 0], block_m=4, k=8, n=8)
    ax = tiling.plot_moe_padding(g)
    assert ax.get_xlabel() and ax.get_ylabel() == "expert" and "35.0%" in ax.get_title()
    widths = sorted((round(p.get_y() + p.get_height() / 2), p.get_x(), p.get_width()) for p in ax.patches)
    assert [(e, x, w) for e, x, w in widths if x > 0 or w > 0] == [
        (0, 0, 5), (0, 5, 3), (1, 0, 3), (1, 3, 1), (2, 0, 5), (2, 5, 3)]  # routed rows, then padding
    plt.close("all")


def test_tiling_explorer_calls_the_plain_function(monkeypatch):
    from moe_lab.course.widgets import tiling_explorer

    calls = []
    real = tiling.matmul_tiling
    monkeypatch.setattr(tiling, "matmul_tiling", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    w = tiling_explorer()
    controls = {c.description: c for c in w.children if hasattr(c, "description")}
    assert {"M", "N", "K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "dtype", "stages"} <= set(controls)
    assert calls and calls[-1] == ((1823, 781, 517, 128, 128, 64), dict(dtype="bfloat16", num_stages=3))
    controls["M"].value = 100
    controls["dtype"].value = "float32"
    assert calls[-1] == ((100, 781, 517, 128, 128, 64), dict(dtype="float32", num_stages=3))
    plt.close("all")


def test_moe_padding_explorer_calls_the_plain_function(monkeypatch):
    from moe_lab.course.widgets import moe_padding_explorer

    seen = []
    real = tiling.grouped_gemm_tiling
    monkeypatch.setattr(tiling, "grouped_gemm_tiling", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    w = moe_padding_explorer()
    controls = {c.description: c for c in w.children if hasattr(c, "description")}
    assert {"tokens", "experts", "top-k", "BLOCK_M", "skew"} <= set(controls)
    assert seen[-1].real_rows == 512 * 6 and len(seen[-1].tokens_per_expert) == 64 and seen[-1].block_m == 64
    controls["BLOCK_M"].value = 16
    assert seen[-1].block_m == 16 and seen[-1].waste_fraction < seen[-2].waste_fraction  # smaller blocks pad less
    controls["experts"].value = 4
    controls["top-k"].value = 8  # more than the experts: clipped to 4
    assert len(seen[-1].tokens_per_expert) == 4 and seen[-1].real_rows == 512 * 4
    plt.close("all")
