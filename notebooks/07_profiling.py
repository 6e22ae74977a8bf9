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
# # 07 · Profiling: FLOPs, bytes and the roofline
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moe-lab/moe-lab/blob/main/notebooks/07_profiling.ipynb)
#
# Notebook 06 made the MoE expert path fast on paper: fewer kernels, fewer bytes. This notebook
# measures how fast it is, and how fast it *could* be. Two numbers bound any kernel: how many
# FLOPs it must do and how many bytes it must move. The machine has two matching limits: its peak
# FLOP/s and its memory bandwidth. Put together, they form a **roofline**. A kernel is then "at
# 70 % of what this machine allows at this shape", not just "fast" or "slow".
#
# We compare five ways to run the same expert layer: the `reference` loop, the `sorted` PyTorch
# back-end, the `triton` kernels of notebook 06, `torch._grouped_mm`, and a dense matmul with the
# same FLOPs as the ceiling. On a GPU every figure is measured live. On a CPU, the CPU is measured
# live at small sizes, and GPU figures are shown from recorded files, labelled with their device
# and date.
#
# **What you will learn**
# - counting an MoE layer's FLOPs and bytes by hand, and checking the count against torch's FLOP counter
# - which weights a batch actually reads: the expected number of experts that receive tokens
# - arithmetic intensity, and how it grows with the number of tokens until a layer becomes compute-bound
# - measuring the two ceilings of a machine, and drawing a roofline with measured points
# - timing on a GPU (`triton.testing.do_bench`) and on a CPU (medians after a warm-up)
# - reading a `torch.profiler` table; how kernel configurations are chosen per device (tuned ahead, or a heuristic), and how a recorded tuning run would show what each knob buys
# - explaining the gap between each back-end and its ceiling
#
# **Prerequisites**: notebooks 03 (the expert back-ends), 05 (arithmetic intensity, tiles) and 06
# (the Triton expert path). **Time to run**: CPU (2 cores): 9 s · GPU: not yet measured.

# %%
import sys, subprocess
if "google.colab" in sys.modules:  # Colab: install the course package, keeping Colab's own torch and triton
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "moe-lab @ git+https://github.com/moe-lab/moe-lab"], check=True)
from moe_lab.core import runtime
rt = runtime.setup(seed=0)  # prints mode (gpu / cpu / ci), device, dtype, versions

# %% [markdown]
# ## 1. Count the FLOPs by hand
#
# An expert layer receives T tokens. Each token is routed to k experts, so N = T·k **routed rows**
# go through an expert. Each row runs one SwiGLU expert, `(silu(x @ w1) * (x @ w3)) @ w2`. That is
# three matmuls. A matmul of an (m, n) matrix by an (n, p) matrix costs 2·m·n·p FLOPs: one
# multiply and one add for each term of each sum.
#
# | matmul | shapes per expert e (n_e rows) | FLOPs summed over experts |
# |---|---|---|
# | gate `x @ w1` | (n_e, d) @ (d, f) | 2·N·d·f |
# | up `x @ w3` | (n_e, d) @ (d, f) | 2·N·d·f |
# | down `h @ w2` | (n_e, f) @ (f, d) | 2·N·f·d |
#
# SwiGLU's elementwise work and the routing weights add about 5·N·f + 2·N·d FLOPs. That is under
# 1 % at these sizes, and torch's FLOP counter leaves it out too.
#
# **Exercise: the forward FLOPs.** Write `moe_flops(T, d, f, k)`, the forward matmul FLOPs of the
# layer.

# %%
def moe_flops(T, d, f, k):
    """Forward matmul FLOPs of a SwiGLU expert layer: T tokens, top-k, widths d and f."""
    # BEGIN SOLUTION
    n_rows = T * k  # every token is copied to k experts
    return 3 * 2 * n_rows * d * f  # gate, up and down: 2*m*n*p each
    # END SOLUTION


from moe_lab.course import checks

checks.check_moe_flops(moe_flops)

# %% [markdown]
# Now check the count against torch. `torch.utils.flop_counter.FlopCounterMode` records every
# matmul that really runs. Run the `reference` back-end of notebook 03 on a small random routing,
# forward and then backward. The backward pass needs two matmuls for each forward matmul: the
# gradient of its input (dX = dY·Wᵀ) and the gradient of its weight (dW = Xᵀ·dY). So it costs
# **twice** the forward.

# %%
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_lab.core import cost
from moe_lab.core.config import notebook_sizes
from moe_lab.course import plots
from moe_lab.studies import bench, bench_records, profiling
from moe_lab.model.experts import experts_reference, experts_sorted

T, d, f, E, k = 37, 16, 24, 6, 2
g = torch.Generator().manual_seed(0)
x = torch.randn(T, d, generator=g, requires_grad=True)
route_w, route_idx = torch.randn(T, E, generator=g).softmax(-1).topk(k, dim=-1)  # (T, k) each
route_w = route_w.detach().requires_grad_()
W = [torch.randn(*s, generator=g).requires_grad_() for s in [(E, d, f), (E, d, f), (E, f, d)]]
with FlopCounterMode(display=False) as fwd_count:
    y = experts_reference(x, route_idx, route_w, *W)
with FlopCounterMode(display=False) as bwd_count:
    y.backward(torch.randn(T, d, generator=g))
print(f"forward : torch counted {fwd_count.get_total_flops():,} FLOPs, moe_flops says "
      f"{moe_flops(T, d, f, k):,}")
print(f"backward: torch counted {bwd_count.get_total_flops():,} FLOPs, 2x forward = "
      f"{2 * moe_flops(T, d, f, k):,}")
assert fwd_count.get_total_flops() == moe_flops(T, d, f, k) == cost.moe_flops(T, d, f, k)
assert bwd_count.get_total_flops() == cost.moe_flops(T, d, f, k, "backward")

# %% [markdown]
# The canonical count is `moe_lab.core.cost.moe_flops(T, d, f, k, mode)`. Here it is at 8192 tokens
# for the layers the benchmark uses: the course's GPU preset layer (`teaching`), a Mixtral-8x7B-like
# layer and a fine-grained DeepSeek/Qwen-like layer:

# %%
for name in ("teaching", "mixtral", "fine"):
    s = bench.SHAPES[name]
    fl = cost.moe_flops(8192, s.d_model, s.d_expert, s.top_k)
    print(f"{name:9s} d={s.d_model:5d} f={s.d_expert:6d} E={s.n_experts:4d} k={s.top_k}: "
          f"{fl / 1e9:9.1f} GFLOP forward, {3 * fl / 1e9:9.1f} forward+backward  ({s.about})")

# %% [markdown]
# ## 2. Count the bytes: whose weights are read?
#
# FLOPs alone do not set the speed. A kernel must also bring its data from memory. For an expert
# layer the bytes come in three parts (`moe_lab.core.cost.moe_bytes`):
#
# - **weights**: each expert that receives at least one token reads w1, w3 and w2, which is 3·d·f
#   values. An expert that receives no token reads nothing.
# - **activations**: x is read and y is written, T·d values each.
# - **intermediates**: whatever an implementation writes to memory and reads back: the permuted
#   copy of x, `x @ w1`, SwiGLU's output, and so on. A perfectly fused kernel has none. This is the
#   part notebook 06 attacked.
#
# How many experts receive tokens? Assume each token picks its k experts uniformly at random, k
# *distinct* experts, independently of the other tokens. Then one token misses a given expert with
# probability 1 − k/E, and all T tokens miss it with probability (1 − k/E)^T.
#
# **Exercise: expected active experts.** Write `expected_active(T, E, k)`, the expected number of
# experts that receive at least one token.

# %%
def expected_active(T, E, k):
    """Expected number of experts (of E) that receive at least one of T tokens under random top-k routing."""
    # BEGIN SOLUTION
    p_idle = (1 - k / E) ** T  # every token misses this expert
    return E * (1 - p_idle)
    # END SOLUTION


checks.check_expected_active_experts(expected_active)

# %% [markdown]
# Check the formula by simulation: draw random routings and count the distinct experts.

# %%
import numpy as np

E_sim, k_sim, trials = 128, 8, 200
for T_sim in (1, 4, 16, 64):
    counts = [torch.rand(T_sim, E_sim, generator=g).argsort(-1)[:, :k_sim].unique().numel()
              for _ in range(trials)]
    print(f"T={T_sim:3d}: simulated {np.mean(counts):6.1f} active experts of {E_sim}, "
          f"formula {expected_active(T_sim, E_sim, k_sim):6.1f}")
    assert abs(np.mean(counts) - expected_active(T_sim, E_sim, k_sim)) < 2.0

# %% [markdown]
# With 128 fine-grained experts and top-8, 16 tokens already touch about 82 experts. From then on the
# layer reads almost all of its weights, whatever the batch. Real routers are not uniform; the
# benchmark counts the experts its routing really uses.
#
# **Arithmetic intensity** is FLOPs divided by bytes. With few tokens, each weight byte serves only a
# few rows, so the intensity is low and the layer is **memory-bound**. Each extra token adds
# FLOPs but almost no bytes once every expert is active, so the intensity rises roughly in
# proportion to the rows per expert, T·k/E. A device's **ridge point** is its peak FLOP/s divided by
# its memory bandwidth, in FLOP/byte: a kernel whose intensity is below it is memory-bound (its bytes
# set its time), above it compute-bound. Here is the intensity for the three layers, in bfloat16
# (2 bytes), counting only the bytes every implementation must move (weights and activations: the
# `minimal` model), against two ridges: the H100's from its data sheet, and the one measured on the
# course's recorded GPU run (`data/bench/`, an H200; section 5 shows that run).

# %%
import matplotlib.pyplot as plt

H100_RIDGE = 989e12 / 3.35e12  # data sheet, H100 SXM: dense bf16 peak / HBM3 bandwidth
ridges = {"H100, data sheet": H100_RIDGE}
for rec_ in bench_records.load_bench_records():  # measured: a large matmul and a large copy on that GPU
    if rec_.get("ceilings"):
        ridges[f"{rec_['device']}, measured {rec_['date'][:10]}"] = rec_["ceilings"]["ridge_flop_per_byte"]


def intensity_at(s, tokens):
    """FLOP per minimal byte of layer s at a token count (bf16)."""
    return cost.arithmetic_intensity(
        cost.moe_flops(tokens, s.d_model, s.d_expert, s.top_k),
        cost.moe_bytes(tokens, s.d_model, s.d_expert, s.n_experts, s.top_k, 2)["total"])


def crossing(s, ridge, most=1 << 22):
    """The fewest tokens at which layer s reaches the ridge (intensity grows with tokens), None if never."""
    lo, hi = 0, most
    if intensity_at(s, hi) < ridge:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if intensity_at(s, mid) >= ridge else (mid, hi)
    return hi


tokens_axis = 2 ** np.arange(0, 16)
fig, ax = plt.subplots(figsize=(7, 3.8))
for name in ("teaching", "mixtral", "fine"):
    s = bench.SHAPES[name]
    ax.plot(tokens_axis, [intensity_at(s, int(t)) for t in tokens_axis], marker="o", ms=3,
            label=f"{name} (E={s.n_experts}, k={s.top_k})")
for (ridge_name, ridge), ls in zip(ridges.items(), ("--", ":", "-.")):
    ax.axhline(ridge, color="k", ls=ls, lw=1, label=f"ridge, {ridge_name} ≈ {ridge:.0f} FLOP/byte")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("tokens in the batch")
ax.set_ylabel("arithmetic intensity (FLOP/byte, bf16)")
ax.set_title("minimal bytes: weights of active experts + activations")
ax.legend(fontsize=7)
plt.show()
assert round(ridges.get("NVIDIA H200, measured 2026-11-26", 179)) == 179  # the figure the text below quotes
print("tokens at which each layer becomes compute-bound (intensity >= ridge):")
for name in ("teaching", "mixtral", "fine"):
    s = bench.SHAPES[name]
    print(f"  {name:9s}"
          + "".join(f" | {ridge_name}: {crossing(s, r) or 'never':>6}" for ridge_name, r in ridges.items())
          + f" | intensity never passes {1.5 * s.top_k * s.d_expert:.0f} FLOP/byte")

# %% [markdown]
# Reading the plot: the Mixtral-like layer has only 8 experts, and each expert receives on average
# k/E = 2/8 = a quarter of a row per token. Its wide experts are shared by many rows early, and it
# crosses the H100 data-sheet ridge at about 1,200 tokens. The fine-grained layer sends each expert
# only k/E = 8/128 of a row per token, so it needs nearly 5,000 tokens. That is why fine-grained MoE
# kernels are hard to make fast. The small teaching layer crosses last, at about 10,000 tokens, and
# barely: each token's activations (its input and output, 4·d bytes in bf16) serve only 6·k·d·f
# FLOPs, so however many tokens share the weights its intensity can never pass 1.5·k·f = 384
# FLOP/byte, not far above the data sheet's 295.
#
# **Two ridges, and why they differ.** A data sheet quotes peaks that real kernels do not reach. The
# recorded H200 run measured 757 TFLOP/s for an 8192³ bf16 matmul (its data sheet says 989, the same
# compute as an H100) and 4.22 TB/s for a 1 GiB copy (its HBM3e is rated 4.8 TB/s, against the
# H100's 3.35). The extra bandwidth alone moves the data-sheet ridge from 295 to 989 / 4.8 ≈ 206;
# and the matmul reached 77 % of its data-sheet peak while the copy reached 88 % of its rated
# bandwidth, which lowers it further, to the measured 179 FLOP/byte. On that GPU every layer becomes
# compute-bound sooner (the printed token counts). The measured ridge is the one to judge that GPU's
# points by; the data sheet's is only a first estimate for a GPU nobody has measured. Section 3
# measures the ceilings of the machine this notebook runs on (on a CPU, those of the CPU, far below
# any GPU's).
#
# Intermediates change the picture for each implementation. Here are the bytes of each back-end's
# *model*, counted op by op from its code (`cost.INTERMEDIATE_TRAFFIC`), for the fine-grained
# layer at 8192 tokens:

# %%
s = bench.SHAPES["fine"]
minimal = cost.moe_bytes(8192, s.d_model, s.d_expert, s.n_experts, s.top_k, 2)
print(f"{'back-end':10s} {'weights':>9s} {'activations':>12s} {'intermediates':>14s} "
      f"{'total':>9s}  vs minimal")
for backend in ("minimal", "triton", "grouped_mm", "sorted", "reference"):
    b = cost.moe_bytes(8192, s.d_model, s.d_expert, s.n_experts, s.top_k, 2, backend)
    print(f"{backend:10s} {b['weights'] / 1e6:7.0f}MB {b['activations'] / 1e6:10.0f}MB "
          f"{b['intermediates'] / 1e6:12.0f}MB {b['total'] / 1e6:7.0f}MB  "
          f"{b['total'] / minimal['total']:5.1f}x")

# %% [markdown]
# At this size the torch back-ends move several times the minimal bytes, because each op writes its
# full (N, f) or (N, d) result to memory and the next op reads it back. The Triton path keeps the
# SwiGLU inputs in registers and writes only h and one (N, d) buffer.
#
# ## 3. The ceilings of this machine
#
# Data sheets give peak numbers, but a roofline is more honest when it is measured. The compute
# roof is the FLOP/s of one large matmul in the compute dtype. The memory roof is the bandwidth of a
# large device-to-device copy: every byte is read once and written once, so a copy of B bytes moves
# 2·B. `profiling.measure_ceilings` times both, with `triton.testing.do_bench` on a GPU (it warms up,
# flushes the L2 cache and synchronises) and with the median of repeated wall-clock runs after a
# warm-up on a CPU. On this shared 2-core CPU, small operations are timed with one thread: the
# ceilings and the points below are measured the same way.

# %%
dev = rt.device
if not rt.on_gpu:
    torch.set_num_threads(1)  # steadier medians for small ops on a shared CPU; the ceilings use the same
sizes = notebook_sizes("07", rt.mode)
ceil = profiling.measure_ceilings(dev, rt.dtype, **sizes["ceilings"])
unit, scale = ("TFLOP/s", 1e12) if rt.on_gpu else ("GFLOP/s", 1e9)
print(f"{ceil.device}, {ceil.dtype}")
print(f"  compute roof: {ceil.peak_flops / scale:8.2f} {unit}  ({ceil.matmul_n}^3 matmul)")
print(f"  memory roof : {ceil.bandwidth / 1e9:8.2f} GB/s     "
      f"({ceil.copy_bytes >> 20} MiB copied: read + write)")
print(f"  ridge point : {ceil.ridge:8.2f} FLOP/byte: below it a kernel is memory-bound")
assert ceil.peak_flops > 0 and ceil.bandwidth > 0

# %% [markdown]
# ## 4. The roofline, with points measured here
#
# A kernel of intensity I (FLOP/byte) cannot run faster than its bytes allow, I × bandwidth, nor
# faster than the peak. Its attainable speed is the lower of the two limits. On a log-log plot this
# is a slanted line (the memory roof) that meets a flat line (the compute roof) at the ridge point.
#
# **Exercise: the roofline.** Write `roofline(intensity, peak_flops, bandwidth)`.

# %%
def roofline(intensity, peak_flops, bandwidth):
    """Attainable FLOP/s at an arithmetic intensity (FLOP/byte), given peak FLOP/s and bytes/s."""
    # BEGIN SOLUTION
    return min(peak_flops, intensity * bandwidth)
    # END SOLUTION


checks.check_roofline(roofline)

# %% [markdown]
# Now measure the back-ends on this machine with the benchmark's own code (`moe_lab.studies.bench.run`,
# the same function as `python -m moe_lab bench`). On a CPU: the course's CPU-preset layer (`tiny`)
# and the teaching layer at a few small token counts, forward only. `triton` is left out on a CPU, because its
# interpreter times Python, not a kernel. On a GPU: the GPU preset layer and the fine-grained
# layer, every back-end.

# %%
live_cfg = dict(sizes["live_bench"],
                backends=[b for b in bench.BACKENDS if rt.on_gpu or b != "triton"])  # no interpreter timings
live = bench.run(live_cfg["shapes"], live_cfg["tokens"], live_cfg["backends"], ["forward"], dev, rt.dtype,
                 ceil, warmup=1, repeats=3, progress=False)
print(bench_records.summarize(live))
assert all(r["status"] in ("ok", "skipped") for r in live), \
    [r["note"] for r in live if r["status"] == "error"]

# %%
big = max(live_cfg["tokens"])
# (intensity, attained FLOP/s) per measured row
points = plots.bench_points([r for r in live if r["tokens"] == big])
ax = plots.plot_roofline(ceil.peak_flops, ceil.bandwidth, points,
                         unit=unit, roof_label=f"measured here ({ceil.device[:40]})",
                         title=f"live, {rt.mode} mode: forward, {big} tokens")
plt.show()

# %% [markdown]
# Every expert back-end at one (layer, tokens) has the same FLOPs and the same minimal bytes, so its
# points sit on one vertical line. Their heights differ only by how well each one uses the machine.
# The dense matmul has a different intensity: it reads one (d, 3f) matrix, not E experts. It is
# the speed that a grouped GEMM aims for. On a CPU a point can even sit above the roof: small
# working sets stay in the CPU's caches, which are faster than the main-memory copy that set the
# roof, and on a busy shared machine each measurement gets a different share of the cores. So no
# speed is asserted here. At these sizes the CPU numbers say more about PyTorch's per-operator
# overhead than about the hardware. The GPU figures below are what the kernels were written for.
#
# ## 5. Recorded GPU figures
#
# `python -m moe_lab bench --record` runs the full sweep on a GPU: three layers, tokens from 128 to
# 32768, every back-end, forward and forward+backward. It writes `data/bench/<device>.json` with the
# device, driver, torch and triton versions, the date and the command. Every GPU figure in this
# repository comes from such a file. This cell plots the ones that exist, each labelled with its
# device and date, with the points measured live here drawn in grey on the same roofline.

# %%
records = bench_records.load_bench_records()  # the shipped data/bench, found from any folder
if not records:
    print(f"No recorded GPU figures yet: {paths.data_path('bench')} holds no *.json file.\n"
          "To make one, on a machine with a CUDA GPU, from the repository root:\n"
          "    python -m moe_lab bench --record                       # the full sweep, several minutes\n"
          "    python -m moe_lab gpu-suite --out runs/gpu --only bench  # the same, with logs, time-limited\n"
          "then commit data/bench/<device>.json. This notebook will plot it here, labelled with its device "
          "and date.")
for rec in records:
    print(f"{bench_records.record_label(rec)} | driver {rec['driver']} | torch {rec['torch']} "
          f"| triton {rec['triton']}\n"
          f"  command: {rec['command']}")
    plots.plot_bench_record(rec, live_rows=[r for r in live if r["tokens"] == big], live_ceilings=ceil)
    plt.show()
    targets = rec.get("targets", [])
    if rec.get("commit") == "459cca6":  # the run the text below reads
        assert (sum(t["met"] for t in targets), len(targets)) == (3, 22)
    if targets:  # the course's targets at that commit, each checked at several token counts
        print(f"  targets: {sum(t['met'] for t in targets)} of {len(targets)} checks met")
        by_target = {}
        for t in targets:
            by_target.setdefault(t["target"], []).append(t)
        for name_t, checks_t in by_target.items():
            print(f"  - {name_t}: "
                  + ", ".join(f"{t['value']:.3g} at {t['tokens']} ({'met' if t['met'] else 'not met'})"
                              for t in checks_t))

# %% [markdown]
# **The targets.** A bench run also checks the course's speed targets for the `triton` back-end, each
# at several token counts, and records the outcome. On the H200 run above (commit 459cca6), 3 of the
# 22 checks are met. Grouped as the cell prints them:
#
# - **Absolute speed where the layer is compute-bound**: the fine-grained layer at 8192 to 32768
#   tokens (intensity 485 to 1676 FLOP/byte, past the ridge), forward at 400 TFLOP/s or more and
#   forward+backward at 330 or more, roughly half of the 757 TFLOP/s the matmul ceiling measured.
#   Recorded: 212 to 339 forward, 218 to 267 forward+backward. Not met.
# - **At least as fast as `torch._grouped_mm`**, the same grouped work in one library call. Met
#   forward (1.23× to 1.58×), not met forward+backward (0.89× to 0.91×): the backward kernels are the
#   slower part.
# - **At least 0.8× a dense matmul of equal FLOPs**, the speed a grouped GEMM aims for (section 8).
#   Recorded: 0.32 to 0.50 forward, 0.31 to 0.38 forward+backward. Not met.
# - **Where the layer is memory-bound** (the fine-grained layer at 128 to 2048 tokens, the teaching
#   layer at 128): the weights of the active experts streamed at 60 % or more of the measured copy
#   bandwidth. Recorded: 28 %, 22 % and 17 % for the fine-grained layer, 0.09 % for the teaching
#   layer. Not met.
#
# Why most are not met: this is the course's first GPU run. Its kernels autotuned on each new shape,
# and the five additions of notebook 06, section 9, all came after it. At compute-bound sizes the dense matmul
# reaches 88 to 90 % of the roofline on that GPU, the `triton` layer 28 to 45 %: the time goes to
# keeping the tensor cores fed, to padding rows, the gathered loads and the separate combine pass
# (section 8), not to bytes. At 128 tokens the fine-grained layer must stream 1.2 GB of weights,
# 0.28 ms at the measured bandwidth; it took 1.0 ms.
#
# The teaching layer is the extreme case: 0.85 ms at 128 tokens, about 0.1 % of its roofline (the
# target's measure, its weight bytes over the copy bandwidth, gives 0.09 %). Its 16
# experts' weights are 16 · 3 · 256 · 128 values, 3.1 MB in bf16, which the measured bandwidth moves
# in 0.75 µs. Its time does not follow its bytes: the fine-grained layer moved 380 times more in
# 1.0 ms. What the 0.85 ms measures is the fixed cost of one call, the host-side work of launching
# the layout kernels, two GEMMs and the combine from Python, which no tuning of the kernels changes.
# The `sorted` (2.3 ms) and `reference` (4.8 ms) back-ends, which launch many more operations per
# call, take longer still at the same bytes.
#
# What would meet them is a question for the next GPU run, measured rather than assumed: the current
# kernels, with a configuration table tuned on that GPU (section 7) and the additions of 06 §9
# (fewer launches for small layers among them), and then a faster backward. A run of
# `python -m moe_lab bench --record` on the same GPU records the targets again, and section 8 then
# draws both runs side by side.
#
# ## 6. Reading a profiler trace
#
# A roofline says *how far* a back-end is from its limit. A profiler says *where the time goes*.
# `torch.profiler` records every operator (on a CPU) or every GPU kernel, and
# `profiling.top_kernels` lists those that took the most time of their own (children excluded).
# Here is the `sorted` back-end, forward, on the live layer:

# %%
s = bench.SHAPES[live_cfg["shapes"][-1]]
inp = bench.make_inputs(s, big, dev, rt.dtype)
args = [inp[n] for n in ("x", "expert_idx", "weights", "w1", "w3", "w2")]
with torch.no_grad():
    top = profiling.top_kernels(lambda: experts_sorted(*args), dev, n=10)
# aten ops, cuBLAS / CUTLASS kernels (Hopper's are nvjet_*)
MATMUL_NAMES = ("mm", "gemm", "nvjet", "cutlass", "xmma")
mm_share = sum(r.share for r in top if any(n in r.name.lower() for n in MATMUL_NAMES))
print(f"\nmatmul operators / kernels: {mm_share:.0%} of the time in the top rows")
assert top and (rt.on_gpu or "aten::mm" in [r.name for r in top])
ROLES = {  # what each CPU operator of the sorted back-end does (section 1's FLOPs, or moving data)
    "aten::mm": "the three projections, once per expert: the useful FLOPs",
    "aten::index": "the gather x[token_of]: the permuted copy of x",
    "aten::select": "slicing each expert's rows",
    "aten::copy_": "copies around the gather and the slicing",
    "aten::silu": "SwiGLU's activation, one pass over an (N, f) tensor",
    "aten::mul": "SwiGLU's product and the routing weight, one pass each",
    "aten::cat": "stitching the expert outputs together",
    "aten::scatter_add_": "the combine (what index_add runs on a CPU)",
    "aten::index_add": "the combine",
    "aten::sort": "the routing metadata (argsort by expert)",
    "aten::bincount": "the routing metadata (rows per expert)",
    "aten::aminmax": "the input check of expert_idx's range",
}
if not rt.on_gpu:
    for r in top:
        print(f"  {r.name:20s} {ROLES.get(r.name, 'bookkeeping: views, allocations')}")

# %% [markdown]
# How to read it (CPU names; on a GPU the rows are CUDA kernels with longer names, the same roles).
# On a CPU the cell prints the role of each operator its table lists. `aten::mm`, the three
# projections once per expert, is the useful work, the FLOPs of section 1, and by far the largest
# row. Every other row is one of four kinds:
#
# - **data movement**: the gather `x[token_of]` (`aten::index`) that writes the permuted copy of x,
#   the slicing and copies around it, and the stitching and combining of the expert outputs;
# - **elementwise passes**: SwiGLU and the routing weight (`aten::silu`, `aten::mul`), each one full
#   pass over an (N, f) or (N, d) tensor in memory with almost no FLOPs, so memory-bound;
# - **routing metadata**: the sort by expert and the counts. Small, but on a GPU such reductions,
#   and `.tolist()`, make the CPU wait for the GPU (a host synchronisation);
# - **bookkeeping**: views, allocations and fills.
#
# Which of them reach the top ten, and in which order, changes from run to run on a shared CPU; the
# matmuls' lead does not.
#
# Everything that is not a matmul is the overhead that fusion removes. The Triton path of notebook
# 06 reduces it to a handful of kernels: the routing sort, `moe_up_kernel`, `moe_down_kernel` and
# the combine.

# %%
if rt.on_gpu:
    from moe_lab.kernels.moe import experts_triton

    with torch.no_grad():
        profiling.top_kernels(lambda: experts_triton(*args), dev, n=10)
else:
    print("On a GPU this cell lists the kernels of the triton back-end, for comparison. "
          "Under the interpreter a profile would show NumPy calls, not kernels.")

# %% [markdown]
# ## 7. Configurations: tuned ahead, looked up at run time
#
# A Triton GEMM kernel has free parameters that do not change *what* it computes, only how fast:
# the tile (BLOCK_M × BLOCK_N), the reduction step BLOCK_K, the program order GROUP_M (how many
# row blocks walk the column tiles together), the number of warps (a warp is 32 GPU threads that
# execute together; a program runs on `num_warps` of them) and
# `num_stages` (how many K-steps of tiles are loaded ahead, to hide memory latency). In the expert
# kernels BLOCK_M is the layout's row block, shared by every row-block kernel of one call.
#
# `triton.autotune` picks them by timing a list of candidates the first time a kernel meets a new
# shape. That costs a compile and a timing per candidate before the first result: on the course's
# first GPU run, every GPU test that used a new shape waited about 17 s for it. So the course does
# what vLLM and SGLang do for their fused-MoE kernels: `python -m moe_lab tune` times the whole
# search space once per device, on the course's layer shapes and a grid of token counts, and writes
# `data/kernel_tables/<device>.json`. At run time `config_table.choose` looks up the nearest
# bucket: no timing, one compile per configuration. A GPU without a table gets a documented
# heuristic that fits its shared memory; no table ships yet (two cells below say so), so today that
# is every GPU. Here is the search space of the up-projection kernel at a
# row block of 64, and what each candidate trades, for the fine-grained layer at 8192 tokens
# (N = 65536 routed rows, d = 2048, f = 768, bf16). A program loads one BLOCK_M × BLOCK_K tile of x
# and two BLOCK_K × BLOCK_N tiles of w1 and w3 per K-step, and does 2·2·BLOCK_M·BLOCK_N·BLOCK_K FLOPs
# with them:
#
# - larger BLOCK_N: more FLOPs per byte loaded (each x tile serves more columns), but fewer
#   programs and more accumulator registers per thread;
# - more stages: more tiles in shared memory at once, so more memory latency hidden, until shared
#   memory runs out (an H100 block may use 227 KiB);
# - more warps: more threads share the accumulators (fewer registers each), at the cost of more
#   synchronisation.

# %%
from moe_lab.kernels import INTERPRETED, config_table, moe_gemm  # after runtime.setup(): it imports triton

space = config_table.space("up", block_m=64)
N_rows, d_f, f_f, bm = 8192 * 8, 2048, 768, 64
# rows per expert are padded to whole blocks: at most one extra block per expert
n_blocks = N_rows // bm + 128
print(f"{len(space)} candidates for the up kernel at BLOCK_M = 64; the first twelve:")
print(f"{'BLOCK_N BLOCK_K GROUP_M warps stages':36s} {'programs':>9s} {'FLOP/byte':>10s} {'smem KiB':>9s} "
      f"{'acc regs/thread':>16s}")
for c in space[:12]:
    programs = n_blocks * -(-f_f // c.BLOCK_N)
    tile_bytes = (bm * c.BLOCK_K + 2 * c.BLOCK_K * c.BLOCK_N) * 2  # x tile + w1 and w3 tiles, bf16
    flop_per_byte = 2 * 2 * bm * c.BLOCK_N * c.BLOCK_K / tile_bytes
    smem = config_table.shared_memory_bytes("up", c, "bfloat16")
    print(f"{c.BLOCK_N:7d} {c.BLOCK_K:7d} {c.GROUP_M:7d} {c.num_warps:5d} {c.num_stages:6d}   {programs:9d} "
          f"{flop_per_byte:10.1f} {smem / 1024:9.0f} {config_table.accumulator_registers('up', c):16.0f}")
assert all(config_table.shared_memory_bytes("up", c, "bfloat16") <= 227 * 1024 for c in space)

# %% [markdown]
# No row wins every column, which is why the kernels are tuned by measurement. Where no table exists
# (a T4 on Colab, say, with 64 KiB of shared memory per block and no bfloat16), the heuristic starts
# from 128-column tiles and 64-wide steps and takes the deepest pipeline that fits, shrinking the
# tiles if none does (`config_table.heuristic`, documented rule). What it picks for the up kernel on
# GPUs it knows by name, in each GPU's 16-bit dtype:

# %%
rows_fine = config_table.rows_per_expert(8192, 8, 128)
print(f"{'GPU':6s} {'smem/block':>10s}  {'chosen (BLOCKs, GROUP_M, warps, stages)':42s} {'needs':>8s}")
for gpu_name in ("T4", "A10", "A100", "H100"):
    lim = config_table.known_device(gpu_name)
    dt = "bfloat16" if lim.has_bfloat16 else "float16"
    c = config_table.heuristic("up", dt, lim, rows_fine)
    need = config_table.shared_memory_bytes("up", c, dt)
    print(f"{gpu_name:6s} {lim.shared_memory // 1024:7d} KiB  {c.short():42s} {need / 1024:5.0f} KiB")
    assert need <= lim.shared_memory

# %% [markdown]
# Which tables ship with the course, and what this machine uses for the fine-grained layer at 8192
# tokens (forward). On a GPU the answer comes from its table, or from the heuristic where there is
# none; under the interpreter every kernel has one small configuration.

# %%
from moe_lab.kernels.moe_gemm import kernel_choice

tables = sorted(config_table.CONFIG_DIR.glob("*.json"))
for path in tables:
    t = config_table.load_table(str(path))
    print(f"{path.name}: {t['device']}, {t['date'][:10]}, triton {t['triton']}, {len(t['buckets'])} "
          f"buckets\n  {t['command']}")
if not tables:
    print("No tuned table ships yet: every GPU uses the heuristic.")
choice = kernel_choice(rt.dtype, dev, 2048, 768, 128, 8, 8192, training=False)
print("\nthis machine:", config_table.describe(choice))

# %% [markdown]
# Autotuning is still one environment variable away (`MOE_LAB_TRITON_AUTOTUNE=1` makes every expert
# kernel tune over a short list), and it is the right tool for a shape the table does not know. On a
# GPU the next cell runs it on the up kernel for one shape and shows what it measured and picked,
# next to the table's choice. On a CPU it explains and stops.

# %%
if rt.on_gpu:
    from moe_lab.kernels.moe_routing import moe_align

    s_f = bench.SHAPES["fine"]
    inp_t = bench.make_inputs(s_f, 2048, dev, rt.dtype)
    al = moe_align(inp_t["expert_idx"], s_f.n_experts, 64)
    tuner = moe_gemm.autotuned("up", moe_gemm.moe_up_kernel, ["d", "f", "BLOCK_M"], block_m=64)
    h_out = torch.empty(al.max_rows, s_f.d_expert, device=dev, dtype=rt.dtype)
    w1_, w3_, x_ = inp_t["w1"], inp_t["w3"], inp_t["x"]
    tuner[lambda meta: moe_gemm.row_grid(al.max_blocks, s_f.d_expert, meta["BLOCK_N"])](
        x_, w1_, w3_, h_out, h_out, h_out, al.sorted_ids, al.block_expert, al.n_assignments, al.max_blocks,
        s_f.d_model, s_f.d_expert, x_.stride(0), x_.stride(1), w1_.stride(0), w1_.stride(1), w1_.stride(2),
        h_out.stride(0), h_out.stride(1), top_k=al.top_k, SAVE_PREACT=False, DOT_PRECISION="tf32", BLOCK_M=64)
    for cfg_, ms_ in (getattr(tuner, "configs_timings", None) or {}).items():
        print(f"  autotune timed {cfg_.all_kwargs()} -> {ms_}")
    print("autotune picked:", tuner.best_config.all_kwargs())
    table_cfg = moe_gemm.config_for("up", al, rt.dtype, dev, s_f.d_model, s_f.d_expert)
    t_table = profiling.bench_ms(lambda: moe_gemm.moe_up(x_, w1_, w3_, al, config=table_cfg), dev)
    print(f"the table's choice {table_cfg.short()}: {t_table:.3f} ms")
else:
    print("Autotuning runs only for kernels compiled on a GPU; under the interpreter each kernel has one "
          "configuration (config_table.INTERPRETER_CONFIG).")

# %% [markdown]
# **What each choice bought, measured.** The tuner keeps every timing it took, and
# `python -m moe_lab tune` writes them beside the table, `data/kernel_tables/<device>-timings.json`. Once such a file
# is committed, the next cell reads the effect of each knob off that one run: for every kernel and
# bucket, the best time among the configurations with a given value of the knob, divided by the best
# time overall (above 1: that value was slower). No tuning run is recorded yet, so today the cell
# only says so; it is how a change to the kernels' configurations should be judged, by measurement,
# knob by knob.

# %%
import json

from moe_lab.core import paths
from moe_lab.studies import tune

tune_files = sorted(paths.data_path("kernel_tables").glob("*-timings.json"))  # shipped beside the tables
if not tune_files:
    print("No recorded tuning run yet (data/kernel_tables/*-timings.json): `python -m moe_lab tune` on a GPU "
          "writes one beside its table.")
for path in tune_files:
    rec = json.loads(path.read_text())
    rows_ = [r for r in rec["timings"] if r["ms"] is not None]
    print(f"{path.name}: {rec['device']}, {rec['date'][:10]} ({len(rows_)} timings)")
    knobs = {"GROUP_M": "GROUP_M", "BLOCK_N": "BLOCK_N", "num_stages": "num_stages", "block_m": "block_m"}
    fig, axes_k = plt.subplots(1, len(knobs), figsize=(16, 3.2))
    for ax_k, (knob, key) in zip(axes_k, knobs.items()):
        effect = tune.knob_effect(rows_, key)
        for kernel, per_value in effect.items():
            vals = sorted(per_value)
            ax_k.plot([str(v) for v in vals], [per_value[v] for v in vals], marker="o", label=kernel)
        ax_k.axhline(1.0, color="k", lw=0.8)
        ax_k.set_title(f"{knob}: best time / best overall", fontsize=9)
        ax_k.set_xlabel(knob)
    axes_k[0].set_ylabel("geometric mean over buckets")
    axes_k[-1].legend(fontsize=7)
    fig.suptitle(f"tuned on {rec['device']}, {rec['date'][:10]}", fontsize=10)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## 8. The gap, explained
#
# Put each back-end next to the dense ceiling at the same FLOPs and the same tokens. Here are the
# live measurements of section 4 (and, below them, those of any recorded GPU file):

# %%
def gap_table(rows, label):
    print(label)
    print(f"{'shape':9s} {'tokens':>6s} {'back-end':>10s} {'ms':>9s} {'x dense time':>12s} "
          f"{'% of roofline':>14s}")
    for r in rows:
        if r["status"] != "ok" or r["backend"] == "dense" or r["pass"] != "forward":
            continue
        dense = [q for q in rows if q["status"] == "ok" and q["backend"] == "dense"
                 and q["shape"] == r["shape"] and q["tokens"] == r["tokens"] and q["pass"] == r["pass"]]
        ratio = f"{r['ms'] / dense[0]['ms']:12.1f}" if dense else f"{'-':>12s}"
        roof = f"{r['frac_roofline']:14.1%}" if r.get("frac_roofline") is not None else f"{'-':>14s}"
        print(f"{r['shape']:9s} {r['tokens']:6d} {r['backend']:>10s} {r['ms']:9.3f} {ratio} {roof}")


gap_table(live, f"live, {ceil.device}:")
for rec in records:
    gap_table([r for r in rec["results"] if r["tokens"] in (128, 8192, 32768)],
              "\n" + bench_records.record_label(rec) + ":")

# %% [markdown]
# Why each back-end falls short of the ceiling, from the counts above:
#
# - **reference** loops over experts in Python. With E experts it launches about 10·E small
#   operations, and `y.index_add` copies all of y once per active expert (2·T·d values each time).
#   With 128 experts, launch overhead and those copies dominate.
# - **sorted** permutes once and runs one matmul per expert on a contiguous slice. The matmuls are
#   efficient when experts get many rows. But every intermediate (the permuted x, x@w1, x@w3,
#   silu, h, the expert outputs, the concatenation) goes through memory: about 9·N·d + 8·N·f values
#   against 2·T·d for the activations. There is still one matmul launch per expert.
# - **grouped_mm** replaces the E matmuls by one `torch._grouped_mm` call per projection: one
#   launch, and tiles from several experts in flight at once. The elementwise intermediates stay,
#   so at memory-bound sizes it moves nearly the bytes of `sorted`.
# - **triton** gathers x inside the GEMM, applies SwiGLU and the routing weight in the epilogues, and
#   writes only h and one (N, d) buffer. What remains: padding rows (up to BLOCK_M − 1 per
#   expert, which is costly for 128 small experts at few tokens), the separate combine pass, and
#   at few tokens the fixed cost of launches.
# - **dense** has none of these costs: one matmul, no routing. At few tokens it also reads far fewer
#   weight bytes, since it holds only one (d, 3f) matrix instead of E experts. Compare the expert
#   back-ends with it where all of them are compute-bound, at 8192 tokens and more.
#
# **Before and after, on one GPU.** Where the repository holds several recorded runs of one device
# (each names its commit), the next cell puts the `triton` back-end of each next to the others, and
# next to `torch._grouped_mm` and the dense matmul of the newest run: what the changes between
# those commits bought at each token count. Today there is one run (the H200's, which predates the
# changes of notebook 06, section 9), so the cell has nothing to compare yet and says so.

# %%
by_device = {}
for rec in records:
    by_device.setdefault(rec["device"], []).append(rec)
compared = False
for device_name, recs in by_device.items():
    if len(recs) < 2:
        continue
    compared = True
    recs = sorted(recs, key=lambda r: r["date"])
    fig, axes_b = plt.subplots(1, 2, figsize=(13, 3.8))
    for ax_b, mode in zip(axes_b, ("forward", "forward+backward")):
        for i, rec in enumerate(recs):
            fine = bench_records.ok_results(rec, shape="fine", backend="triton", **{"pass": mode})
            pts = sorted((r["tokens"], r["tflops"]) for r in fine)
            if pts:
                ax_b.plot(*zip(*pts), marker="o", ms=3,
                          label=f"triton, commit {rec.get('commit') or rec['date'][:10]}",
                          color=plots.backend_color("triton"), alpha=0.35 + 0.65 * i / (len(recs) - 1))
        for other in ("grouped_mm", "dense"):
            fine = bench_records.ok_results(recs[-1], shape="fine", backend=other, **{"pass": mode})
            pts = sorted((r["tokens"], r["tflops"]) for r in fine)
            if pts:
                ax_b.plot(*zip(*pts), ls="--", color=plots.backend_color(other),
                          label=f"{other} (newest run)")
        ax_b.set_xscale("log", base=2)
        ax_b.set_xlabel("tokens")
        ax_b.set_ylabel("TFLOP/s")
        ax_b.set_title(f"fine-grained layer, {mode}: {device_name}", fontsize=9)
        ax_b.legend(fontsize=7)
    fig.tight_layout()
    plt.show()
if not compared:
    print("No device has two recorded runs yet: nothing to compare.")

# %% [markdown]
# Public reference points for the same kernels: SGLang's and vLLM's fused-MoE Triton kernels ship
# benchmark scripts (SGLang `benchmark/kernels/fused_moe_triton`, vLLM
# `benchmarks/kernels/benchmark_moe.py`). Liger Kernel's paper (Hsu et al., 2024) reports its fused
# Triton kernels against PyTorch. Compare with their published figures at the same shape, dtype and
# GPU, and cite the source and its date when you quote one.
#
# ## Summary
# - An expert layer does **6·T·k·d·f** forward FLOPs (three matmuls over T·k routed rows) and twice
#   that backward. `FlopCounterMode` agrees.
# - Its unavoidable bytes are the weights of the experts that receive tokens,
#   E·(1 − (1 − k/E)^T) of them under random routing, plus the activations. Everything else is
#   **intermediate traffic** that an implementation adds, and fusion removes.
# - **Arithmetic intensity** grows with tokens per expert. Few tokens, or many small experts, make a
#   layer memory-bound. Many tokens make it compute-bound.
# - A **roofline** from *measured* ceilings (a large matmul, a large copy) turns a timing into a
#   fraction of what the machine allows at that intensity.
# - `triton.testing.do_bench` (GPU) and medians after a warm-up (CPU) time kernels. `torch.profiler`
#   shows where the time goes. Tile sizes, program order, warps and stages are **tuned ahead** per
#   device (`python -m moe_lab tune`) and looked up at run time, or chosen by a heuristic where no
#   table exists (so far, every GPU); autotuning stays one switch away.
# - `python -m moe_lab bench` measures all of this. `--record` on a GPU writes the figures this
#   notebook plots; `python -m moe_lab gpu-suite` runs every GPU test and benchmark in one call.
#
# ## Papers and further reading
# - Williams, Waterman, Patterson. *Roofline: an insightful visual performance model for multicore architectures* (CACM 2009).
# - Tillet, Kung, Cox. *Triton: an intermediate language and compiler for tiled neural network computations* (MAPL 2019).
# - Dao, Fu, Ermon, Rudra, Ré. *FlashAttention: fast and memory-efficient exact attention with IO-awareness* (NeurIPS 2022): counting bytes, not FLOPs.
# - Gale, Narayanan, Young, Zaharia. *MegaBlocks: efficient sparse training with mixture-of-experts* (MLSys 2023).
# - Hsu et al. *Liger Kernel: efficient Triton kernels for LLM training* (2024).
# - Zheng et al. *SGLang: efficient execution of structured language model programs* (2024): its fused-MoE Triton kernels and their benchmarks.
# - DeepSeek-AI. *DeepSeek-V3 technical report* (2024): fine-grained experts and the kernels they need.
# - The PyTorch profiler recipe, and `triton.testing.do_bench` in the Triton documentation.
