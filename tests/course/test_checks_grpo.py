"""Cases for the checkers of notebook 08 (moe_lab.course.checks.grpo), run by tests/course/test_checks.py's generic tests:
the right answer passes, each plausible wrong answer fails with a message naming the mistake, a stub is
"not implemented yet"."""
import torch

from moe_lab.course import checks


def adv_right(r, G):
    g = r.view(-1, G)
    c = g - g.mean(1, keepdim=True)
    s = g.std(1, unbiased=False, keepdim=True)
    return torch.where(s > 0, c / (s + 1e-6), torch.zeros_like(c)).flatten()


def adv_nan(r, G):
    g = r.view(-1, G)
    return ((g - g.mean(1, keepdim=True)) / g.std(1, unbiased=False, keepdim=True)).flatten()


def adv_sample_std(r, G):
    g = r.view(-1, G)
    c = g - g.mean(1, keepdim=True)
    s = g.std(1, keepdim=True)
    return torch.where(s > 0, c / s, torch.zeros_like(c)).flatten()


def surrogate_right(ratio, adv, eps):
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)


def surrogate_clamp_after(ratio, adv, eps):  # clamps the product instead of the ratio
    return torch.minimum(ratio * adv, (ratio * adv).clamp(1 - eps, 1 + eps))


CASES = {
    "check_group_advantages": (adv_right, [
        (adv_nan, "NaN or inf"),
        (lambda r, G: r - r.mean(), "whole batch"),
        (lambda r, G: (r.view(-1, G) - r.view(-1, G).mean(1, keepdim=True)).flatten(), "not divided by the group's std"),
        (adv_sample_std, "sample std"),
        (lambda r, G: adv_right(r, G)[:-1], "shape"),
        (lambda r, G: adv_right(r, G).tolist(), "torch.Tensor"),
    ]),
    "check_kl_k3": (lambda lp, ref: torch.exp(ref - lp) - (ref - lp) - 1, [
        (lambda lp, ref: lp - ref, "k1 estimator"),
        (lambda lp, ref: torch.exp(lp - ref) - (lp - ref) - 1, "upside down"),
        (lambda lp, ref: torch.exp(ref - lp) - (ref - lp), "exactly 0"),
        (lambda lp, ref: (torch.exp(ref - lp) - (ref - lp) - 1).sum(-1), "one value per token"),
    ]),
    "check_clipped_surrogate": (surrogate_right, [
        (lambda r, a, e: torch.maximum(r * a, r.clamp(1 - e, 1 + e) * a), "max instead of min"),
        (lambda r, a, e: r.clamp(1 - e, 1 + e) * a, "only the clipped term"),
        (lambda r, a, e: r * a, "no clipping"),
        (surrogate_clamp_after, "wrong at index"),
        (lambda r, a, e: surrogate_right(r, a, e).detach(), "no gradient"),
    ]),
}


def test_the_grpo_checkers_are_exported():
    assert {"check_group_advantages", "check_kl_k3", "check_clipped_surrogate"} <= set(checks.__all__)
