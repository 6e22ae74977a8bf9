"""Expert parallelism simulated in one process: the all-to-all as list shuffling, and the bytes a
step moves counted by hand (notebook 09, whose exercises rebuild both; checked against these).

Nothing here talks to another process: these are the readable definitions that `comm.all_to_all`
and `comm.CommStats` implement and measure for real.
"""
from __future__ import annotations

import torch


def all_to_all_sim(chunks: list) -> list:
    """chunks[src][dst] -> received[dst][src]: rank dst receives chunk dst of every rank, in rank order."""
    W = len(chunks)
    return [[chunks[src][dst] for src in range(W)] for dst in range(W)]


def bytes_by_hand(idxs: list, n_experts: int, row_bytes: int, count_bytes: int = 8):
    """Bytes each of W ranks sends and receives per phase of one expert-parallel step.

    idxs[r] is rank r's routing (T_r, k), -1 for a dropped copy; rank r owns experts
    r * E_local .. (r + 1) * E_local - 1. Only rows that cross a process boundary count. Returns
    ([{phase: (sent, received)} per rank], rows[src, dst]: routed copies src sends to dst).
    """
    W = len(idxs)
    E_local = n_experts // W
    rows = torch.zeros(W, W, dtype=torch.long)  # rows[src, dst], the diagonal stays home
    for src, idx in enumerate(idxs):
        rows[src] += torch.bincount(idx[idx >= 0] // E_local, minlength=W)  # owner rank of each routed copy
    off = rows * (1 - torch.eye(W, dtype=torch.long))
    per_rank = []
    for r in range(W):
        out, inc = int(off[r].sum()) * row_bytes, int(off[:, r].sum()) * row_bytes
        counts = (W - 1) * E_local * count_bytes
        per_rank.append({"counts": (counts, counts), "dispatch": (out, inc), "combine": (inc, out),
                         "combine.backward": (out, inc), "dispatch.backward": (inc, out)})
    return per_rank, rows
