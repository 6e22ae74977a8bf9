"""Checkers for notebook 08 (GRPO): group-relative advantages, the k3 KL estimator, the clipped surrogate."""
from __future__ import annotations

from typing import Callable

import torch

from moe_lab.course.checks.common import CheckFailed, _compare, _ok, checker
from moe_lab.training import grpo


def _tensor(name: str, got, what: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{name}: the {what} should be a torch.Tensor, got {type(got).__name__}")
    return got.float()


@checker
def check_group_advantages(advantages: Callable) -> None:
    """advantages(rewards (P*G,), group_size) -> (r - group mean) / (group std + eps), 0 for equal rewards."""
    name = "check_group_advantages"
    g = torch.Generator().manual_seed(8)
    r = torch.randint(0, 2, (5 * 6,), generator=g).float() + 0.1 * torch.rand(30, generator=g)
    r[:6] = 1.0  # one group where every answer earned the same
    expected = grpo.group_advantages(r, 6)
    got = _tensor(name, advantages(r.clone(), 6), "advantages")
    if got.shape != expected.shape:
        raise CheckFailed(f"{name}: the advantages have shape {tuple(got.shape)}, expected {tuple(expected.shape)} "
                          f"(one per completion, in the order of the rewards)")
    if not torch.isfinite(got).all():
        raise CheckFailed(f"{name}: NaN or inf in the advantages: a group whose rewards are all equal has std 0; "
                          f"its advantages must be 0 (they carry no signal), not 0/0")
    if torch.allclose(got, r - r.mean(), atol=1e-5):
        raise CheckFailed(f"{name}: you subtracted the mean of the whole batch; GRPO's baseline is the mean of each group "
                          f"of {6} completions of the same prompt (view the rewards as (P, G))")
    grouped = r.view(5, 6)
    centred = grouped - grouped.mean(1, keepdim=True)
    if torch.allclose(got, centred.flatten(), atol=1e-5):
        raise CheckFailed(f"{name}: the advantages are centred but not divided by the group's std (that is Dr. GRPO's "
                          f"variant; GRPO standardises)")
    sample_std = torch.where(grouped.std(1, keepdim=True) > 0, centred / grouped.std(1, keepdim=True), torch.zeros_like(centred))
    if torch.allclose(got, sample_std.flatten(), atol=1e-4):
        raise CheckFailed(f"{name}: you divided by the sample std (G-1 in the denominator); the course uses the population "
                          f"std, unbiased=False, so a group {{0, 1}} gets advantages exactly ±1")
    if got[:6].abs().max() > 1e-6:
        raise CheckFailed(f"{name}: the first group's rewards are all equal, so its advantages must be 0; got {got[:6].tolist()}")
    _compare(name, got, expected, atol=1e-4, what="advantages")
    _ok(name)


@checker
def check_kl_k3(kl: Callable) -> None:
    """kl(logp, ref_logp) -> exp(ref_logp - logp) - (ref_logp - logp) - 1, per token."""
    name = "check_kl_k3"
    g = torch.Generator().manual_seed(9)
    logp = -torch.rand(4, 7, generator=g) * 3
    ref = logp + torch.randn(4, 7, generator=g) * 0.5
    got = _tensor(name, kl(logp.clone(), ref.clone()), "KL")
    expected = grpo.kl_k3(logp, ref)
    if got.shape != expected.shape:
        raise CheckFailed(f"{name}: the KL has shape {tuple(got.shape)}, expected one value per token {tuple(expected.shape)}")
    if torch.allclose(got, logp - ref, atol=1e-5):
        raise CheckFailed(f"{name}: that is the k1 estimator log(π/π_ref): unbiased but often negative for a single token; "
                          f"k3 = r - log r - 1 with r = π_ref/π is never negative")
    if torch.allclose(got, grpo.kl_k3(ref, logp), atol=1e-5):
        raise CheckFailed(f"{name}: the ratio is upside down: use x = ref_logp - logp (π_ref/π_θ), as in DeepSeekMath eq. 4")
    if (got < -1e-6).any():
        raise CheckFailed(f"{name}: some values are negative (min {got.min().item():.3g}); k3 is >= 0 for every token")
    same = _tensor(name, kl(logp.clone(), logp.clone()), "KL")
    if same.abs().max() > 1e-6:
        raise CheckFailed(f"{name}: for identical policies the KL must be exactly 0, got up to {same.abs().max().item():.3g}")
    _compare(name, got, expected, what="KL")
    _ok(name)


@checker
def check_clipped_surrogate(surrogate: Callable) -> None:
    """surrogate(ratio, advantage, eps) -> min(ratio * A, clip(ratio, 1-eps, 1+eps) * A), per token (to maximise)."""
    name = "check_clipped_surrogate"
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5] * 2)
    adv = torch.tensor([1.0] * 5 + [-1.0] * 5)
    eps = 0.2
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * adv
    expected = torch.minimum(ratio * adv, clipped)
    got = _tensor(name, surrogate(ratio.clone(), adv.clone(), eps), "surrogate")
    if got.shape != expected.shape:
        raise CheckFailed(f"{name}: the surrogate has shape {tuple(got.shape)}, expected {tuple(expected.shape)} (one per token)")
    if torch.allclose(got, torch.maximum(ratio * adv, clipped), atol=1e-6):
        raise CheckFailed(f"{name}: max instead of min: the objective must take the pessimistic (smaller) of the clipped "
                          f"and unclipped terms, so the policy gains nothing by moving ratio past 1±ε")
    if torch.allclose(got, clipped, atol=1e-6):
        raise CheckFailed(f"{name}: only the clipped term: for A > 0 with ratio 0.5 (and A < 0 with ratio 1.5) the "
                          f"unclipped term is smaller and must be used, so a bad move can still be undone")
    if torch.allclose(got, ratio * adv, atol=1e-6):
        raise CheckFailed(f"{name}: no clipping at all: ratio * A grows without limit; clip the ratio to [1-ε, 1+ε]")
    _compare(name, got, expected, what="surrogate")
    r = ratio.clone().requires_grad_()
    out = surrogate(r, adv.clone(), eps)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailed(f"{name}: the surrogate carries no gradient to the ratio: did you use .item(), .detach() or numpy?")
    grad, = torch.autograd.grad(out.sum(), r)
    should_flow = torch.tensor([True, True, True, True, False, False, True, True, True, True])
    if not torch.equal(grad != 0, should_flow):
        raise CheckFailed(f"{name}: the gradient flows at ratios {ratio[grad != 0].tolist()} (advantages "
                          f"{adv[grad != 0].tolist()}); it must stop only where ratio > 1+ε with A > 0 or ratio < 1-ε "
                          f"with A < 0")
    _ok(name)
