"""moe-lab: build a Mixture-of-Experts language model, its Triton kernels and GRPO, from scratch.

The package holds the canonical version of everything the notebooks build, so later notebooks
import it instead of re-pasting code. Start with `moe_lab.core.runtime.setup()`.

Importing it sets OMP_WAIT_POLICY=PASSIVE (unless set already) while torch is not yet imported:
torch's OpenMP threads then sleep instead of spinning while they wait, so two notebooks computing
at once on a small machine do not stall each other (see moe_lab/commands/lab.py). The policy is read once,
when torch loads: `runtime.setup()` says so when torch came first. How many threads torch uses is
decided by `runtime.setup()` (`runtime.thread_policy`: one on a CPU in modes cpu and ci, measured
with `python -m moe_lab cpu-bench`; MOE_LAB_THREADS=N to change).
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# Whether OpenMP's wait policy could still be chosen here: torch not loaded yet (it reads it on load).
OMP_POLICY_SET_BEFORE_TORCH = "torch" not in _sys.modules or "OMP_WAIT_POLICY" in _os.environ
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
