"""GRPO's inputs: masked positions never leak, bad rewards and mismatched lengths are errors naming the
culprit, and a group of equal rewards gets advantages of exactly 0 in every mode.

Run: .venv/bin/python -m pytest tests/training/test_reliability_grpo.py -q
"""
import math

import pytest
import torch

from moe_lab.data import ArithmeticTask
from moe_lab.training.grpo import ADVANTAGES, AGGREGATIONS, aggregate, group_advantages, grpo_loss, rewards

TASK = ArithmeticTask(op="add", n_digits=2)


# --- masked positions are selected out, never multiplied by 0 ------------------------------------------
@pytest.mark.parametrize("how", AGGREGATIONS)
@pytest.mark.parametrize("poison", [math.inf, -math.inf, math.nan])
def test_aggregate_ignores_inf_and_nan_outside_the_mask(how, poison):
    per_token = torch.tensor([[7.0, 1.0, 2.0, 9.0], [3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[0.0, 1, 1, 0], [0, 0, 1, 1]])
    clean = aggregate(per_token, mask, how, max_len=4)
    poisoned = per_token.clone()
    poisoned[mask == 0] = poison
    assert torch.equal(aggregate(poisoned, mask, how, max_len=4), clean)


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_a_k3_overflow_on_a_prompt_token_changes_neither_loss_nor_gradient(how):
    """exp(ref - logp) overflows float32 on a prompt position: the loss and its gradient stay those of the answer."""
    torch.manual_seed(0)
    mask = torch.tensor([[0.0, 0, 1, 1], [0, 1, 1, 0]])
    ref = torch.randn(2, 4) - 2
    old = torch.randn(2, 4) - 2
    adv = torch.tensor([1.0, -0.5])

    def run(ref_logp, old_logp):
        logp = (old + 0.1 * torch.randn(2, 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss, stats = grpo_loss(logp, old_logp, adv, mask, beta=0.04, ref_logp=ref_logp, aggregation=how, max_len=4)
        loss.backward()
        return loss, stats, logp.grad

    loss, stats, grad = run(ref, old)
    bad_ref, bad_old = ref.clone(), old.clone()
    bad_ref[0, 0] = 200.0  # k3 = e^(200 - logp) - ... = inf in float32
    bad_old[1, 3] = -1000.0  # ratio e^(logp + 1000) = inf
    loss2, stats2, grad2 = run(bad_ref, bad_old)
    assert torch.isfinite(loss2) and torch.equal(loss2, loss)
    assert torch.isfinite(grad2).all() and torch.equal(grad2, grad)
    assert torch.equal(grad2[mask == 0], torch.zeros(4))
    assert math.isfinite(stats2.kl) and stats2.kl == stats.kl and stats2.ratio_mean == stats.ratio_mean


# --- lengths and shapes must match -------------------------------------------------------------------
def test_rewards_refuse_texts_and_problems_of_different_lengths():
    problems = TASK.problems(3, "train", seed=0)
    with pytest.raises(ValueError, match=r"2 texts but 3 problems"):
        rewards(TASK, ["1\n", "2\n"], problems)


@pytest.mark.parametrize("name, kwargs", [
    ("advantages", dict(advantages=torch.ones(3))),
    ("mask", dict(mask=torch.ones(2, 5))),
    ("old_logp", dict(old_logp=torch.zeros(2, 5))),
    ("ref_logp", dict(ref_logp=torch.zeros(1, 4), beta=0.1)),
])
def test_grpo_loss_names_an_input_of_the_wrong_shape(name, kwargs):
    args = dict(logp=torch.zeros(2, 4), old_logp=torch.zeros(2, 4), advantages=torch.ones(2), mask=torch.ones(2, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        grpo_loss(**args)


def test_grpo_loss_refuses_a_non_finite_advantage_and_a_mask_that_is_not_0_or_1():
    args = dict(logp=torch.zeros(2, 4), old_logp=torch.zeros(2, 4), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"advantages of rows \[1\]"):
        grpo_loss(advantages=torch.tensor([1.0, math.nan]), **args)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp=torch.zeros(2, 4), old_logp=torch.zeros(2, 4), advantages=torch.ones(2), mask=torch.full((2, 4), 0.5))


# --- rewards and group sizes --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ADVANTAGES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_reward_is_an_error_naming_its_row(mode, bad):
    r = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, bad, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"row 5 \(group 1, completion 1\)"):
        group_advantages(r, 4, mode)


@pytest.mark.parametrize("group_size", [0, -2, 1.5, True, "4"])
def test_a_bad_group_size_is_named(group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(8), group_size)


def test_an_empty_reward_tensor_is_refused():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(0), 4)


# --- a group of equal rewards carries no signal: exactly 0 -------------------------------------------
@pytest.mark.parametrize("mode", ADVANTAGES)
@pytest.mark.parametrize("value", [0.0, 0.1, 1.0, 1.1])
@pytest.mark.parametrize("G", range(2, 17))
def test_equal_rewards_give_exactly_zero_advantages(mode, value, G):
    a = group_advantages(torch.full((G,), value), G, mode)
    assert a.dtype == torch.float32 and torch.equal(a, torch.zeros(G)), a


@pytest.mark.parametrize("mode", ["group", "group_mean"])
def test_an_equal_group_stays_exactly_zero_next_to_a_live_group(mode):
    r = torch.tensor([0.1] * 8 + [0.0, 1.1, 0.1, 1.1, 0.0, 0.0, 1.1, 0.1])
    a = group_advantages(r, 8, mode)
    assert torch.equal(a[:8], torch.zeros(8))
    assert a[8:].abs().min() > 0 and abs(float(a[8:].sum())) < 1e-5
