"""The Triton MoE expert path (moe_lab.kernels.moe) against the readable reference.

On a CPU the kernels run through Triton's interpreter (float32 and float16; bfloat16 must raise);
tests marked `gpu` run the compiled kernels in float32, float16 and bfloat16 and skip without CUDA.
Every buffer a kernel writes is filled with NaN before the launch (moe_gemm.POISON_OUTPUTS), so an
element a kernel forgets to write fails the comparison instead of passing on stale memory.

Tolerances. float32 kernels against a float64 reference on the same inputs: max |error| <= 2e-5 times
the largest |value| of the reference, at least 1 (observed <= 1e-6: float32 rounding through sums of
up to a few hundred terms; a wrong index, mask or formula gives errors of order 1e-2 to 1). float16
under the interpreter: 1e-2 (results and saved activations rounded to float16). GPU 16-bit: the kernel's error against float64 may be at most
twice torch's own error in that dtype, plus a small floor.

Run: .venv/bin/python -m pytest tests/kernels/test_kernels_moe.py -q      (about a minute on 2 CPU cores)
"""
import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # find_spec: importing triton here would come too early
    pytest.skip("Triton is not installed (Linux only)", allow_module_level=True)

from moe_lab.kernels import INTERPRETED, moe_gemm  # noqa: E402  (before triton: it picks the interpreter)
from moe_lab.kernels.moe import experts_triton, moe_align, moe_align_reference  # noqa: E402
from moe_lab.model.expert_backends import run_experts  # noqa: E402
from moe_lab.model.experts import experts_reference  # noqa: E402

CUDA = torch.cuda.is_available() and not INTERPRETED
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with compiled Triton (here: no GPU or interpreter mode)")
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ["x", "weights", "w1", "w3", "w2"]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(moe_gemm, "POISON_OUTPUTS", True)


def make_case(seed, T, d, f, E, k, drop=0.0, dtype=torch.float32, device=DEVICE, idx=None):
    """Random inputs of the expert contract; expert_idx rows hold k distinct experts (or `idx`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    if idx is None:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(T, k)
        if drop:
            idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < drop, -1)
    weights = torch.rand(T, k, generator=g)
    ws = [torch.randn(*s, generator=g) / math.sqrt(s[1]) for s in [(E, d, f), (E, d, f), (E, f, d)]]
    probe = torch.randn(T, d, generator=g)  # the loss is sum(y * probe): a dense random dy
    tensors = [x, weights, *ws]
    return [t.to(device=device, dtype=dtype) for t in tensors], idx.to(device), probe.to(device)


def forward_backward(fn, tensors, idx, probe, dtype):
    """y and the gradients of (x, weights, w1, w3, w2) of sum(fn(...) * probe), computed in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    x, weights, w1, w3, w2 = leaves
    y = fn(x, idx, weights, w1, w3, w2)
    if not y.requires_grad:  # the reference, when every assignment was dropped: y = 0, no graph
        return y, [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad((y * probe.to(dtype)).sum(), leaves, allow_unused=True)
    return y, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def max_rel_error(actual, expected):
    """max |actual - expected| relative to the largest |expected| (at least 1)."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max()) / max(1.0, float(expected.abs().max()))


def check_against_reference(tensors, idx, probe, tol=2e-5, **kwargs):
    fn = lambda *a: experts_triton(*a, **kwargs)  # noqa: E731
    y, grads = forward_backward(fn, tensors, idx, probe, tensors[0].dtype)
    y_ref, grads_ref = forward_backward(experts_reference, tensors, idx, probe, torch.float64)
    assert y.dtype == tensors[0].dtype and y.shape == y_ref.shape
    assert torch.isfinite(y).all(), "y has NaN: an element the kernels never wrote"
    assert max_rel_error(y, y_ref) <= tol, f"y: relative error {max_rel_error(y, y_ref):.2e} > {tol}"
    for name, g, g_ref, t in zip(NAMES, grads, grads_ref, tensors):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.isfinite(g).all(), f"d{name} has NaN"
        err = max_rel_error(g, g_ref)
        assert err <= tol, f"d{name}: relative error {err:.2e} > {tol}"
    return y, grads


# ---------------------------------------------------------------------------------------------
# Routing metadata
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_moe_align_matches_the_python_loops(seed, block_m):
    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 9, (1,), generator=g))
    k = int(torch.randint(1, min(E, 3) + 1, (1,), generator=g))
    T = int(torch.randint(1, 40, (1,), generator=g))
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < 0.2, -1)
    al = moe_align(idx, E, block_m)
    offsets, sorted_ids, block_expert = moe_align_reference(idx, E, block_m)
    used = offsets[-1]
    assert al.offsets.tolist() == offsets
    assert al.sorted_ids[:used].tolist() == sorted_ids
    assert (al.sorted_ids[used:] == T * k).all(), "rows past the last expert must hold the sentinel"
    assert al.block_expert[: used // block_m].tolist() == block_expert
    assert (al.block_expert[used // block_m:] == -1).all()
    assert al.counts.tolist() == [int((idx == e).sum()) for e in range(E)]
    assert al.max_rows % block_m == 0 and al.max_rows >= used


def test_moe_align_example_of_the_docstring():
    al = moe_align(torch.tensor([[2, 0], [0, 1], [2, -1]]), n_experts=3, block_m=4)
    assert al.offsets.tolist() == [0, 4, 8, 12]
    assert al.sorted_ids[:12].tolist() == [1, 2, 6, 6, 3, 6, 6, 6, 0, 4, 6, 6]
    assert al.block_expert.tolist()[:4] == [0, 1, 2, -1]


@pytest.mark.parametrize("bad, message", [
    (dict(expert_idx=torch.zeros(3, dtype=torch.long)), "expert_idx must be"),
    (dict(n_experts=0), "n_experts must be"),
    (dict(block_m=0), "block_m=0: expected an integer power of two"),
    (dict(block_m=6), "block_m=6: expected an integer power of two"),
])
def test_moe_align_rejects_bad_arguments(bad, message):
    args = dict(expert_idx=torch.zeros(3, 2, dtype=torch.long), n_experts=2, block_m=4) | bad
    with pytest.raises(ValueError, match=message):
        moe_align(**args)


# ---------------------------------------------------------------------------------------------
# Forward and backward against the reference
# ---------------------------------------------------------------------------------------------
def random_shape(seed):
    """Tokens log-uniform in 1..300 (most cases small, some large), experts 1..16, top_k 1..min(E, 4),
    widths 1..56 that are never multiples of 16, block_m 16 or 32, a quarter of assignments dropped
    in every third case."""
    g = torch.Generator().manual_seed(1000 + seed)
    T = 300 if seed == 0 else max(1, round(math.exp(float(torch.rand(1, generator=g)) * math.log(300))))
    E = int(torch.randint(1, 17, (1,), generator=g))
    k = int(torch.randint(1, min(E, 4) + 1, (1,), generator=g))
    d, f = (int(v) for v in torch.randint(1, 57, (2,), generator=g))
    d, f = (v + 1 if v % 16 == 0 else v for v in (d, f))
    return dict(T=T, d=d, f=f, E=E, k=k, drop=0.25 if seed % 3 == 1 else 0.0), (16, 32)[seed % 2]


@pytest.mark.parametrize("seed", range(30))
def test_matches_reference_on_random_shapes(seed):
    shape, block_m = random_shape(seed)
    tensors, idx, probe = make_case(seed, **shape)
    check_against_reference(tensors, idx, probe, block_m=block_m)


EDGE_CASES = {
    # name: (T, d, f, E, k, expert_idx or None)
    "expert 2 gets no tokens": (23, 19, 21, 5, 2, lambda T, k: torch.tensor([[0, 1], [3, 4]]).repeat(T, 1)[:T]),
    "every token on one expert": (40, 17, 33, 4, 1, lambda T, k: torch.full((T, k), 3)),
    "top_k equals E": (19, 18, 20, 4, 4, None),
    "a single token": (1, 37, 45, 6, 3, None),
    "half the assignments dropped": (30, 20, 24, 4, 2, lambda T, k: torch.where(torch.arange(T * k).reshape(T, k) % 2 == 0, torch.arange(T * k).reshape(T, k) % 4, -1)),
    "every assignment dropped": (9, 11, 13, 3, 2, lambda T, k: torch.full((T, k), -1)),
    "one expert, one wide row": (1, 70, 90, 1, 1, None),
}


# ---------------------------------------------------------------------------------------------
# Configurations: every tile, program order and layout computes the same function
# ---------------------------------------------------------------------------------------------
CONFIG_CASES = [  # (block_m, BLOCK_N, BLOCK_K, GROUP_M): tiles wider and narrower than the matrices, grouped orders
    (16, 16, 16, 1), (16, 32, 16, 2), (32, 16, 32, 4), (16, 64, 16, 16)]


@pytest.mark.parametrize("case", range(len(CONFIG_CASES)))
def test_every_configuration_and_program_order_computes_the_same(case):
    """Forced configurations (experts_triton(choice=...)): GROUP_M > 1 walks row blocks column by column,
    with a last group shorter than GROUP_M; every gradient too. A wrong swizzle skips or repeats tiles."""
    from moe_lab.kernels import config_table as CT

    bm, bn, bk, g = CONFIG_CASES[case]
    if not INTERPRETED:
        bm, bn, bk = max(bm, 16), max(bn, 16), max(bk, 16)
    configs = {k: CT.KernelConfig(bm if k in CT.ROW_KERNELS else 16, bn, bk, g if k in CT.ROW_KERNELS else 1, 4, 2)
               for k in CT.KERNELS}
    choice = CT.Choice(bm, configs, "test")
    tensors, idx, probe = make_case(90 + case, T=37, d=40, f=56, E=5, k=3, drop=0.2)
    check_against_reference(tensors, idx, probe, choice=choice)


def test_a_forced_choice_must_match_its_layout():
    from moe_lab.kernels import config_table as CT

    tensors, idx, _ = make_case(1, T=4, d=8, f=8, E=2, k=1)
    configs = {k: CT.KernelConfig(16, 16, 16) for k in CT.KERNELS}
    with pytest.raises(ValueError, match="layout's block_m=32"):
        experts_triton(tensors[0], idx, *tensors[1:], choice=CT.Choice(32, configs, "test"))
    with pytest.raises(ValueError, match="lacks configurations"):
        experts_triton(tensors[0], idx, *tensors[1:], choice=CT.Choice(16, {"up": configs["up"]}, "test"))


@pytest.mark.parametrize("seed", range(6))
def test_the_one_program_layout_equals_moe_align(seed):
    """moe_align_triton (histogram, cumsum, sort in one program) against moe_align, bit for bit."""
    from moe_lab.kernels.moe_align_triton import moe_align_triton

    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 40, (1,), generator=g))
    k = int(torch.randint(1, min(E, 4) + 1, (1,), generator=g))
    T = [0, 1, 7, 64, 150, 299][seed]
    rows = [torch.randperm(E, generator=g)[:k] for _ in range(T)]
    idx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < 0.2, -1).to(DEVICE)
    for block_m in (1, 4, 16, 64):
        a, b = moe_align(idx, E, block_m), moe_align_triton(idx, E, block_m)
        for name in ("counts", "offsets", "sorted_ids", "block_expert"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), (name, block_m)


def test_the_one_program_layout_refuses_what_it_cannot_hold():
    from moe_lab.kernels.moe_align_triton import MAX_ASSIGNMENTS, moe_align_triton

    with pytest.raises(ValueError, match="at most"):
        moe_align_triton(torch.zeros(MAX_ASSIGNMENTS + 1, 1, dtype=torch.long, device=DEVICE), 4, 16)
    with pytest.raises(ValueError, match="must be"):
        moe_align_triton(torch.zeros(3, dtype=torch.long, device=DEVICE), 4, 16)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name):
    T, d, f, E, k, make_idx = EDGE_CASES[name]
    idx = None if make_idx is None else make_idx(T, k)
    tensors, idx, probe = make_case(7, T, d, f, E, k, idx=idx)
    y, (dx, dweights, dw1, dw3, dw2) = check_against_reference(tensors, idx, probe, block_m=16)
    unused = [e for e in range(E) if not (idx == e).any()]
    for e in unused:  # written as exact zeros, not left unwritten
        assert (dw1[e] == 0).all() and (dw3[e] == 0).all() and (dw2[e] == 0).all()
    dropped = idx < 0
    assert (dweights[dropped] == 0).all()
    assert (y[dropped.all(dim=1)] == 0).all(), "a token whose every assignment was dropped outputs zeros"


@pytest.mark.parametrize("wanted", [("x",), ("weights",), ("w2",), ("w1", "w3"), ()])
def test_only_the_requested_gradients(wanted):
    tensors, idx, probe = make_case(3, 21, 18, 22, 4, 2)
    leaves = [t.clone().requires_grad_(name in wanted) for name, t in zip(NAMES, tensors)]
    x, weights, w1, w3, w2 = leaves
    y = experts_triton(x, idx, weights, w1, w3, w2)
    ref_leaves = [t.detach().double().requires_grad_(name in wanted) for name, t in zip(NAMES, leaves)]
    y_ref = experts_reference(ref_leaves[0], idx, *ref_leaves[1:])
    assert max_rel_error(y, y_ref) <= 2e-5
    assert y.requires_grad == bool(wanted)
    if not wanted:
        return
    grads = torch.autograd.grad((y * probe).sum(), [t for t in leaves if t.requires_grad])
    ref = torch.autograd.grad((y_ref * probe.double()).sum(), [t for t in ref_leaves if t.requires_grad])
    for g, r in zip(grads, ref):
        assert max_rel_error(g, r) <= 2e-5


def test_strided_inputs():
    """Kernels take strides: transposed and sliced views give the same result as contiguous copies."""
    tensors, idx, probe = make_case(5, 26, 19, 23, 3, 2)
    x, weights, w1, w3, w2 = tensors
    x_t = x.t().contiguous().t()  # (T, d) with strides (1, T)
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # (E, d, f) with f-major storage
    w2_big = torch.zeros(w2.shape[0], w2.shape[1], w2.shape[2] + 5)
    w2_big[:, :, : w2.shape[2]] = w2
    w2_s = w2_big[:, :, : w2.shape[2]]  # a slice: row stride d + 5
    assert x_t.stride() == (1, 26) and w1_t.stride()[1] == 1 and w2_s.stride()[1] == w2.shape[2] + 5
    check_against_reference([x_t, weights, w1_t, w3, w2_s], idx, probe)


def test_gradient_of_a_sum_arrives_expanded():
    """y.sum() hands the backward a dy with strides (0, 0): the kernels read it through its strides."""
    tensors, idx, _ = make_case(9, 17, 13, 21, 3, 2)
    ours = [t.clone().requires_grad_() for t in tensors]
    experts_triton(ours[0], idx, *ours[1:]).sum().backward()
    ref = [t.double().requires_grad_() for t in tensors]
    experts_reference(ref[0], idx, *ref[1:]).sum().backward()
    for name, a, b in zip(NAMES, ours, ref):
        assert max_rel_error(a.grad, b.grad) <= 2e-5, name


def test_ordered_combine_is_deterministic_and_atomic_agrees():
    tensors, idx, probe = make_case(11, 64, 24, 20, 4, 3)
    a = experts_triton(*tensors[:1], idx, *tensors[1:])
    b = experts_triton(*tensors[:1], idx, *tensors[1:])
    assert torch.equal(a, b), "the ordered combine must give the same bits on every run"
    check_against_reference(tensors, idx, probe, combine="atomic")


def test_float16_under_the_interpreter_or_gpu():
    """float16 inputs (computed with float32 accumulation) against float64 on the fp16-rounded inputs."""
    tensors, idx, probe = make_case(13, 45, 30, 40, 6, 2, dtype=torch.float16)
    check_against_reference(tensors, idx, probe, tol=1e-2)


def test_run_experts_dispatches_to_triton():
    tensors, idx, _ = make_case(17, 12, 10, 14, 3, 2)
    x, weights, w1, w3, w2 = tensors
    assert max_rel_error(run_experts("triton", x, idx, weights, w1, w3, w2),
                        experts_reference(x.double(), idx, weights.double(), w1.double(), w3.double(), w2.double())) <= 2e-5


@pytest.mark.skipif(not INTERPRETED, reason="bfloat16 is refused only by the interpreter")
def test_bfloat16_under_the_interpreter_raises():
    tensors, idx, _ = make_case(1, 4, 8, 8, 2, 1, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 is computed incorrectly by Triton's interpreter"):
        experts_triton(tensors[0], idx, *tensors[1:])


def test_errors_name_the_argument():
    tensors, idx, _ = make_case(1, 4, 8, 8, 2, 1)
    x, weights, w1, w3, w2 = tensors
    with pytest.raises(TypeError, match="w2 has dtype torch.float16 but x has torch.float32"):
        experts_triton(x, idx, weights, w1, w3, w2.half())
    with pytest.raises(ValueError, match="combine='scatter'"):
        experts_triton(x, idx, weights, w1, w3, w2, combine="scatter")
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        experts_triton(x, idx, weights, w1, w3, w2, block_m=24)
    with pytest.raises(ValueError, match="expert_idx must lie in"):
        experts_triton(x, idx + 5, weights, w1, w3, w2)


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = [dict(T=1, d=64, f=96, E=4, k=2), dict(T=300, d=200, f=136, E=16, k=4, drop=0.2),
              dict(T=1000, d=512, f=352, E=8, k=2), dict(T=77, d=33, f=47, E=5, k=5)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", range(len(GPU_SHAPES)))
@pytest.mark.parametrize("combine", ["ordered", "atomic"])
def test_gpu_dtypes_match_reference(dtype, shape, combine):
    """float32 (exact "ieee" dots): 2e-5 as on the CPU. 16-bit: the kernel's error against float64 is at
    most twice torch's own error in the same dtype, plus 1e-3 of the largest value."""
    tensors, idx, probe = make_case(21 + shape, **GPU_SHAPES[shape], dtype=dtype, device="cuda")
    if dtype == torch.float32:
        check_against_reference(tensors, idx, probe, combine=combine)
        return
    fn = lambda *a: experts_triton(*a, combine=combine)  # noqa: E731
    out = forward_backward(fn, tensors, idx, probe, dtype)
    ref = forward_backward(experts_reference, tensors, idx, probe, torch.float64)
    torch_same_dtype = forward_backward(experts_reference, tensors, idx, probe, dtype)
    for name, a, r, t in zip(["y"] + NAMES, [out[0], *out[1]], [ref[0], *ref[1]], [torch_same_dtype[0], *torch_same_dtype[1]]):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert max_rel_error(a, r) <= 2 * max_rel_error(t, r) + 1e-3, f"{name}: {max_rel_error(a, r):.2e} vs torch {max_rel_error(t, r):.2e}"
