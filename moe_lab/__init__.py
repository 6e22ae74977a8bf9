"""moe-lab: build a Mixture-of-Experts language model, its Triton kernels and GRPO, from scratch.

The package holds the canonical version of everything the notebooks build, so later notebooks
import it instead of re-pasting code. Start with `moe_lab.runtime.setup()`.
"""
__version__ = "0.1.0"
