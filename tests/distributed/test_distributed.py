"""Expert parallelism over torch.distributed: the 'ep' back-end equals one process, the launcher
always ends, and the bytes counted are the bytes that travel.

Every check that needs a process group runs inside one launch per world size (2 and 4 gloo
processes on 127.0.0.1): starting processes costs more than the checks. Each rank returns its
outputs and gradients; the comparison with the single-process reference happens here, in pytest.

Run: .venv/bin/python -m pytest tests/distributed/test_distributed.py -q
"""
from pathlib import Path

import pytest
import torch

from moe_lab.core.config import MoEConfig
from moe_lab.distributed import RankFailedError, launch
from moe_lab.distributed.workers import fail_on_rank, moe_layer_check, moe_layer_runs, run_cases, sleep_on_rank
from moe_lab.model.experts import experts_reference
from moe_lab.model.moe import MoELayer

ROOT = Path(__file__).resolve().parents[2]
DTYPE = torch.float64  # exact enough that any routing mistake shows as a large difference
ATOL = 1e-12
D, F, K = 8, 6, 2  # d_model, d_expert, top_k of the raw back-end cases


# --- building cases (in the parent; every rank receives the whole case and keeps its part) -------
def experts_case(seed, tokens, E, drop=0.0, allowed=None, local_backend="sorted", idx=None):
    """tokens[r] tokens on rank r, random routing over experts [0, allowed) with a share `drop` dropped."""
    g = torch.Generator().manual_seed(seed)
    allowed = E if allowed is None else allowed
    if idx is None:
        idx = []
        for T in tokens:
            i = torch.stack([torch.randperm(allowed, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
            i = i.long().masked_fill(torch.rand(T, K, generator=g) < drop, -1)  # (T, K)
            idx.append(i)
    return {
        "kind": "experts", "local_backend": local_backend, "expert_idx": idx,
        "x": [torch.randn(T, D, generator=g, dtype=DTYPE) for T in tokens],
        "weights": [torch.rand(T, K, generator=g, dtype=DTYPE) for T in tokens],
        "grad_y": [torch.randn(T, D, generator=g, dtype=DTYPE) for T in tokens],
        "w1": torch.randn(E, D, F, generator=g, dtype=DTYPE) * 0.3,
        "w3": torch.randn(E, D, F, generator=g, dtype=DTYPE) * 0.3,
        "w2": torch.randn(E, F, D, generator=g, dtype=DTYPE) * 0.3,
    }


# Hand-counted routing for 2 ranks, 4 experts (rank 0 owns 0-1, rank 1 owns 2-3), d = 8 in float64:
# a row is 64 bytes. Rank 0 sends 3 rows (experts 2, 3, 2) to rank 1 and keeps 2; rank 1 sends 2
# rows (experts 1, 0) to rank 0 and keeps 1; the counts message is E_local = 2 int64 = 16 bytes.
HAND_IDX = [torch.tensor([[0, 2], [3, -1], [2, 1]]), torch.tensor([[1, -1], [3, 0]])]
HAND_BYTES = [  # (sent, received) per phase, rank 0 then rank 1
    {"counts": (16, 16), "dispatch": (192, 128), "combine": (128, 192),
     "combine.backward": (192, 128), "dispatch.backward": (128, 192)},
    {"counts": (16, 16), "dispatch": (128, 192), "combine": (192, 128),
     "combine.backward": (128, 192), "dispatch.backward": (192, 128)},
]


def make_experts_cases(W):
    E, E_local = 2 * W, 2
    varied = [5, 3, 7, 2][:W]
    cases = {
        "dropless": experts_case(1, varied, E),
        "dropped": experts_case(2, varied, E, drop=0.4),
        "all_dropped": experts_case(3, varied, E, drop=1.0),
        "rank_without_tokens": experts_case(4, [6, 0, 4, 5][:W], E),
        "rank_whose_experts_get_no_tokens": experts_case(5, varied, E, allowed=E - E_local),
        "every_token_on_one_expert": experts_case(
            6, varied, E, idx=[torch.tensor([[E - 1, -1]] * T).reshape(T, K) for T in varied]),
        "local_backend_reference": experts_case(7, varied, E, drop=0.2, local_backend="reference"),
    }
    if W == 2:
        cases["hand_counted"] = experts_case(8, [3, 2], E, idx=HAND_IDX)
    return cases


def make_moe_cases(W):
    """Whole MoE layers (router + shared + routed experts), float64, one state for every rank."""
    specs = {
        "moe_dropless": (MoEConfig(n_experts=2 * W, top_k=2, d_expert=F, n_shared=1), [5, 4, 6, 3][:W]),
        "moe_capacity": (MoEConfig(n_experts=2 * W, top_k=2, d_expert=F, capacity_factor=0.5), [8, 6, 7, 5][:W]),
        "moe_sigmoid_aux_free": (MoEConfig(n_experts=4 * W, top_k=3, d_expert=F, router="sigmoid", n_shared=2,
                                           balance="aux_free", routed_scaling=2.5), [6, 6, 6, 6][:W]),
        "moe_rank_without_tokens": (MoEConfig(n_experts=W, top_k=1, d_expert=F, balance="none"), [5, 0, 4, 3][:W]),
    }
    cases = {}
    for i, (name, (cfg, tokens)) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        layer = MoELayer(D, cfg, init_std=0.3).to(DTYPE)
        g = torch.Generator().manual_seed(200 + i)
        cases[name] = {
            "kind": "moe", "cfg": cfg, "d_model": D, "dtype": DTYPE, "state": layer.state_dict(),
            "x": [torch.randn(T, D, generator=g, dtype=DTYPE) for T in tokens],
            "grad_y": [torch.randn(T, D, generator=g, dtype=DTYPE) for T in tokens],
        }
    return cases


EXPERT_CASES = list(make_experts_cases(4))  # names; hand_counted only exists for 2 ranks
MOE_CASES = list(make_moe_cases(4))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ep_run(request):
    """One launch per world size runs every case; returns (W, {name: (case, [result per rank])})."""
    W = request.param
    cases = {**make_experts_cases(W), **make_moe_cases(W), "errors": {"kind": "errors"}}
    per_rank = launch(run_cases, W, list(cases.values()), timeout=120)
    assert len(per_rank) == W
    return W, {name: (case, [per_rank[r][i] for r in range(W)]) for i, (name, case) in enumerate(cases.items())}


def close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=0)


# --- the raw back-end ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPERT_CASES)
def test_experts_ep_outputs_and_gradients_match_reference(ep_run, name):
    W, runs = ep_run
    if name not in runs:
        pytest.skip(f"{name} is defined for 2 ranks only")
    case, results = runs[name]
    # one process, every rank's tokens and the full expert weights
    x, weights = torch.cat(case["x"]).requires_grad_(), torch.cat(case["weights"]).requires_grad_()
    w1, w3, w2 = (case[n].clone().requires_grad_() for n in ("w1", "w3", "w2"))
    y = experts_reference(x, torch.cat(case["expert_idx"]), weights, w1, w3, w2)
    loss = (y * torch.cat(case["grad_y"])).sum()
    if loss.requires_grad:  # with every assignment dropped nothing depends on the inputs
        loss.backward()
    for t in (x, weights, w1, w3, w2):
        t.grad = torch.zeros_like(t) if t.grad is None else t.grad

    assert close(torch.cat([r["y"] for r in results]), y.detach())
    assert close(torch.cat([r["grad_x"] for r in results]), x.grad)
    assert close(torch.cat([r["grad_weights"] for r in results]), weights.grad)
    for n, full in (("w1", w1), ("w3", w3), ("w2", w2)):  # each rank holds the gradient of its shard
        assert close(torch.cat([r[f"grad_{n}"] for r in results]), full.grad), n


def test_every_case_routes_something_nontrivial(ep_run):
    """Guard the cases themselves: the edge cases really are edge cases."""
    W, runs = ep_run
    _, results = runs["rank_without_tokens"]
    assert results[1]["y"].shape == (0, D)
    case, _ = runs["rank_whose_experts_get_no_tokens"]
    assert all(int(i.max()) < 2 * (W - 1) for i in case["expert_idx"])  # never the last rank's experts
    case, _ = runs["dropped"]
    assert 0 < sum(int((i < 0).sum()) for i in case["expert_idx"]) < sum(i.numel() for i in case["expert_idx"])


@pytest.mark.parametrize("name", ["dropless", "dropped", "all_dropped", "rank_without_tokens"])
def test_dispatch_bytes_are_the_routed_rows_sent_to_other_ranks(ep_run, name):
    """Dropped (-1) assignments never travel; a rank's own experts' rows never leave it."""
    W, runs = ep_run
    case, results = runs[name]
    row = D * DTYPE.itemsize
    for rank, (idx, r) in enumerate(zip(case["expert_idx"], results)):
        dest = idx[idx >= 0] // 2  # owning rank of each routed assignment (2 experts per rank)
        assert r["comm"]["sent"]["dispatch"] == int((dest != rank).sum()) * row
        assert r["comm"]["sent"]["counts"] == (W - 1) * 2 * 8  # E_local int64 counts to each other rank
    if name == "all_dropped":
        assert all(r["comm"]["sent"]["dispatch"] == 0 for r in results)
        assert all(not r["y"].any() for r in results)


def test_bytes_moved_match_a_hand_count(ep_run):
    W, runs = ep_run
    if W != 2:
        pytest.skip("the hand count is for 2 ranks")
    _, results = runs["hand_counted"]
    for rank, expected in enumerate(HAND_BYTES):
        comm = results[rank]["comm"]
        got = {phase: (comm["sent"][phase], comm["received"][phase]) for phase in comm["sent"]}
        assert got == expected, f"rank {rank}"
        assert all(n == 1 for n in comm["calls"].values())


def test_errors_name_the_argument(ep_run):
    W, runs = ep_run
    _, results = runs["errors"]
    for messages in results:
        for arg in ("n_experts", "expert_idx", "w1_local", "local_backend"):
            assert messages[arg] is not None and arg in messages[arg], (arg, messages[arg])
    assert f"world_size={W}" in results[0]["n_experts"]


# --- a whole MoE layer made expert-parallel --------------------------------------------------------
@pytest.mark.parametrize("name", MOE_CASES)
def test_expert_parallel_moe_layer_matches_single_process(ep_run, name):
    W, runs = ep_run
    case, results = runs[name]
    layer = MoELayer(D, case["cfg"]).to(DTYPE)
    layer.load_state_dict(case["state"])
    layer.backend = "reference"
    ys, gxs = [], []
    for rank, (x, g) in enumerate(zip(case["x"], case["grad_y"])):  # each rank's tokens, routed (and capped) alone
        x = x.clone().requires_grad_()
        y = layer(x)
        assert torch.equal(results[rank]["expert_idx"], layer.last_routing.expert_idx), f"routing of rank {rank}"
        loss = (y * g).sum() + layer.aux_loss
        if loss.requires_grad:  # a rank without tokens contributes no gradient
            loss.backward()
        ys.append(y.detach())
        gxs.append(torch.zeros_like(x) if x.grad is None else x.grad)
    assert close(torch.cat([r["y"] for r in results]), torch.cat(ys))
    assert close(torch.cat([r["grad_x"] for r in results]), torch.cat(gxs))
    for n in ("w1", "w3", "w2"):  # routed experts: sharded
        assert close(torch.cat([r[f"grad_{n}"] for r in results]), getattr(layer, n).grad), n
    params = dict(layer.named_parameters())
    for r in results:  # router and shared experts: replicated, gradients summed over ranks
        assert set(r["replicated"]) == {n for n in params if not n.startswith("experts.")}
        for n, grad in r["replicated"].items():
            assert close(grad, params[n].grad), n
        assert torch.equal(r["gathered_w1"], layer.w1.detach())
    layer.router.update_bias()  # from the load of every rank's tokens
    for r in results:
        assert torch.equal(r["expert_bias"], layer.router.expert_bias)
    if case["cfg"].capacity_factor is not None:
        assert sum(r["dropped"] for r in results) > 0, "the capacity case must drop assignments"
    if case["cfg"].balance == "aux_free":
        assert layer.router.expert_bias.abs().sum() > 0, "the bias update must have moved"


def test_moe_layer_runs_gives_the_notebook_each_case_in_order():
    """notebook 09's worker: several layers in one launch, results per case, routing included."""
    cases = [make_moe_cases(2)[name] for name in ("moe_capacity", "moe_dropless")]
    per_rank = launch(moe_layer_runs, 2, cases, timeout=120)
    for case, (r0, r1) in zip(cases, zip(*per_rank)):
        layer = MoELayer(D, case["cfg"]).to(DTYPE)
        layer.load_state_dict(case["state"])
        layer.backend = "reference"
        with torch.no_grad():
            ys = [layer(x) for x in case["x"]]
        assert close(torch.cat([r0["y"], r1["y"]]), torch.cat(ys))
        assert r0["expert_idx"].shape == (case["x"][0].shape[0], case["cfg"].top_k)
        assert r0["comm"]["calls"]["dispatch"] == 1
    assert sum(r["dropped"] for r in (per_rank[0][0], per_rank[1][0])) > 0  # the capacity case came first


# --- the launcher ----------------------------------------------------------------------------------
def test_launch_names_the_rank_that_raised_and_stops_the_others():
    """Rank 1 raises while rank 0 waits in a barrier for it: an error, never a hang."""
    with pytest.raises(RankFailedError) as info:
        launch(fail_on_rank, 2, 1, timeout=60)  # the timeout only guards against a broken launcher
    err = info.value
    assert err.rank == 1 and err.exc_type == "ValueError"
    assert "rank 1 of 2" in str(err) and "fails on purpose" in str(err) and "fail_on_rank" in str(err)


def test_launch_times_out_naming_the_rank_still_running():
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\]"):
        launch(sleep_on_rank, 2, 1, 600.0, timeout=3)


def test_launch_returns_results_in_rank_order():
    assert launch(sleep_on_rank, 3, -1, 0.0, timeout=60) == [0, 1, 2]


@pytest.mark.parametrize("bad", [
    dict(world_size=0, match="world_size=0"),
    dict(timeout=0, match="timeout=0"),
    dict(backend="mpi", match="backend='mpi'"),
    dict(fn=lambda rank, world_size: rank, match="lambda"),
])
def test_launch_rejects_bad_arguments_before_starting_anything(bad):
    kwargs = dict(fn=sleep_on_rank, world_size=2, timeout=10, backend="gloo")
    kwargs.update({k: v for k, v in bad.items() if k != "match"})
    match = bad["match"]
    with pytest.raises(ValueError, match=match):
        launch(kwargs["fn"], kwargs["world_size"], -1, 0.0, timeout=kwargs["timeout"], backend=kwargs["backend"])


def test_single_rank_moves_nothing():
    (result,) = launch(moe_layer_check, 1, 8, timeout=60)
    assert result["max_err_y"] < 1e-12 and result["max_err_grad_experts"] < 1e-12
    assert sum(result["comm"]["sent"].values()) == 0 and sum(result["comm"]["received"].values()) == 0


# --- the shell entry point ---------------------------------------------------------------------------
def test_torchrun_entry_point_checks_and_reports_bytes(monkeypatch):
    from moe_lab.distributed.launch import run_torchrun

    monkeypatch.chdir(ROOT)
    out = run_torchrun(2, "--tokens", "8", "--capacity-factor", "1.0", timeout=300)  # in a private TMPDIR
    assert out.returncode == 0, out.stdout + out.stderr
    assert "match (tolerance" in out.stdout and "bytes moved per rank" in out.stdout
    assert out.stdout.count("\n  0 ") == 1 and out.stdout.count("\n  1 ") == 1  # one line per rank


def test_simulated_all_to_all_and_byte_count_match_the_real_exchange_definitions():
    from moe_lab.distributed.simulate import all_to_all_sim, bytes_by_hand

    chunks = [[(s, d) for d in range(3)] for s in range(3)]
    assert all_to_all_sim(chunks) == [[(s, d) for s in range(3)] for d in range(3)]
    assert all_to_all_sim(all_to_all_sim(chunks)) == chunks
    idxs = [torch.tensor([[0, 3], [1, -1]]), torch.tensor([[2, 3], [0, 1]])]  # 4 experts on 2 ranks
    per_rank, rows = bytes_by_hand(idxs, 4, row_bytes=10)
    assert rows.tolist() == [[2, 1], [2, 2]]  # rank 0 sends expert 3's copy to rank 1; rank 1 sends 0 and 1 home to rank 0
    assert per_rank[0]["dispatch"] == (10, 20) and per_rank[1]["dispatch"] == (20, 10)
    assert per_rank[0]["combine"] == (20, 10) and per_rank[0]["counts"] == (16, 16)
