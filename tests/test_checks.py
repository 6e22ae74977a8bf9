"""Every checker of moe_lab.checks passes the right answer and fails plausible wrong ones, with a
message that says what is wrong.

Run: .venv/bin/python -m pytest tests/test_checks.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from moe_lab import checks
from moe_lab.model import layers, router
from moe_lab.model.experts import experts_reference, experts_sorted


def rms_right(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_right(x, cos, sin):
    return layers.apply_rope(x, cos, sin)


def route_right(logits, k):
    w, i = logits.softmax(-1).topk(k, -1)
    return i, w / w.sum(-1, keepdim=True)


CASES = {
    "check_rmsnorm": (rms_right, [
        (lambda x, w, eps: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w, "LayerNorm"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w, "wrong at index"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), "wrong at index"),
    ]),
    "check_rope": (rope_right, [
        (lambda x, cos, sin: torch.stack((x[..., 0::2] * cos + x[..., 1::2] * sin, x[..., 0::2] * sin + x[..., 1::2] * cos), -1).flatten(-2), "length"),
        (lambda x, cos, sin: x, "wrong at index"),
    ]),
    "check_swiglu": (lambda x, w1, w3, w2: (F.silu(x @ w1) * (x @ w3)) @ w2, [
        (lambda x, w1, w3, w2: (F.silu(x @ w3) * (x @ w1)) @ w2, "swapped"),
        (lambda x, w1, w3, w2: (F.relu(x @ w1) * (x @ w3)) @ w2, "ReGLU"),
        (lambda x, w1, w3, w2: ((F.silu(x @ w1) * (x @ w3)) @ w2).detach(), "no gradient"),
        (lambda x, w1, w3, w2: (F.silu(x @ w1) * (x @ w3)) @ w2 * 1.01, "wrong at index"),
    ]),
    "check_topk_router": (route_right, [
        (lambda l, k: (l.softmax(-1).topk(k, -1).indices[:, :1], l.softmax(-1).topk(k, -1).values[:, :1]), "expert_idx should be"),
        (lambda l, k: (l.softmax(-1).topk(k, -1).indices, l.softmax(-1).topk(k, -1).values), "renormalise"),
        (lambda l, k: ((-l).topk(k, -1).indices, torch.full((l.shape[0], k), 0.5)), "largest"),
    ]),
    "check_switch_aux_loss": (router.switch_aux_loss, [
        (lambda p, i, E: (torch.bincount(i.flatten(), minlength=E).float() / i.numel() * p.mean(0)).sum(), "factor E"),
        (lambda p, i, E: E * (p.mean(0) * p.mean(0)).sum(), "wrong"),
        (lambda p, i, E: torch.ones(E), "scalar"),
    ]),
    "check_capacity": (router.apply_capacity, [
        (lambda i, w, E, c: (i, w), "expected"),
        (lambda i, w, E, c: _token_major_capacity(i, w, E, c), "first choices"),
        (lambda i, w, E, c: (router.apply_capacity(i, w, E, c)[0], w), "weight 0"),
    ]),
    "check_expert_backend": (experts_sorted, [
        (lambda x, i, w, w1, w3, w2: experts_reference(x, i, torch.ones_like(w), w1, w3, w2), "wrong at index"),
        (lambda x, i, w, w1, w3, w2: experts_reference(x, i, w.detach(), w1, w3, w2), "no gradient reaches weights"),
        (lambda x, i, w, w1, w3, w2: experts_reference(x, i.clamp_min(0), w, w1, w3, w2), "wrong at index"),
    ]),
}


def _token_major_capacity(idx, w, E, cap):
    """A plausible mistake: serve tokens in order, all k choices of a token before the next token."""
    keep = torch.zeros_like(idx, dtype=torch.bool)
    used = [0] * E
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            if used[int(idx[t, j])] < cap:
                used[int(idx[t, j])] += 1
                keep[t, j] = True
    return idx.masked_fill(~keep, -1), w.masked_fill(~keep, 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker_passes_the_right_answer(name, capsys):
    getattr(checks, name)(CASES[name][0])
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("name, wrong, message",
                         [(n, w, m) for n, (_, wrongs) in sorted(CASES.items()) for w, m in wrongs])
def test_checker_fails_a_wrong_answer_and_says_why(name, wrong, message):
    with pytest.raises(checks.CheckFailed, match=message):
        getattr(checks, name)(wrong)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker_fails_a_stub(name):
    def stub(*args):
        raise NotImplementedError("your turn")

    with pytest.raises(checks.CheckFailed, match="not implemented yet"):
        getattr(checks, name)(stub)
