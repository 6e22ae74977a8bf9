"""The tutorial kernels of notebook 05 (moe_lab.kernels.intro) against torch, and the interpreter switch.

On a CPU the kernels run through Triton's interpreter (float32, float16; bfloat16 must raise); tests
marked `gpu` run them compiled, in bfloat16 too, and skip without CUDA.
Tolerances: add is exact; softmax and float32 matmul within 1e-6 / 1e-5 of torch (float32 rounding,
different summation order); float16 results within 1e-2 (one rounding to float16 of values ~1-10).

Run: .venv/bin/python -m pytest tests/kernels/test_kernels_intro.py -q      (about 10 s on 2 CPU cores)
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # find_spec: importing triton here would come too early
    pytest.skip("Triton is not installed (Linux only)", allow_module_level=True)

from moe_lab.core import cost
from moe_lab.kernels import INTERPRETED, check_dtype_supported, intro  # noqa: E402  (before triton)

CUDA = torch.cuda.is_available() and not INTERPRETED
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with compiled Triton (here: no GPU or interpreter mode)")
DEVICE = "cuda" if CUDA else "cpu"


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Vector add
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 97, 1024, 98_432])
@pytest.mark.parametrize("block_size", [128, 1024])
def test_add_is_exact(n, block_size):
    x, y = randn(n, seed=1), randn(n, seed=2)
    out = intro.add(x, y, block_size=block_size)
    assert torch.equal(out, intro.add_reference(x, y))


def test_add_float16_and_empty():
    x, y = randn(1001, seed=3, dtype=torch.float16), randn(1001, seed=4, dtype=torch.float16)
    assert torch.equal(intro.add(x, y), x + y)
    assert intro.add(x[:0], y[:0]).shape == (0,)


def test_add_errors_name_the_argument():
    x = randn(8)
    with pytest.raises(ValueError, match="x and y must have the same shape"):
        intro.add(x, randn(9))
    with pytest.raises(ValueError, match="block_size must be a power of two; got 100"):
        intro.add(x, x, block_size=100)


# ---------------------------------------------------------------------------------------------
# Fused softmax
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (123, 781), (16, 1024), (3, 1025)])
def test_softmax_matches_torch(shape):
    x = randn(*shape, seed=5) * 3
    out = intro.softmax(x)
    torch.testing.assert_close(out, torch.softmax(x, dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(intro.softmax_reference(x), torch.softmax(x, dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(shape[0], device=DEVICE))


def test_softmax_of_strided_rows_and_float16():
    x = randn(40, 300, seed=6)[:, 7:290:1][::3]  # every third row, a column window: row stride 900
    assert x.stride(0) != x.shape[1]
    torch.testing.assert_close(intro.softmax(x), torch.softmax(x, dim=1), rtol=1e-6, atol=1e-6)
    xh = randn(33, 130, seed=7, dtype=torch.float16)
    out = intro.softmax(xh)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.softmax(xh.float(), dim=1), rtol=1e-2, atol=1e-3)


def test_softmax_is_stable_for_large_inputs():
    x = torch.tensor([[1000.0, 1000.0, -1000.0], [88.0, 89.0, 90.0]], device=DEVICE)
    out = intro.softmax(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.softmax(x, dim=1))


# ---------------------------------------------------------------------------------------------
# Tiled matmul
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (97, 83, 71), (129, 65, 33), (64, 64, 64), (5, 200, 3)])
@pytest.mark.parametrize("group_m", [1, 4])
def test_matmul_matches_torch(M, N, K, group_m):
    a, b = randn(M, K, seed=8), randn(K, N, seed=9)
    out = intro.matmul(a, b, GROUP_M=group_m)
    torch.testing.assert_close(out, intro.matmul_reference(a, b), rtol=1e-5, atol=1e-5)


def test_matmul_small_blocks_transposed_inputs_and_empty_k():
    a = randn(70, 45, seed=10)
    b = randn(38, 45, seed=11).t()  # (45, 38), column-major
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2) if INTERPRETED else {}
    torch.testing.assert_close(intro.matmul(a, b, **cfg), a @ b, rtol=1e-5, atol=1e-5)
    assert torch.equal(intro.matmul(a[:, :0], b[:0]), torch.zeros(70, 38, device=DEVICE))


def test_matmul_float16_accumulates_in_float32():
    a, b = randn(50, 300, seed=12, dtype=torch.float16), randn(300, 40, seed=13, dtype=torch.float16)
    out = intro.matmul(a, b)
    assert out.dtype == torch.float16
    exact = a.double() @ b.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=2e-2)


def test_matmul_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"a must be \(M, K\) and b \(K, N\); got \(3, 4\) and \(5, 6\)"):
        intro.matmul(randn(3, 4), randn(5, 6))
    with pytest.raises(TypeError, match="a and b must have the same dtype"):
        intro.matmul(randn(3, 4), randn(4, 2, dtype=torch.float16))


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes
# ---------------------------------------------------------------------------------------------
def test_flop_and_byte_counts():
    assert cost.add_flops(10) == 10 and cost.add_bytes(10, torch.float32) == 120
    assert cost.add_bytes(10, torch.float16) == 60
    assert cost.softmax_flops(4, 8) == 160
    assert cost.softmax_bytes(4, 8, torch.float32) == 2 * 32 * 4
    assert cost.softmax_bytes(4, 8, torch.float32, fused=False) == (8 * 32 + 4 * 4) * 4
    assert cost.matmul_flops(2, 3, 4) == 48
    assert cost.matmul_bytes(2, 3, 4, torch.float16) == (8 + 12 + 6) * 2
    # Tiled without a cache: A is re-read once per column of tiles, B once per row of tiles.
    assert cost.matmul_bytes(256, 256, 64, torch.float32, 128, 64) == (256 * 64 * 4 + 64 * 256 * 2 + 256 * 256) * 4
    assert cost.arithmetic_intensity(cost.matmul_flops(4096, 4096, 4096), cost.matmul_bytes(4096, 4096, 4096, torch.bfloat16)) > 1000


# ---------------------------------------------------------------------------------------------
# The interpreter switch and dtype policy
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRETED, reason="bfloat16 is refused only by the interpreter")
def test_bfloat16_under_the_interpreter_raises():
    x = randn(8, dtype=torch.bfloat16)
    for call in (lambda: intro.add(x, x), lambda: intro.softmax(x[None]), lambda: intro.matmul(x[None], x[:, None])):
        with pytest.raises(TypeError, match="bfloat16 is computed incorrectly by Triton's interpreter; use float32 on CPU"):
            call()


def test_unsupported_dtype_is_named():
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        check_dtype_supported(x=torch.zeros(2, dtype=torch.float64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default: no CUDA means the interpreter")
def test_no_cuda_means_interpreter_and_early_triton_import_is_explained():
    assert INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import triton, moe_lab.kernels"  # triton first: its library is already built for the GPU
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Restart Python" in result.stderr and "before `import triton`" in result.stderr


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_kernels_on_awkward_shapes(dtype):
    """The tutorials' 1823 x 781 softmax and a 1823 x 781 x 517 matmul, compiled. 16-bit matmul: within
    twice torch's own error against float64, plus 1e-2 (relative to the largest value)."""
    x = randn(1823, 781, seed=14, dtype=dtype)
    torch.testing.assert_close(intro.softmax(x).float(), torch.softmax(x.float(), dim=1),
                               rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-3 if dtype != torch.float32 else 1e-6)
    assert torch.equal(intro.add(x, x), x + x)
    a, b = randn(1823, 517, seed=15, dtype=dtype), randn(517, 781, seed=16, dtype=dtype)
    exact = a.double() @ b.double()
    scale = float(exact.abs().max())
    err = float((intro.matmul(a, b).double() - exact).abs().max()) / scale
    torch_err = float(((a @ b).double() - exact).abs().max()) / scale
    assert err <= 2 * torch_err + (1e-6 if dtype == torch.float32 else 1e-2)
