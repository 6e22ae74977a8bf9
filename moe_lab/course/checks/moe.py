"""Checkers for notebook 03 (the MoE layer): top-k router, Switch aux loss, capacity, expert back-end."""
from __future__ import annotations

from typing import Callable

import torch

from moe_lab.course.checks.common import CheckFailed, _compare, _ok, checker
from moe_lab.model import router
from moe_lab.model.experts import experts_reference


@checker
def check_topk_router(route: Callable) -> None:
    """route(logits (T, E), k) -> (expert_idx (T, k), weights (T, k)): top-k of softmax, renormalised."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 6, generator=g)
    probs = logits.softmax(-1)
    top = probs.topk(2, -1)
    idx, w = route(logits, 2)
    if not isinstance(idx, torch.Tensor) or idx.shape != (7, 2):
        raise CheckFailed(f"check_topk_router: expert_idx should be (tokens=7, k=2), got {getattr(idx, 'shape', type(idx))}")
    if not torch.equal(idx.sort(-1).values, top.indices.sort(-1).values):
        raise CheckFailed("check_topk_router: the chosen experts are not the k with the largest probabilities")
    order = idx.argsort(-1)
    w_sorted, idx_sorted = w.gather(-1, order), idx.gather(-1, order)
    expected = probs.gather(-1, idx_sorted)
    if isinstance(w, torch.Tensor) and w.shape == (7, 2) and torch.allclose(w_sorted, expected, atol=1e-5):
        raise CheckFailed("check_topk_router: the weights are the raw softmax probabilities; renormalise them over the "
                          "k chosen experts so they sum to 1 (as Mixtral does)")
    _compare("check_topk_router", w_sorted, expected / expected.sum(-1, keepdim=True), what="weights")
    _ok("check_topk_router")


@checker
def check_switch_aux_loss(aux_loss: Callable) -> None:
    """aux_loss(probs (T, E), expert_idx (T, k), n_experts) -> E * sum_i f_i * P_i."""
    g = torch.Generator().manual_seed(4)
    probs = torch.randn(20, 4, generator=g).mul(2).softmax(-1)
    idx = probs.topk(2, -1).indices
    expected = router.switch_aux_loss(probs, idx, 4)
    got = aux_loss(probs, idx, 4)
    got = torch.as_tensor(got, dtype=torch.float32)
    if got.dim() != 0:
        raise CheckFailed(f"check_switch_aux_loss: the loss should be a scalar, got shape {tuple(got.shape)}")
    uniform = aux_loss(torch.full((8, 4), 0.25), torch.arange(8).remainder(4)[:, None], 4)
    if abs(float(uniform) - 1.0) > 1e-4:
        raise CheckFailed(f"check_switch_aux_loss: at perfect balance the loss is exactly 1.0 (E * E * 1/E * 1/E); "
                          f"yours gives {float(uniform):.4f}: did you forget the factor E, or average instead of sum?")
    _compare("check_switch_aux_loss", got, expected.float(), what="loss")
    _ok("check_switch_aux_loss")


@checker
def check_capacity(apply_capacity: Callable) -> None:
    """apply_capacity(expert_idx (T, k), weights, n_experts, capacity) -> (idx with -1, weights with 0)."""
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0], [2, 0]])
    w = torch.rand(5, 2) + 0.1
    exp_idx, exp_w = router.apply_capacity(idx, w, 3, 2)
    got_idx, got_w = apply_capacity(idx.clone(), w.clone(), 3, 2)
    if not torch.equal(got_idx, exp_idx):
        if torch.equal(got_idx.eq(-1).sum(), exp_idx.eq(-1).sum()):
            raise CheckFailed(f"check_capacity: the right number of assignments is dropped but not the right ones: serve "
                              f"all first choices (in token order) before any second choice.\n got {got_idx.tolist()}\n"
                              f" expected {exp_idx.tolist()}")
        raise CheckFailed(f"check_capacity: expert_idx after capacity is {got_idx.tolist()}, expected {exp_idx.tolist()} "
                          f"(capacity 2 per expert; dropped = -1)")
    _compare("check_capacity", got_w, exp_w, what="weights (dropped assignments must get weight 0)")
    _ok("check_capacity")


@checker
def check_expert_backend(experts: Callable) -> None:
    """experts(x, expert_idx, weights, w1, w3, w2) agrees with moe_lab's reference, gradients included."""
    g = torch.Generator().manual_seed(5)
    T, d, f, E, k = 23, 8, 12, 5, 2
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # distinct experts; 4 gets none
    idx[0, 1] = -1  # one dropped assignment
    w = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)
    W = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in [(E, d, f), (E, d, f), (E, f, d)]]
    expected = experts_reference(x, idx, w, *W)
    got = experts(x, idx, w, *W)
    _compare("check_expert_backend", got, expected)
    probe = torch.randn(T, d, generator=g, dtype=torch.float64)
    ge = torch.autograd.grad((expected * probe).sum(), [x, w, *W])
    gg = torch.autograd.grad((got * probe).sum(), [x, w, *W], allow_unused=True)
    for name, a, b in zip(["x", "weights", "w1", "w3", "w2"], gg, ge):
        if a is None:
            raise CheckFailed(f"check_expert_backend: no gradient reaches {name}")
        _compare("check_expert_backend", a, b, what=f"gradient of {name}")
    _ok("check_expert_backend")
