"""The expert back-ends' registry (moe_lab.model.expert_backends): names, availability with reasons,
dispatch, agreement, and the experts module the MoE layer holds."""
import pytest
import torch

from moe_lab.core.config import MoEConfig
from moe_lab.model import expert_backends as B
from moe_lab.model.experts import experts_grouped_mm, experts_reference
from moe_lab.model.moe import Experts, MoELayer


def case(T=19, d=8, f=16, E=5, k=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g, dtype=dtype)
    W = [torch.randn(*s, generator=g, dtype=dtype) * 0.3 for s in [(E, d, f), (E, d, f), (E, f, d)]]
    return x, idx, w, W


def test_the_registry_owns_the_names():
    assert B.names() == ("reference", "sorted", "grouped_mm", "padded", "triton")
    assert B.names(functions_only=False)[-1] == "ep"
    with pytest.raises(ValueError, match=r"backend='cuda': expected one of \('reference'"):
        B.get("cuda")
    with pytest.raises(ValueError, match="to_expert_parallel"):
        B.check_name("ep")
    with pytest.raises(ValueError, match="MoEConfig.backend='fast'"):
        MoEConfig(backend="fast")
    assert MoEConfig(backend="grouped_mm").backend == "grouped_mm"


def test_status_gives_the_reason_a_backend_cannot_run(monkeypatch):
    assert B.status("reference") is None and B.status("sorted") is None
    assert "process group" in B.status("ep")
    monkeypatch.delattr(torch, "_grouped_mm")
    assert B.status("grouped_mm").startswith("not available in this torch")
    assert set(B.available()) == set(B.names(functions_only=False))


def test_every_available_backend_agrees_with_the_reference():
    x, idx, w, W = case()
    idx[::4, 1] = -1  # dropped assignments
    runnable = [n for n in B.names() if B.status(n, "cpu", torch.float32) is None]
    assert {"reference", "sorted"} <= set(runnable)
    rows = B.agreement(runnable, x, idx, w, *W)
    assert [r["backend"] for r in rows] == runnable
    for r in rows:
        assert r["output"] < 1e-5 and r["gradient"] < 1e-4, r


def test_agreement_names_a_backend_that_computes_something_else(monkeypatch):
    x, idx, w, W = case()
    real = B.experts_fn
    monkeypatch.setattr(B, "experts_fn", lambda name: (lambda *a: 1.01 * real("reference")(*a)) if name == "sorted"
                        else real(name))
    (row,) = B.agreement(["sorted"], x, idx, w, *W)
    assert row["output"] == pytest.approx(0.01, rel=1e-3) and row["gradient"] > 1e-3


def test_grouped_mm_matches_the_reference_where_torch_has_it():
    reason = B.status("grouped_mm", "cpu", torch.float32)
    if reason is not None:
        pytest.skip(reason)
    x, idx, w, W = case()
    torch.testing.assert_close(experts_grouped_mm(x, idx, w, *W), experts_reference(x, idx, w, *W), rtol=1e-5, atol=1e-5)


def test_the_layer_is_router_experts_and_shared_experts():
    layer = MoELayer(8, MoEConfig(n_experts=4, top_k=2, d_expert=6, n_shared=1))
    assert isinstance(layer.experts, Experts) and layer.w1 is layer.experts.w1
    assert sorted(n for n, _ in layer.named_children()) == ["experts", "router", "shared"]
    layer.backend = "reference"
    assert layer.experts.backend == "reference"
    with pytest.raises(ValueError, match="backend='nope'"):
        layer.backend = "nope"


def test_a_checkpoint_from_before_the_experts_module_still_loads():
    layer = MoELayer(8, MoEConfig(n_experts=4, top_k=2, d_expert=6))
    old = {k.replace("experts.", ""): v.clone() for k, v in layer.state_dict().items()}  # keys ...w1, not ...experts.w1
    assert "w1" in old and "experts.w1" not in old
    fresh = MoELayer(8, MoEConfig(n_experts=4, top_k=2, d_expert=6))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.w1, layer.w1) and torch.equal(fresh.w2, layer.w2)


def test_layer_agreement_compares_every_parameter_and_restores_the_backend():
    torch.manual_seed(0)
    layer = MoELayer(8, MoEConfig(n_experts=4, top_k=2, d_expert=6, n_shared=1, balance="aux_loss")).double()
    layer.backend = "sorted"
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    (row,) = B.layer_agreement(layer, x, ["sorted"])
    assert row["output"] < 1e-12 and row["gradient"] < 1e-12 and row["worst_parameter"]
    assert layer.backend == "sorted" and all(p.grad is None or p.grad.abs().max() == 0 for p in layer.parameters())
    real = B.experts_fn
    B_fn = lambda name: (lambda *a: real("reference")(*a) * 1.1) if name == "sorted" else real(name)  # noqa: E731
    import unittest.mock as mock

    with mock.patch.object(B, "experts_fn", B_fn):
        (bad,) = B.layer_agreement(layer, x, ["sorted"])
    assert bad["output"] > 1e-6 and bad["gradient"] > 0.05  # the routed part is small next to the shared expert at init


def test_random_problem_is_seeded_and_can_leave_an_expert_empty():
    a = B.random_problem(30, 6, 8, 5, 2, seed=1, drop=0.3, empty_expert=True)
    b = B.random_problem(30, 6, 8, 5, 2, seed=1, drop=0.3, empty_expert=True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, idx, w, w1, w3, w2, probe = a
    assert x.shape == probe.shape == (30, 6) and w1.shape == (5, 6, 8) and w2.shape == (5, 8, 6)
    assert (idx != 4).all() and (idx == -1).any() and (w[idx < 0] == 0).all()
    assert all((row[row >= 0].unique().numel() == (row >= 0).sum()) for row in idx)  # distinct experts
    with pytest.raises(ValueError, match="k=5 experts per token from 4"):
        B.random_problem(3, 2, 2, 5, 5, seed=0, empty_expert=True)
