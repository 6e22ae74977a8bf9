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
# # 00 · Setup: what will run here, and how fast
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/00_setup.ipynb)
#
# Before building anything, find out what this machine can do: CPU or GPU, which dtype, whether
# Triton kernels run compiled or through the interpreter, and how fast a matrix multiply is.
#
# **What you will learn**
# - how the course picks its *mode* (`gpu`, `cpu`, `ci`), device and dtype, and how to override them
# - what Triton's interpreter is and why CPU runs use float32
# - how many FLOP/s this machine gives a matrix multiply, the number every later timing is read against
#
# **Prerequisites**: none. **Time to run**: CPU (2 cores): 5 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. The runtime, decided in one place
#
# `runtime.setup()` decided four things. The **mode** sets how big every experiment is:
#
# | mode | when | sizes |
# |---|---|---|
# | `gpu` | CUDA is available | full presets, bf16 (fp16 on GPUs older than Ampere), compiled Triton |
# | `cpu` | no GPU | presets that still learn something real in minutes on 2 cores, float32 |
# | `ci` | `CI` or `MOE_LAB_FAST=1` is set | the smallest sizes that still run every code path |
#
# Override it with the environment variable `MOE_LAB_MODE=gpu|cpu|ci` (set before starting Jupyter),
# or per notebook with `runtime.setup(mode="cpu")`. `MOE_LAB_DEVICE=cpu` forces the CPU.

# %%
import torch
from IPython.display import Markdown, display

rows = runtime.environment_table(rt)
display(Markdown("| item | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)))

# %% [markdown]
# ## 2. The dtype policy
#
# Matrix units of modern GPUs multiply bfloat16 at full speed; bf16 keeps float32's exponent range,
# so training needs no loss scaling. GPUs before Ampere (T4, V100) lack bf16 and get float16. CPUs
# compute float32. The policy is one function; check it on simulated GPUs:

# %%
for name, capability in [("H100", (9, 0)), ("A100", (8, 0)), ("T4", (7, 5)), ("V100", (7, 0))]:
    print(f"{name:5s} capability {capability}: {runtime.pick_dtype(torch.device('cuda'), capability)}")
print(f"this machine ({rt.device.type}): {rt.dtype}")
assert runtime.pick_dtype(torch.device("cuda"), (7, 5)) == torch.float16
assert runtime.pick_dtype(torch.device("cpu")) == torch.float32

# %% [markdown]
# **Exercise: the dtype policy.** Write it yourself. Given a device type (`"cpu"` or `"cuda"`) and,
# for a GPU, its compute capability `(major, minor)`, return the compute dtype. bf16 arrived with
# Ampere, capability 8.0; a T4 is 7.5, an RTX 4090 8.9.

# %%
from moe_lab.course import checks


def my_pick_dtype(device_type, capability=None):
    # BEGIN SOLUTION
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16
    # END SOLUTION


checks.check_dtype_policy(my_pick_dtype)  # the same rule as moe_lab.core.runtime.pick_dtype

# %% [markdown]
# ## 3. Triton: compiled or interpreted
#
# Triton compiles Python kernels for GPUs. Without a GPU, its **interpreter** (`TRITON_INTERPRET=1`,
# set before kernels are defined; `runtime.setup()` does it for you) runs the same kernels on CPU
# tensors with NumPy: slow, but exact enough to learn and test with. One trap: the interpreter
# computes **bfloat16 wrongly** (it treats the raw bits as numbers), so the course's kernels refuse
# bf16 there with a clear error and CPU runs use float32.

# %%
import os
print("Triton version:", runtime.triton_version())
print("TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET", "(unset: kernels compile for the GPU)"))
assert rt.triton_interpret == (not rt.on_gpu)

# %% [markdown]
# ## 4. How fast is a matrix multiply here?
#
# Timing a matrix multiply gives this machine's practical ceiling: every later FLOP/s figure in the
# course is read against it. First count its work. **Exercise**: an (m × k) matrix times a (k × n) one
# computes m·n dot products of length k. Count one multiply-add as 2 floating-point operations
# (FLOPs), and write the number of FLOPs of the product.

# %%
def matmul_flops(m, n, k):
    # BEGIN SOLUTION
    return 2 * m * n * k
    # END SOLUTION


checks.check_matmul_flops(matmul_flops)  # the same as moe_lab.core.cost.matmul_flops

# %% [markdown]
# So two n×n matrices cost 2n³ FLOPs. Time them at a few sizes:

# %%
from moe_lab.core.config import notebook_sizes
from moe_lab.studies import profiling

sizes = notebook_sizes("00", rt.mode)["matmul_n"]  # matrix sizes for this mode
tflops = [profiling.measure_matmul_tflops(rt.device, rt.dtype, n) for n in sizes]  # the timer of notebook 07
for n, t in zip(sizes, tflops):
    print(f"n={n:5d}: {t * 1000:9.1f} GFLOP/s")
assert all(t > 0 for t in tflops)

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(sizes, [t * 1000 for t in tflops], marker="o")
ax.set_xscale("log", base=2)
ax.set_xlabel("matrix size n (n × n × n)")
ax.set_ylabel("GFLOP/s")
ax.set_title(f"matmul throughput, {rt.device.type}, {str(rt.dtype).replace('torch.', '')}")
plt.show()

# %% [markdown]
# Larger matrices run faster per FLOP: small ones cannot keep every core (or every GPU
# multiprocessor) busy, and moving data costs more than the arithmetic. Notebook 07 turns this
# observation into the *roofline*.
#
# ## 5. What will run here
#
# | notebook | CPU (2 cores), measured with MOE_LAB_MODE=cpu | GPU |
# |---|---|---|
# | 01 data and tokenizer | yes, under 10 s | yes |
# | 02 dense transformer | yes, about 35 s | yes, full size |
# | 03 MoE layer | yes, under 10 s | yes |
# | 04 train an MoE | yes, about 3 minutes | yes, full size |
# | 05–06 Triton kernels | through the interpreter, small shapes, about 20 s each | compiled, bf16 |
# | 07 profiling | live points at small sizes beside recorded GPU files, about 10 s | live, full sweep |
# | 08 GRPO | yes, about 3 minutes (70 % → 97 % held-out exact match) | yes |
# | 09 expert parallelism | 2 and 4 CPU processes (gloo), about 15 s | NCCL with 2+ GPUs |
#
# GPU times are not yet measured.
#
# ## Summary
# - `moe_lab.core.runtime.setup()` decides mode, device, dtype and seeds everything; one line says what it chose.
# - CPU runs use float32 and Triton's interpreter; GPUs use bf16 (fp16 before Ampere) and compiled kernels.
# - Matmul throughput grows with size: the first hint of the roofline.
#
# ## Papers and further reading
# - Tillet, Kung, Cox. *Triton: an intermediate language and compiler for tiled neural network computations* (2019).
# - Micikevicius et al. *Mixed precision training* (2018); Kalamkar et al. *A study of BFLOAT16 for deep learning training* (2019).
