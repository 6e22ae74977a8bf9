"""Every checker of moe_lab.course.checks passes the right answer and fails plausible wrong ones, with a
message that says what is wrong, and reports a learner's stub as "not implemented yet".

Each checker's cases are `CASES[name] = (right answer, [(wrong answer, regex its message must match), ...])`
in this file or in a `tests/test_checks_<topic>.py` next to it (Triton kernels: test_checks_kernels.py).
The tests below run the cases of all those files, and fail for a checker of `checks.__all__` that has none.

Run: .venv/bin/python -m pytest tests/course/test_checks.py -q
"""
import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_lab.course import checks
from moe_lab.model import layers, router
from moe_lab.model.experts import experts_reference, experts_sorted
from moe_lab.training.loop import lr_at


def rms_right(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_right(x, cos, sin):
    return layers.apply_rope(x, cos, sin)


def rope_rotate_half(x, cos, sin):
    """The GPT-NeoX / Hugging Face pairing: x[i] with x[i + hd/2], halves concatenated."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rope_halves_interleaved(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rope_concatenated(x, cos, sin):
    """The right pairs, rotated right, but written back as [all x1', all x2'] instead of interleaved."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rope_minus_angle(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).flatten(-2)


def route_right(logits, k):
    w, i = logits.softmax(-1).topk(k, -1)
    return i, w / w.sum(-1, keepdim=True)


CASES = {
    "check_rmsnorm": (rms_right, [
        (lambda x, w, eps: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w, "LayerNorm"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w, "SUM of squares"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), "not multiplied by `weight`"),
        # eps outside the square root: indistinguishable at eps=1e-5 on large inputs, so the checker also tries eps=0.5
        (lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w, "outside the square root"),
        (lambda x, w, eps: x / x.pow(2).mean(-1, keepdim=True).sqrt() * w, "`eps` argument is ignored"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * w, "over dimension 0.*last dimension"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + eps) * w, "over dimension 1.*last dimension"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean() + eps) * w, "over dimension \\(0, 1, 2\\)"),
        (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w * 1.01, "wrong at index"),
    ]),
    "check_rope": (rope_right, [
        (lambda x, cos, sin: torch.stack((x[..., 0::2] * cos + x[..., 1::2] * sin, x[..., 0::2] * sin + x[..., 1::2] * cos), -1).flatten(-2), "length"),
        (lambda x, cos, sin: x, "wrong at index"),
        (rope_rotate_half, "rotate-half pairing"),
        (rope_halves_interleaved, "first and second halves"),
        (rope_concatenated, "concatenated.*interleaved"),
        (rope_minus_angle, "minus the angle"),
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


def _dtype_ok(device_type, capability=None):
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def _lr_unclamped(step, cfg):  # the cosine runs on past `steps` and climbs again
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _lr_linear(step, cfg):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - p))


def _masked_right(logits, y, mask):
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    m = mask.flatten()
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def _nll(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")


def _bytes_right(idxs, n_experts, row_bytes, count_bytes=8):
    from moe_lab.course.checks.distributed import _bytes

    return _bytes(idxs, n_experts, row_bytes, count_bytes)


def _bytes_variant(**flags):
    from moe_lab.course.checks.distributed import _bytes

    return lambda idxs, E, rb, cb=8: _bytes(idxs, E, rb, cb, **flags)


def _node_limited(node_score="sum", plain=False):
    from moe_lab.course.checks.distributed import _node_limited as ref

    if plain:
        return lambda s, n, M, k: s.topk(k, -1).indices
    return lambda s, n, M, k: ref(s, n, M, k, node_score=node_score)


def _tile_right(pid, n_m, n_n, gm):
    per_group = gm * n_n
    first = (pid // per_group) * gm
    rows = min(n_m - first, gm)
    return first + (pid % per_group) % rows, (pid % per_group) // rows


def _tile_no_short_group(pid, n_m, n_n, gm):
    per_group = gm * n_n
    return (pid // per_group) * gm + (pid % per_group) % gm, (pid % per_group) // gm


CASES.update({
    "check_tile_of": (_tile_right, [
        (lambda pid, n_m, n_n, gm: (pid // n_n, pid % n_n), "row-major order"),
        (lambda pid, n_m, n_n, gm: (min(_tile_no_short_group(pid, n_m, n_n, gm)[0], n_m - 1), _tile_no_short_group(pid, n_m, n_n, gm)[1]), "two programs"),
        (_tile_no_short_group, "outside the grid"),
        (lambda pid, n_m, n_n, gm: _tile_right(pid, n_m, n_n, gm)[::-1] if n_m == n_n else _tile_right(pid, n_m, n_n, gm), "program 1 gets tile"),
        (lambda pid, n_m, n_n, gm: tuple(float(v) for v in _tile_right(pid, n_m, n_n, gm)), "integer division"),
    ]),
    "check_dtype_policy": (_dtype_ok, [
        (lambda t, c=None: torch.float32 if t != "cuda" else torch.bfloat16, "T4.*no bf16|only capability 8.0"),
        (lambda t, c=None: torch.float32 if t != "cuda" else (torch.bfloat16 if c[0] >= 8 and c[1] == 0 or c[0] > 8 else torch.float16), "whole \\(major, minor\\) tuple"),
        (lambda t, c=None: torch.float16 if t != "cuda" else _dtype_ok(t, c), "CPUs compute in torch.float32"),
    ]),
    "check_matmul_flops": (lambda m, n, k: 2 * m * n * k, [
        (lambda m, n, k: m * n * k, "multiply-add counts as 2 FLOPs"),
        (lambda m, n, k: 2 * n**3, "square product"),
        (lambda m, n, k: 2 * m * n * k + 1, "expected"),
    ]),
    "check_problem_line": (lambda a, b: f"{a}+{b}={str(a + b)[::-1]}\n", [
        (lambda a, b: f"{a}+{b}={a + b}\n", "most-significant digit first"),
        (lambda a, b: f"{a}+{b}={str(a + b)[::-1]}", "no final newline"),
        (lambda a, b: a + b, "returned a int"),
        (lambda a, b: f"{a}+{b}= {str(a + b)[::-1]}\n", "expected"),
    ]),
    "check_next_token_shift": (lambda ids, m: (ids[:, :-1], ids[:, 1:], m[:, 1:]), [
        (lambda ids, m: (ids[:, :-1], ids[:, 1:], m[:, :-1]), "belongs to the \\*predicted\\* id"),
        (lambda ids, m: (ids[:, 1:], ids[:, :-1], m[:, 1:]), "swapped"),
        (lambda ids, m: (ids, ids, m), "shape \\(B, n\\)"),
        (lambda ids, m: (ids[:, :-1], ids[:, 1:]), "three tensors"),
    ]),
    "check_lr_schedule": (lr_at, [
        (lambda s, c: c.lr * s / c.warmup_steps if s < c.warmup_steps else lr_at(s, c), "wastes the first step"),
        (lambda s, c: c.lr if s < c.warmup_steps else lr_at(s, c), "no warm-up"),
        (lambda s, c: lr_at(s, c) if s < c.warmup_steps else c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - c.warmup_steps) / (c.steps - c.warmup_steps)))), "not at 0"),
        (_lr_linear, "decays linearly"),
        (_lr_unclamped, "clamp progress to 1"),
    ]),
    "check_masked_loss": (_masked_right, [
        (lambda lg, y, m: _nll(lg, y).mean(), "mask is ignored"),
        (lambda lg, y, m: (_nll(lg, y) * m.flatten()).mean(), "divide by the number of positions"),
        (lambda lg, y, m: _masked_right(lg, y, m).detach(), "no gradient"),
        (lambda lg, y, m: (_nll(lg, y) * m.flatten()).sum() / m.sum(), "all-zero mask"),
        (lambda lg, y, m: _nll(lg, y).view(y.shape) * m, "scalar"),
    ]),
    "check_all_to_all_sim": (lambda ch: [[ch[s][d] for s in range(len(ch))] for d in range(len(ch))], [
        (lambda ch: ch, "its own send list"),
        (lambda ch: [[ch[s][d] for s in reversed(range(len(ch)))] for d in range(len(ch))], "source-rank order"),
        (lambda ch: [row[0] for row in ch], "one list per rank"),
    ]),
    "check_bytes_by_hand": (_bytes_right, [
        (_bytes_variant(local=True), "local copies"),
        (_bytes_variant(dropped=True), "dropped copies"),
        (_bytes_variant(swap=False), "swap the pair"),
        (lambda idxs, E, rb, cb=8: (_bytes_right(idxs, E, rb, 4)[0], _bytes_right(idxs, E, rb)[1]), "phase 'counts'"),
    ]),
    "check_node_limited_topk": (_node_limited(), [
        (_node_limited(plain=True), "more than max_nodes"),
        (_node_limited(node_score="max"), "single best expert"),
        (lambda s, n, M, k: _node_limited()(s, n, M, k)[:, :1], "shape \\(T, k\\)"),
    ]),
})


def all_cases() -> dict:
    """CASES of this file and of every tests/test_checks_<topic>.py (imported as pytest imports them)."""
    cases = dict(CASES)
    for path in sorted(Path(__file__).parent.glob("test_checks_*.py")):
        try:
            module = importlib.import_module(path.stem)
        except pytest.skip.Exception:  # e.g. Triton not installed: that file's tests skip themselves
            continue
        cases.update(getattr(module, "CASES", {}))
    return cases


ALL = all_cases()
NEED_TRITON = {"check_swiglu_act", "check_rows_to_token_expert", "check_combine"}


def test_every_checker_has_cases():
    """A checker nobody proved is a defect: each one of checks.__all__ needs a right and a wrong answer."""
    missing = [n for n in checks.__all__ if n.startswith("check_") and n not in ALL]
    if missing and set(missing) <= NEED_TRITON:
        pytest.importorskip("triton")  # their cases live in test_checks_kernels.py, which needs Triton
    assert not missing, f"checkers without CASES in tests/course/test_checks*.py: {missing}"
    assert all(len(wrongs) >= 1 for _, wrongs in ALL.values())


@pytest.mark.parametrize("name", sorted(ALL))
def test_checker_passes_the_right_answer(name, capsys):
    getattr(checks, name)(ALL[name][0])
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("name, wrong, message",
                         [(n, w, m) for n, (_, wrongs) in sorted(ALL.items()) for w, m in wrongs])
def test_checker_fails_a_wrong_answer_and_says_why(name, wrong, message):
    with pytest.raises(checks.CheckFailed, match=message):
        getattr(checks, name)(wrong)


@pytest.mark.parametrize("name", sorted(ALL))
def test_checker_fails_a_stub(name):
    def stub(*args):
        raise NotImplementedError("Your turn: the exercise")

    with pytest.raises(checks.CheckFailed, match="not implemented yet"):
        getattr(checks, name)(stub)


def test_expert_backend_checker_accepts_indexed_accumulation():
    """`y[tokens] += ...` (advanced indexing) is right for any top-k routing, whose experts within a row
    are distinct: the checker must not feed it a row that names one expert twice."""
    def indexed(x, idx, w, w1, w3, w2):
        y = torch.zeros_like(x)
        for e in range(w1.shape[0]):
            tokens, slots = (idx == e).nonzero(as_tuple=True)
            h = F.silu(x[tokens] @ w1[e]) * (x[tokens] @ w3[e])
            y[tokens] += (h @ w2[e]) * w[tokens, slots, None]
        return y

    checks.check_expert_backend(indexed)


def test_a_torch_not_implemented_error_is_not_called_a_stub():
    def uses_missing_op(*args):
        raise NotImplementedError("aten::something is not implemented for 'Half'")

    with pytest.raises(checks.CheckFailed, match="not implemented here") as err:
        checks.check_rmsnorm(uses_missing_op)
    assert "not implemented yet" not in str(err.value)
