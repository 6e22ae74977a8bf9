"""GRPO's functions check their own knobs as GRPOConfig does (clip_eps, beta), group_advantages checks eps
and keeps the signs of huge rewards (its std no longer overflows).

Run: .venv/bin/python -m pytest tests/training/test_reliability_grpo_arguments.py -q
"""
import math

import pytest
import torch

from moe_lab.core.config import ConfigError
from moe_lab.training.grpo import ADVANTAGES, group_advantages, grpo_loss

B, L = 2, 3
INPUTS = dict(logp=torch.zeros(B, L), old_logp=torch.zeros(B, L), advantages=torch.tensor([1.0, -1.0]),
              mask=torch.ones(B, L))


@pytest.mark.parametrize("kwargs, words", [
    (dict(clip_eps=math.nan), "grpo_loss(clip_eps=nan): expected a finite number in (0, 1)"),  # a NaN loss
    (dict(clip_eps=-0.5), "grpo_loss(clip_eps=-0.5)"),  # accepted
    (dict(clip_eps=0.0), "grpo_loss(clip_eps=0.0)"),
    (dict(clip_eps="0.2"), "grpo_loss(clip_eps='0.2')"),
    (dict(beta=math.nan), "grpo_loss(beta=nan): expected a finite number >= 0"),  # dropped the KL silently
    (dict(beta=-1.0), "grpo_loss(beta=-1.0)"),
    (dict(beta=math.inf), "grpo_loss(beta=inf)"),
])
def test_grpo_loss_names_a_bad_knob(kwargs, words):
    with pytest.raises(ConfigError) as info:
        grpo_loss(**INPUTS, ref_logp=torch.zeros(B, L), **kwargs)
    assert words in str(info.value)


def test_grpo_loss_good_knobs_still_work():
    loss, stats = grpo_loss(**INPUTS, clip_eps=0.2, beta=0.04, ref_logp=torch.zeros(B, L))
    assert math.isfinite(float(loss)) and stats.kl == 0.0


@pytest.mark.parametrize("eps", [-0.5, math.nan, math.inf, "1e-6", None])
def test_group_advantages_names_a_bad_eps(eps):
    with pytest.raises(ValueError, match=r"group_advantages\(eps=.*\): expected a finite number >= 0"):
        group_advantages(torch.tensor([0.0, 1.0]), 2, eps=eps)


@pytest.mark.parametrize("mode", ADVANTAGES)
def test_huge_rewards_keep_their_signs(mode):
    """[1e308, -1e308] gave [0, -0]: the std overflowed to inf."""
    a = group_advantages(torch.tensor([1e308, -1e308], dtype=torch.float64), 2, mode)
    assert a[0] > 0 and a[1] < 0
    if mode == "group":
        assert a.tolist() == pytest.approx([1.0, -1.0])


def test_huge_rewards_in_a_larger_group_give_the_advantages_of_the_scaled_rewards():
    r = torch.tensor([1e308, 1e308, -1e308, 0.0], dtype=torch.float64)
    small = group_advantages(r / 1e308, 4)
    assert torch.allclose(group_advantages(r, 4), small, atol=1e-6)
    b = group_advantages(r, 4, "batch_mean")  # the raw differences (0.75e308 ...): past float32, but signed
    assert (b[:2] > 0).all() and (b[2:] < 0).all()


def test_ordinary_rewards_unchanged_by_the_scaling():
    r = torch.tensor([0.0, 1.0, 0.1, 0.1, 2.0, 0.5, 0.25, 1.0])
    for mode in ADVANTAGES:
        r64 = r.double()
        if mode == "batch_mean":
            want = r64 - r64.mean()
        else:
            g = r64.view(-1, 2)
            want = g - g.mean(1, keepdim=True)
            if mode == "group":
                want = want / (g.std(1, unbiased=False, keepdim=True) + 1e-6)
            want = torch.where((g == g[:, :1]).all(1, keepdim=True), torch.zeros_like(want), want).flatten()
        assert torch.allclose(group_advantages(r, 2, mode), want.float(), atol=1e-6), mode
