"""What the course knows about each expert back-end, written once: its name, what it is, how it runs,
the intermediate traffic the cost model counts for it, and its marker in plots.

The functions themselves live in the library (moe_lab.model.expert_backends turns a name into the
function and says whether it runs here); this table is plain data on the ground floor, so configs
(which validate a back-end's name), the cost model and the plots read it without importing the
model. Nothing else lists the back-ends' names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

# Intermediate traffic in units of N*d, N*f, T*d and (active experts)*T*d, N = T*k routed rows.
# Counted op by op from each implementation's code (moe_lab.model.experts, moe_lab.kernels); each
# op reads its inputs and writes its output once. "forward" is inference (no saved tensors);
# "backward" is the extra traffic of the backward pass after a training forward.
Traffic = Mapping[str, tuple]  # {pass: (Nd, Nf, Td, E_active*Td)}


@dataclass(frozen=True)
class BackendFacts:
    """One way to run the routed experts, as data."""

    name: str
    about: str
    is_function: bool = True  # False for 'ep': a module swapped into the layer, not a function to call
    python_loop: bool = False  # loops over experts in Python: its time grows with E, not with the work
    capturable: bool = False  # no host synchronisation: a call can be captured in a CUDA graph
    cpu_interpreted: bool = False  # on a CPU it runs through an interpreter: timing it there times Python
    traffic: Optional[Traffic] = None  # the cost model's intermediate traffic (None: not modelled)
    marker: str = "o"  # matplotlib marker in the bench plots


BACKENDS: tuple[BackendFacts, ...] = (
    # as grouped_mm, but y = y.index_add(...) copies all of y once per active expert (2Td each),
    # and the backward of x[token] accumulates a (T, d) gradient per active expert (4Td each).
    BackendFacts("reference", "a loop over experts: the readable truth", python_loop=True,
                 traffic={"forward": (7, 8, 1, 2), "backward": (16, 15, 0, 4)}, marker="v"),
    # forward: permuted copy of x (write 1, read 2), a1, a3, silu(a1), h (write + read each: 8Nf),
    # expert outputs, torch.cat, weighting (2Nd each), and index_add into zeros (2Td).
    BackendFacts("sorted", "permute once, one matmul per expert", python_loop=True,
                 traffic={"forward": (9, 8, 2, 0), "backward": (16, 15, 2, 0)}, marker="s"),
    # as sorted without the torch.cat (the grouped matmul writes one (N, d) output)
    BackendFacts("grouped_mm", "the sorted layout on torch._grouped_mm",
                 traffic={"forward": (7, 8, 2, 0), "backward": (16, 15, 2, 0)}, marker="D"),
    # as grouped_mm, counted at perfect balance (padding adds (max load / mean load - 1) of every
    # N-sized term), plus the gate-and-up weights concatenated per call (weights, not counted here)
    BackendFacts("padded", "rows padded to the busiest expert's: one batched matmul per projection",
                 traffic={"forward": (7, 8, 2, 0), "backward": (16, 15, 2, 0)}, marker="P"),
    # forward: h written and read (2Nf), the (N, d) per-assignment buffer written and read by the
    # combine (2Nd); training also writes a1, a3 (2Nf). Backward: a1, a3 read and da1, da3 written
    # (4Nf), da1, da3 read by the dx and the dW1/dW3 kernels (4Nf), h read by dW2 (Nf); dy gathered
    # twice and x once per row (3Nd), the dx buffer written and combined (2Nd).
    BackendFacts("triton", "the Triton kernels of notebook 06", capturable=True, cpu_interpreted=True,
                 traffic={"forward": (2, 2, 0, 0), "backward": (5, 9, 0, 0)}, marker="*"),
    BackendFacts("ep", "experts sharded over processes (notebook 09)", is_function=False, marker="X"),
)
_BY_NAME = {b.name: b for b in BACKENDS}


def names(functions_only: bool = True, **where) -> tuple[str, ...]:
    """The back-ends' names: those a layer can call (default), or all of them (with 'ep'); `where`
    keeps those whose fields have the given values (e.g. python_loop=True)."""
    return tuple(b.name for b in BACKENDS if (b.is_function or not functions_only)
                 and all(getattr(b, k) == v for k, v in where.items()))


def facts(name: str) -> BackendFacts:
    """The facts of back-end `name`; a ValueError naming the known ones otherwise."""
    if name not in _BY_NAME:
        raise ValueError(f"backend={name!r}: expected one of {names(functions_only=False)}")
    return _BY_NAME[name]
