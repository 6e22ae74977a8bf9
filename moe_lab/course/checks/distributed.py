"""Checkers for notebook 09 (expert parallelism): the all-to-all exchange, the bytes each rank moves,
and DeepSeek-V3's node-limited routing."""
from __future__ import annotations

from typing import Callable

import torch

from moe_lab.course.checks.common import CheckFailed, _ok, checker
from moe_lab.distributed.simulate import all_to_all_sim, bytes_by_hand as reference_bytes

PHASES = ("counts", "dispatch", "combine", "combine.backward", "dispatch.backward")


@checker
def check_all_to_all_sim(all_to_all: Callable) -> None:
    """all_to_all(chunks[src][dst]) -> received[dst][src]: rank dst receives chunk dst of every rank, in rank order."""
    for W in (3, 4, 1):
        chunks = [[f"{src}→{dst}" for dst in range(W)] for src in range(W)]
        expected = all_to_all_sim(chunks)
        got = all_to_all([list(row) for row in chunks])
        if not isinstance(got, (list, tuple)) or len(got) != W or \
                any(not isinstance(row, (list, tuple)) or len(row) != W for row in got):
            raise CheckFailed(f"check_all_to_all_sim (W={W}): return one list per rank, each with one chunk per "
                              f"source rank ({W} x {W}); got {got!r}")
        got = [list(row) for row in got]
        if got == expected:
            continue
        if got == chunks:
            raise CheckFailed(f"check_all_to_all_sim (W={W}): every rank got back its own send list; rank r must "
                              f"receive chunk r of every rank, e.g. rank 0 receives {expected[0]}")
        r = next(i for i in range(W) if got[i] != expected[i])
        raise CheckFailed(f"check_all_to_all_sim (W={W}): rank {r} receives {got[r]}, expected {expected[r]} "
                          f"(in source-rank order)")
    _ok("check_all_to_all_sim")


def _bytes(idxs, n_experts, row_bytes, count_bytes=8, local=False, dropped=False, swap=True):
    """simulate.bytes_by_hand with flags that reproduce plausible mistakes, so the checker can name them."""
    W = len(idxs)
    E_local = n_experts // W
    rows = torch.zeros(W, W, dtype=torch.long)
    for src, idx in enumerate(idxs):
        owner = idx.clamp_min(0) // E_local if dropped else idx[idx >= 0] // E_local
        rows[src] += torch.bincount(owner.flatten(), minlength=W)
    off = rows if local else rows * (1 - torch.eye(W, dtype=torch.long))
    per_rank = []
    for r in range(W):
        out, inc = int(off[r].sum()) * row_bytes, int(off[:, r].sum()) * row_bytes
        back = (inc, out) if swap else (out, inc)
        counts = (W - 1) * E_local * count_bytes
        per_rank.append({"counts": (counts, counts), "dispatch": (out, inc), "combine": back,
                         "combine.backward": (out, inc), "dispatch.backward": back})
    return per_rank, rows


def _normal(per_rank) -> list:
    return [{p: (int(s), int(r)) for p, (s, r) in d.items()} for d in per_rank]


@checker
def check_bytes_by_hand(bytes_by_hand: Callable) -> None:
    """bytes_by_hand(idxs, n_experts, row_bytes) -> ([{phase: (sent, received)}] per rank, rows[src, dst])."""
    g = torch.Generator().manual_seed(21)
    W, E, row_bytes = 4, 8, 64
    idxs = [torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(6)]) for _ in range(W)]
    idxs[1][0, 1] = -1  # dropped copies
    idxs[2][3, 0] = -1
    expected, exp_rows = reference_bytes(idxs, E, row_bytes)
    out = bytes_by_hand([i.clone() for i in idxs], E, row_bytes)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise CheckFailed("check_bytes_by_hand: return (per_rank, rows): a list of {phase: (sent, received)} dicts "
                          "and the (W, W) tensor of routed copies src sends to dst")
    per_rank, rows = out
    rows = torch.as_tensor(rows)
    if rows.shape != (W, W):
        raise CheckFailed(f"check_bytes_by_hand: rows should have shape (W, W) = ({W}, {W}), got {tuple(rows.shape)}")
    if not torch.equal(rows.long(), exp_rows):
        if torch.equal(rows.long(), _bytes(idxs, E, row_bytes, dropped=True)[1]):
            raise CheckFailed("check_bytes_by_hand: rows counts the dropped copies (expert -1); they never travel")
        raise CheckFailed(f"check_bytes_by_hand: rows[src, dst] is {rows.tolist()}, expected {exp_rows.tolist()} "
                          f"(rank r owns experts r*E_local .. (r+1)*E_local - 1)")
    try:
        got = _normal(per_rank)
    except Exception:
        raise CheckFailed("check_bytes_by_hand: per_rank should be a list with one {phase: (sent, received)} dict "
                          "per rank") from None
    if got == expected:
        _ok("check_bytes_by_hand")
        return
    for flags, mistake in [(dict(local=True), "local copies (src == dst) are counted, but they never cross the network"),
                           (dict(dropped=True), "dropped copies (expert -1) are counted; they never travel"),
                           (dict(swap=False), "the combine sends back what the dispatch *received* (and receives "
                                              "what it sent): swap the pair")]:
        if got == _normal(_bytes(idxs, E, row_bytes, **flags)[0]):
            raise CheckFailed(f"check_bytes_by_hand: {mistake}")
    for r, (mine, ref) in enumerate(zip(got, expected)):
        if set(mine) != set(ref):
            raise CheckFailed(f"check_bytes_by_hand: rank {r} has phases {sorted(mine)}, expected {sorted(ref)}")
        for phase in PHASES:
            if mine[phase] != ref[phase]:
                raise CheckFailed(f"check_bytes_by_hand: rank {r}, phase {phase!r}: (sent, received) = {mine[phase]}, "
                                  f"expected {ref[phase]} (W={W}, E={E}, a row is {row_bytes} bytes, counts are int64)")
    raise CheckFailed(f"check_bytes_by_hand: expected one dict per rank ({W}), got {len(got)}")


def _node_limited(scores, n_nodes, max_nodes, k, node_score="sum"):
    T, E = scores.shape
    per_node = scores.view(T, n_nodes, E // n_nodes)
    best = per_node.topk(k // max_nodes, dim=-1).values
    score = best.sum(-1) if node_score == "sum" else per_node.max(-1).values
    keep = torch.zeros(T, n_nodes, dtype=torch.bool).scatter_(1, score.topk(max_nodes, -1).indices, True)
    allowed = keep.repeat_interleave(E // n_nodes, dim=1)
    return scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices


@checker
def check_node_limited_topk(node_limited_topk: Callable) -> None:
    """node_limited_topk(scores (T, E), n_nodes, max_nodes, k) -> (T, k) experts on at most max_nodes nodes."""
    g = torch.Generator().manual_seed(22)
    T, E, n_nodes, M, k = 200, 32, 8, 2, 6
    scores = torch.rand(T, E, generator=g)
    got = node_limited_topk(scores.clone(), n_nodes, M, k)
    expected = _node_limited(scores, n_nodes, M, k)
    if not isinstance(got, torch.Tensor) or got.shape != (T, k):
        raise CheckFailed(f"check_node_limited_topk: expected expert indices of shape (T, k) = ({T}, {k}), got "
                          f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    got_s, exp_s = got.long().sort(-1).values, expected.sort(-1).values
    if torch.equal(got_s, exp_s):
        _ok("check_node_limited_topk")
        return
    nodes = torch.nn.functional.one_hot(got.long().clamp(0, E - 1) // (E // n_nodes), n_nodes).amax(1).sum(-1)
    if int(nodes.max()) > M:
        t = int(nodes.argmax())
        raise CheckFailed(f"check_node_limited_topk: token {t}'s experts {got[t].tolist()} live on {int(nodes[t])} "
                          f"nodes, more than max_nodes={M} (experts {E // n_nodes} per node)")
    if torch.equal(got_s, _node_limited(scores, n_nodes, M, k, node_score="max").sort(-1).values):
        raise CheckFailed(f"check_node_limited_topk: nodes are ranked by their single best expert; rank them by the sum "
                          f"of their best k / max_nodes = {k // M} affinities")
    t = int((got_s != exp_s).any(-1).nonzero()[0])
    raise CheckFailed(f"check_node_limited_topk: token {t} gets experts {got_s[t].tolist()}, expected {exp_s[t].tolist()} "
                      f"(T={T}, E={E}, n_nodes={n_nodes}, max_nodes={M}, k={k})")
