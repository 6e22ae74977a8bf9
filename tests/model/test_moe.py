"""The MoE layer: expert back-ends agree, routers follow their papers, balancing and capacity work.

Run: .venv/bin/python -m pytest tests/model/test_moe.py -q
"""
import math

import pytest
import torch

from moe_lab.core.config import MoEConfig
from moe_lab.model import expert_backends as B
from moe_lab.model import experts as X
from moe_lab.model.experts import experts_padded, experts_reference, experts_sorted, padded_layout, sort_by_expert
from moe_lab.model.moe import MoELayer
from moe_lab.model.router import Router, apply_capacity, expert_capacity, router_z_loss, switch_aux_loss


def random_case(seed, T, d, f, E, k, dtype=torch.float64, drop=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    if drop:
        idx = idx.masked_fill(torch.rand(idx.shape, generator=g) < drop, -1)
    w = torch.rand(T, k, generator=g, dtype=dtype, requires_grad=True)
    W = [torch.randn(*s, generator=g, dtype=dtype, requires_grad=True) * 0.3 for s in [(E, d, f), (E, d, f), (E, f, d)]]
    W = [p.detach().requires_grad_() for p in W]
    return x, idx, w, W


def naive_moe(x, idx, w, w1, w3, w2):
    """Token by token, the formula itself."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e >= 0:
                h = torch.nn.functional.silu(x[t] @ w1[e]) * (x[t] @ w3[e])
                y[t] = y[t] + w[t, j] * (h @ w2[e])
    return y


def padded_both_ways(monkeypatch, x, idx, w, W):
    """`padded` agrees with the reference on its own path (padding however much) and on its fallback."""
    for max_rows in (math.inf, 0.0):
        monkeypatch.setattr(X, "PADDED_MAX_ROWS", max_rows)
        (row,) = B.agreement(["padded"], x, idx, w, *W)
        assert row["output"] < 1e-12 and row["gradient"] < 1e-10, (max_rows, row)


def test_padded_runs_sorted_where_padding_would_cost_more_than_it_saves(monkeypatch):
    x, idx, w, W = random_case(5, 40, 6, 7, 4, 1)
    idx[:30] = 0  # expert 0 takes 30 of 40 rows: padding would make 4 x 30 = 120 rows
    calls = []
    monkeypatch.setattr(X, "experts_sorted", lambda *a: calls.append(1) or experts_sorted(*a))
    X.experts_padded(x, idx, w, *W)
    assert calls == [1]
    idx = torch.arange(40)[:, None] % 4  # 10 rows each: no padding
    X.experts_padded(x, idx, w, *W)
    assert calls == [1]


@pytest.mark.parametrize("seed", range(12))
def test_backends_agree_on_random_shapes(seed, monkeypatch):
    g = torch.Generator().manual_seed(100 + seed)
    E = int(torch.randint(1, 9, (1,), generator=g))
    k = int(torch.randint(1, min(E, 4) + 1, (1,), generator=g))
    T = int(torch.randint(1, 60, (1,), generator=g))
    d, f = (int(v) for v in torch.randint(1, 24, (2,), generator=g))
    x, idx, w, W = random_case(seed, T, d, f, E, k, drop=0.2 if seed % 3 == 0 else 0.0)
    torch.testing.assert_close(experts_reference(x, idx, w, *W), naive_moe(x, idx, w, *W))
    for row in B.agreement(["sorted", "padded"], x, idx, w, *W):  # outputs and every gradient against the reference
        assert row["output"] < 1e-12 and row["gradient"] < 1e-10, row
    padded_both_ways(monkeypatch, x, idx, w, W)


@pytest.mark.parametrize("case", ["one_expert_takes_all", "idle_expert", "top_k_equals_E", "single_token", "all_dropped"])
def test_backends_agree_on_edge_cases(case, monkeypatch):
    T, d, f, E, k = 17, 8, 12, 4, 2
    if case == "top_k_equals_E":
        k = E
    if case == "single_token":
        T = 1
    x, idx, w, W = random_case(7, T, d, f, E, k)
    if case == "one_expert_takes_all":
        idx = torch.zeros(T, 1, dtype=torch.long)
        w = w[:, :1].detach().requires_grad_()
    if case == "idle_expert":
        idx = idx.masked_fill(idx == 2, 3).clone()
        idx[:, 1] = torch.where(idx[:, 0] == idx[:, 1], (idx[:, 0] + 1) % 2, idx[:, 1])
    if case == "all_dropped":
        idx = torch.full_like(idx, -1)
    ref = experts_reference(x, idx, w, *W)
    torch.testing.assert_close(ref, naive_moe(x, idx, w, *W))
    for row in B.agreement(["sorted", "padded"], x, idx, w, *W):
        assert row["output"] < 1e-12 and row["gradient"] < 1e-10, row
    padded_both_ways(monkeypatch, x, idx, w, W)
    if case == "all_dropped":
        assert ref.abs().max() == 0


def test_gradients_agree_with_finite_differences():
    x, idx, w, W = random_case(3, 6, 4, 5, 3, 2)
    assert torch.autograd.gradcheck(lambda *a: experts_sorted(a[0], idx, a[1], *a[2:]), (x, w, *W))
    idx[1, 1] = -1  # a dropped assignment, and padding rows (the experts' loads differ)
    X.PADDED_MAX_ROWS, before = math.inf, X.PADDED_MAX_ROWS  # its own path, however much it pads
    try:
        assert torch.autograd.gradcheck(lambda *a: experts_padded(a[0], idx, a[1], *a[2:]), (x, w, *W))
    finally:
        X.PADDED_MAX_ROWS = before


def test_padded_layout_gives_each_expert_a_block_of_the_busiest_experts_rows():
    idx = torch.tensor([[2, 0], [0, -1], [1, 2], [2, 0]])
    slot, token_of, C = padded_layout(idx, 4)
    assert C == 3  # experts 0 and 2 have 3 assignments each
    assert slot.tolist() == [6, 0, 1, 12, 3, 7, 8, 2]  # expert e's rows are [3e, 3e + 3); dropped -> 4 * 3
    assert token_of.tolist() == [0, 1, 3, 2, 0, 0, 0, 2, 3, 0, 0, 0]  # padding rows hold token 0


def test_sort_by_expert_layout():
    idx = torch.tensor([[2, 0], [0, -1], [1, 2]])
    order, token_of, counts = sort_by_expert(idx, 4)
    assert counts.tolist() == [2, 1, 2, 0]
    assert idx.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2]
    assert token_of.tolist() == (order // 2).tolist()


def test_bad_expert_inputs_are_named():
    x, idx, w, W = random_case(0, 5, 4, 6, 3, 2)
    with pytest.raises(ValueError, match="expert_idx must lie in"):
        experts_sorted(x, idx + 5, w, *W)
    with pytest.raises(ValueError, match="w2 must be"):
        experts_reference(x, idx, w, W[0], W[1], W[2].transpose(1, 2))


# --- routers -----------------------------------------------------------------------------------
def make_router(**kw):
    torch.manual_seed(0)
    return Router(16, MoEConfig(n_experts=6, top_k=2, d_expert=8, **kw))


def test_softmax_router_renormalises_top_k_of_softmax():
    r = make_router(router="softmax", balance="none")
    x = torch.randn(10, 16)
    out = r(x)
    p = (x @ r.gate.weight.t()).softmax(-1)
    top = p.topk(2, -1)
    assert torch.equal(out.expert_idx, top.indices)
    torch.testing.assert_close(out.weights, top.values / top.values.sum(-1, keepdim=True))


def test_sigmoid_router_uses_bias_for_selection_only_and_scales():
    r = make_router(router="sigmoid", balance="aux_free", routed_scaling=2.5)
    r.expert_bias[:] = torch.tensor([10.0, 10.0, 0, 0, 0, 0])  # bias forces experts 0 and 1
    x = torch.randn(10, 16)
    out = r(x)
    assert sorted(out.expert_idx[0].tolist()) == [0, 1]
    s = (x @ r.gate.weight.t()).sigmoid()
    chosen = s.gather(-1, out.expert_idx)
    torch.testing.assert_close(out.weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))  # bias not in weights


def test_aux_free_bias_moves_against_load():
    r = make_router(router="sigmoid", balance="aux_free", bias_update_rate=0.1)
    r.train()
    r.load_since_update[:] = torch.tensor([10.0, 0, 2, 2, 2, 2])
    r.update_bias()
    assert r.expert_bias[0] == pytest.approx(-0.1) and r.expert_bias[1] == pytest.approx(0.1)
    assert r.load_since_update.sum() == 0


def test_aux_free_balancing_reduces_imbalance():
    """A router whose gate strongly prefers one expert gets balanced by the bias rule alone."""
    torch.manual_seed(0)
    r = make_router(router="sigmoid", balance="aux_free", bias_update_rate=0.02).train()
    with torch.no_grad():
        r.gate.weight[0] += 0.5  # expert 0 is everyone's favourite
    x = torch.randn(512, 16) + 1.0  # positive inputs: expert 0's logit is large for everyone
    load0 = torch.bincount(r(x).expert_idx.flatten(), minlength=6).float()
    r.load_since_update.zero_()
    for _ in range(200):
        r(x)
        r.update_bias()
    load1 = torch.bincount(r(x).expert_idx.flatten(), minlength=6).float()
    assert load1.max() / load1.mean() < 0.6 * (load0.max() / load0.mean())


def test_switch_aux_loss_formula():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0], [1], [2], [3]])
    assert float(switch_aux_loss(probs, idx, 4)) == pytest.approx(1.0)  # perfect balance
    probs = torch.tensor([[1.0, 0, 0, 0]] * 4)
    idx = torch.zeros(4, 1, dtype=torch.long)
    assert float(switch_aux_loss(probs, idx, 4)) == pytest.approx(4.0)  # collapse: E


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + torch.logsumexp(torch.tensor([1.0, 2.0]), 0).item() ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(expected)


def test_capacity_drops_later_tokens_and_second_choices_first():
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    w = torch.ones(4, 2)
    assert expert_capacity(4, 2, 3, 1.0) == 3
    new_idx, new_w = apply_capacity(idx, w, 3, capacity=2)
    # first choices are served first: expert 0 takes tokens 0, 1 (token 2 dropped); expert 1 takes
    # token 3's first choice, then token 0's second; token 1's second choice finds expert 1 full
    assert new_idx.tolist() == [[0, 1], [0, -1], [-1, 2], [1, -1]]
    assert new_w.tolist() == [[1, 1], [1, 0], [0, 1], [1, 0]]


def test_moe_layer_capacity_counts_drops_and_dropless_drops_nothing():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16)
    for cf, expect_drops in [(0.5, True), (None, False)]:
        layer = MoELayer(16, MoEConfig(n_experts=4, top_k=2, d_expert=8, capacity_factor=cf))
        layer(x)
        stats = layer.last_stats
        assert (stats.dropped > 0) == expect_drops
        assert int(stats.load.sum()) + stats.dropped == 64 * 2
        if cf is not None:
            assert int(stats.load.max()) <= expert_capacity(64, 2, 4, cf)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n_shared", [0, 2])
def test_moe_layer_backends_agree_including_gradients(router, n_shared):
    torch.manual_seed(1)
    layer = MoELayer(16, MoEConfig(n_experts=5, top_k=2, d_expert=8, n_shared=n_shared, router=router,
                                   balance="aux_loss", z_loss_coef=1e-3)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    results = {}
    for backend in ("reference", "sorted", "padded"):
        layer.zero_grad()
        layer.backend = backend
        y = layer(x)
        (y.square().sum() + layer.aux_loss).backward()
        results[backend] = (y.detach(), [p.grad.clone() for p in layer.parameters()])
    for other in ("sorted", "padded"):
        torch.testing.assert_close(results["reference"][0], results[other][0])
        for a, b in zip(results["reference"][1], results[other][1]):
            torch.testing.assert_close(a, b)
    assert layer.router.gate.weight.grad.abs().sum() > 0  # the router learns


def test_moe_layer_stats_entropy_bounds():
    layer = MoELayer(16, MoEConfig(n_experts=8, top_k=2, d_expert=8))
    layer(torch.randn(50, 16))
    s = layer.last_stats
    assert 0 <= s.entropy <= math.log(8) + 1e-6
    assert s.imbalance >= 1.0


def test_router_losses_are_zero_not_nan_for_an_empty_batch():
    r = make_router(router="softmax", balance="aux_loss", z_loss_coef=1e-3)
    out = r(torch.zeros(0, 16))
    assert out.expert_idx.shape == (0, 2) and out.aux_loss.item() == 0.0
