"""Triton kernels of notebooks 05 (intro.py: vector add, fused softmax, tiled matmul) and 06
(moe.py: the MoE expert path), and the one place that decides how they run.

Triton (Tillet, Kung & Cox, "Triton: an intermediate language and compiler for tiled neural network
computations", MAPL 2019) compiles a kernel for the GPU. Without a GPU, Triton's interpreter runs the
same kernel on CPU tensors, program by program, with NumPy: slow, but every index, mask and dot is
executed, so a CPU machine can check a kernel's logic. The interpreter is chosen by the environment
variable TRITON_INTERPRET=1, which Triton reads when a `@triton.jit` function is *defined*: it must be
set before moe_lab.kernels.intro / moe_lab.kernels.moe are imported. This module sets it, before
importing Triton, when the run policy says so (moe_lab.core.runtime.triton_interpret: no GPU used,
or MOE_LAB_TRITON_INTERPRET=1; an explicit TRITON_INTERPRET is left as it is).

The interpreter's limits that matter here:
    - bfloat16 is computed incorrectly (NumPy has no bfloat16; loads and tl.dot see raw bits), so
      `check_dtype_supported` refuses it instead of returning garbage. Use float32 on the CPU.
    - it is slow: small shapes and one small block configuration (no autotuning).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


from moe_lab.core.runtime import choose_triton_interpreter, truthy

choose_triton_interpreter()  # before Triton is imported and any @triton.jit below is defined

try:
    import triton  # noqa: F401  (imported here so that a missing Triton fails with the message below)
except ImportError as err:  # macOS and Windows have no Triton wheels
    raise ImportError(
        "moe_lab.kernels needs Triton, which installs on Linux only (pip install triton). Everything "
        "else still runs without it: the model, training, GRPO, expert parallelism and the 'reference' "
        "and 'sorted' expert back-ends; notebooks 05-07 show recorded results instead of running kernels."
    ) from err

INTERPRETED: bool = truthy(os.environ.get("TRITON_INTERPRET"))
"""True when kernels run through Triton's CPU interpreter, False when they compile for the GPU."""


def _triton_library_interpreted() -> bool | None:
    """Whether Triton's own @jit library (tl.sigmoid, tl.zeros, ...) was built for the interpreter:
    that is fixed when triton is first imported. None when this Triton version does not tell."""
    try:
        from triton.language import standard
        from triton.runtime.jit import JITFunction

        return not isinstance(standard.sigmoid, JITFunction)
    except Exception:  # a layout this check does not know: do not block
        return None


if INTERPRETED and _triton_library_interpreted() is False:
    raise RuntimeError(
        "triton was imported before moe_lab.kernels while TRITON_INTERPRET was unset, so Triton's own "
        "library was built for the GPU and its CPU interpreter cannot run kernels in this process. "
        "Restart Python (the notebook kernel) and import moe_lab.kernels, or call moe_lab.core.runtime.setup(), "
        "before `import triton`; or start Python with TRITON_INTERPRET=1 in the environment."
    )

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype_supported(*tensors: Tensor, **named: Tensor) -> None:
    """Raise a TypeError for a dtype the kernels cannot compute correctly here.

    Pass tensors positionally or by name (`check_dtype_supported(x=x, w1=w1)`: the error then names
    the argument). Kernels take float32, float16 and bfloat16; bfloat16 only when compiled, because
    the interpreter computes it incorrectly.
    """
    items = [(f"tensor {i}", t) for i, t in enumerate(tensors)] + list(named.items())
    for name, t in items:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16")
        if INTERPRETED and t.dtype == torch.bfloat16:
            raise TypeError(
                f"{name} is bfloat16, and bfloat16 is computed incorrectly by Triton's interpreter; use "
                "float32 on CPU (bfloat16 works in kernels compiled for a CUDA GPU)"
            )


def check_device(*tensors: Tensor, **named: Tensor) -> None:
    """Raise a ValueError when compiled kernels are handed CPU tensors (or tensors on two devices)."""
    items = [(f"tensor {i}", t) for i, t in enumerate(tensors)] + list(named.items())
    devices = {t.device for _, t in items}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device; got {', '.join(f'{n} on {t.device}' for n, t in items)}")
    for name, t in items:
        if not INTERPRETED and t.device.type != "cuda":
            raise ValueError(
                f"{name} is on {t.device}, but Triton kernels here compile for a CUDA GPU; move it to "
                "'cuda', or set MOE_LAB_TRITON_INTERPRET=1 before importing moe_lab.kernels to use the interpreter"
            )


__all__ = ["INTERPRETED", "SUPPORTED_DTYPES", "check_dtype_supported", "check_device"]
