"""The expert back-ends, in one registry: their names, whether each runs here (and why not), dispatch,
and the check that they all compute the same function.

Every back-end runs the routed experts of an MoE layer with the contract of moe_lab.model.experts:
experts(x (T, d), expert_idx (T, k), weights (T, k), w1, w3 (E, d, f), w2 (E, f, d)) -> (T, d).

    reference    a loop over experts: the readable truth                     moe_lab.model.experts
    sorted       permute once, one matmul per expert                        moe_lab.model.experts
    grouped_mm   the sorted layout on torch._grouped_mm (where torch has it) moe_lab.model.experts
    padded       rows padded per expert: one batched matmul per projection   moe_lab.model.experts
    triton       the Triton kernels of notebook 06                          moe_lab.kernels.moe
    ep           experts sharded over processes (notebook 09): not a function but an experts module
                 swapped into the layer by moe_lab.distributed.to_expert_parallel

    from moe_lab.model import expert_backends as B
    B.names()                                   # ('reference', 'sorted', 'grouped_mm', 'padded', 'triton')
    B.status("triton", "cpu", torch.bfloat16)   # why it cannot run here, or None
    y = B.run_experts("sorted", x, expert_idx, weights, w1, w3, w2)
    B.agreement(["sorted", "triton"], x, expert_idx, weights, w1, w3, w2)   # outputs and gradients vs reference

The names and facts (what each is, python_loop, capturable, traffic, plot marker) are data in
moe_lab.core.backends; this module holds their code. Nothing else lists the back-ends' names:
configs, the cost model, plots, the model, expert parallelism and the bench ask these two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from moe_lab.core.backends import BACKENDS, BackendFacts, names as backend_names
from moe_lab.core.contract import max_rel_diff
from moe_lab.model import experts as X


@dataclass(frozen=True)
class ExpertBackend:
    """One way to run the routed experts: its facts (moe_lab.core.backends) and its code."""

    facts: BackendFacts  # name, what it is, python_loop, capturable, traffic, marker
    load: Callable[[], Callable]  # returns experts(x, expert_idx, weights, w1, w3, w2) -> y
    why_not: Callable[[torch.device, torch.dtype], Optional[str]]  # None when it runs here, else the reason


def _always(device, dtype) -> Optional[str]:
    return None


def _grouped_mm_why_not(device, dtype) -> Optional[str]:
    """None when torch._grouped_mm runs here (checked with a tiny call), else the reason it does not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"not available in this torch ({torch.__version__} has no torch._grouped_mm)"
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(32, 16, generator=g).to(device, dtype)
        b = torch.randn(3, 16, 16, generator=g).to(device, dtype)
        offs = torch.tensor([8, 8, 32], dtype=torch.int32, device=device)
        out = torch._grouped_mm(a, b, offs=offs)
        want = torch.cat([a[:8] @ b[0], a[8:] @ b[2]])
        if not torch.allclose(out.float(), want.float(), rtol=5e-2, atol=5e-2):
            return "not available in this torch (a test call returned wrong values)"
    except Exception as err:  # a CPU build or an old GPU may refuse
        return (f"not available in this torch on {torch.device(device).type}/{str(dtype).replace('torch.', '')}: "
                f"{str(err).splitlines()[0][:120]}")
    return None


def _load_triton() -> Callable:
    from moe_lab.kernels.moe import experts_triton  # imported on first use: Triton is optional

    return experts_triton


def _triton_why_not(device, dtype) -> Optional[str]:
    try:
        from moe_lab.kernels import INTERPRETED, check_dtype_supported  # Triton is optional: ask only here

        check_dtype_supported(x=torch.empty(0, dtype=dtype))
    except (ImportError, RuntimeError, TypeError) as err:
        return f"not available: {str(err).splitlines()[0][:160]}"
    if not INTERPRETED and torch.device(device).type != "cuda":
        return "not available: the kernels are compiled for the GPU in this process (CPU tensors need the interpreter)"
    return None


def _load_ep() -> Callable:
    raise ValueError("the 'ep' back-end is a module, not a function: build an expert-parallel layer with "
                     "moe_lab.distributed.to_expert_parallel(layer, group) (notebook 09)")


def _ep_why_not(device, dtype) -> Optional[str]:
    import torch.distributed as dist

    if not dist.is_available():
        return "not available: this torch has no torch.distributed"
    if not dist.is_initialized():
        return "needs a process group (torch.distributed.init_process_group; notebook 09 starts one)"
    return None


_CODE = {  # name: (load, why_not); every name of moe_lab.core.backends has its code here
    "reference": (lambda: X.experts_reference, _always),
    "sorted": (lambda: X.experts_sorted, _always),
    "grouped_mm": (lambda: X.experts_grouped_mm, _grouped_mm_why_not),
    "padded": (lambda: X.experts_padded, _always),
    "triton": (_load_triton, _triton_why_not),
    "ep": (_load_ep, _ep_why_not),
}
_REGISTRY: dict[str, ExpertBackend] = {b.name: ExpertBackend(b, *_CODE[b.name]) for b in BACKENDS}
assert set(_CODE) == set(_REGISTRY), "every back-end of moe_lab.core.backends needs its code here"


names = backend_names  # the back-ends' names (moe_lab.core.backends.names)


def get(name: str) -> ExpertBackend:
    """The back-end called `name`; a ValueError naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r}: expected one of {names(functions_only=False)}")
    return _REGISTRY[name]


def check_name(name, what: str = "backend") -> str:
    """`name` if a layer can run its experts with it; else a ValueError that names `what` and the choices."""
    if not isinstance(name, str) or name not in names():
        hint = " ('ep' is built with moe_lab.distributed.to_expert_parallel)" if name == "ep" else ""
        raise ValueError(f"{what}={name!r}: expected one of {names()}{hint}")
    return name


def status(name: str, device="cpu", dtype: torch.dtype = torch.float32) -> Optional[str]:
    """None when back-end `name` can run on this device and dtype, else the reason it cannot."""
    return get(name).why_not(torch.device(device), dtype)


def available(device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, Optional[str]]:
    """{name: None or the reason it cannot run here} for every back-end."""
    return {n: status(n, device, dtype) for n in names(functions_only=False)}


def experts_fn(name: str) -> Callable:
    """The function of back-end `name` (imports it on first use)."""
    check_name(name)
    return get(name).load()


def run_experts(backend: str, x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Run the routed experts with back-end `backend` (see names())."""
    return experts_fn(backend)(x, expert_idx, weights, w1, w3, w2)


def agreement(backends: Sequence[str], x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor,
              w2: Tensor, reference: str = "reference", probe: Optional[Tensor] = None) -> list[dict]:
    """Do the back-ends compute the same function? Each one's output and the gradients of x, weights,
    w1, w3 and w2 (of the loss sum(y * probe), probe random by default) against `reference`'s, as
    relative differences (largest |difference| over the largest |value|):
    [{"backend", "output", "gradient", "worst_gradient"}]. Notebooks 03 and 06 and the tests print and
    assert on these rows."""
    if probe is None:
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)

    def run(name):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, w3, w2)]
        y = run_experts(name, leaves[0], expert_idx, *leaves[1:])
        grads = torch.autograd.grad((y * probe).sum(), leaves, allow_unused=True) if y.requires_grad else [None] * 5
        return y.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]

    y_ref, g_ref = run(reference)
    rows = []
    for name in backends:
        y, g = run(name)
        diffs = {n: max_rel_diff(a.float(), b.float()) for n, a, b in zip(("x", "weights", "w1", "w3", "w2"), g, g_ref)}
        worst = max(diffs, key=diffs.get)
        rows.append(dict(backend=name, output=max_rel_diff(y.float(), y_ref.float()), gradient=diffs[worst], worst_gradient=worst))
    return rows


def layer_agreement(layer, x: Tensor, backends: Sequence[str], reference: str = "reference", loss=None) -> list[dict]:
    """The same check for a whole layer (anything with a settable `backend`, an `aux_loss` and
    parameters, such as an MoELayer): its output and the gradient of every parameter (router and
    shared experts included) under each back-end, against `reference`, as relative differences:
    [{"backend", "output", "gradient", "worst_parameter"}]. loss(y, layer) defaults to
    mean(y^2) + the layer's auxiliary loss. The layer's back-end is restored afterwards."""
    loss = loss or (lambda y, m: y.square().mean() + m.aux_loss)
    before = layer.backend

    def run(name):
        layer.zero_grad()
        layer.backend = name
        y = layer(x)
        loss(y, layer).backward()
        return y.detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}

    try:
        y_ref, g_ref = run(reference)
        rows = []
        for name in backends:
            y, g = run(name)
            if set(g) != set(g_ref):
                raise AssertionError(f"{name}: gradients reach {sorted(g)}, {reference}'s reach {sorted(g_ref)}")
            diffs = {n: max_rel_diff(g[n].float(), g_ref[n].float()) for n in g_ref}
            worst = max(diffs, key=diffs.get) if diffs else None
            rows.append(dict(backend=name, output=max_rel_diff(y.float(), y_ref.float()),
                             gradient=diffs[worst] if worst else 0.0, worst_parameter=worst))
    finally:
        layer.zero_grad()
        layer.backend = before
    return rows


def random_problem(T: int, d: int, f: int, E: int, k: int, seed: int, drop: float = 0.0,
                   idx: Optional[Tensor] = None, empty_expert: bool = False, device="cpu") -> list[Tensor]:
    """A random problem of the experts' contract, to check back-ends on: [x (T, d), expert_idx (T, k),
    weights (T, k), w1, w3 (E, d, f), w2 (E, f, d), probe (T, d)] (probe: a dense random dy, the
    loss being sum(y * probe)). Each token picks k distinct experts (of the first E - 1 with
    empty_expert, so the last one gets nothing); a share `drop` of the assignments is dropped (-1);
    or pass `idx`. Weights of dropped assignments are 0. Seeded: the same problem on every call."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen)
    if idx is None:
        pool = E - 1 if empty_expert else E
        if k > pool:
            raise ValueError(f"k={k} experts per token from {pool} experts: expected k <= {pool}")
        idx = torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.long)
        idx = idx.masked_fill(torch.rand(idx.shape, generator=gen) < drop, -1)
    weights = torch.rand(T, idx.shape[1], generator=gen).masked_fill(idx < 0, 0.0)
    w1, w3 = (torch.randn(E, d, f, generator=gen) * d**-0.5 for _ in range(2))
    w2 = torch.randn(E, f, d, generator=gen) * f**-0.5
    probe = torch.randn(T, d, generator=gen)
    return [t.to(device) for t in (x, idx, weights, w1, w3, w2, probe)]
