"""Checkers for notebook 12 (distillation): the SFT loss masked to the completion tokens, and the
verifier-filtered dataset of rejection sampling."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from moe_lab.course.checks.common import CheckFailed, _compare, _ok, checker
from moe_lab.data import course_task
from moe_lab.data.tokenizer import TOKENIZER as tok


def _rows():
    """Three rows "\\n prompt completion pad...": prompt lengths (newline included) and real lengths."""
    texts = [("123+45=", "861\n"), ("7+8=", "51\n"), ("999+1=", "0001\n")]
    rows = [[tok.newline_id] + tok.encode(p) + tok.encode(c) for p, c in texts]
    L = max(len(r) for r in rows)
    tokens = torch.full((3, L), tok.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    prompt_lens = torch.tensor([1 + len(p) for p, _ in texts])
    lengths = torch.tensor([len(r) for r in rows])
    return tokens, prompt_lens, lengths


def _variants(logits, tokens, prompt_lens, lengths) -> dict:
    """The right loss and the plausible wrong ones, by name: masks built with each mistake."""
    B, L = tokens.shape
    y = tokens[:, 1:]  # (B, L-1): target t is predicted at position t
    pos = torch.arange(L - 1)[None, :]  # (1, L-1)
    p0, n = prompt_lens[:, None], lengths[:, None]
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(B, L - 1)

    def mean(mask):
        m = mask.float()
        return (nll * m).sum() / m.sum()

    right = (pos >= p0 - 1) & (pos < n - 1)
    return {
        "right": mean(right),
        "late": mean((pos >= p0) & (pos < n - 1)),
        "prompt": mean(pos < n - 1),
        "padding": mean(pos >= p0 - 1),
        "no_stop": mean((pos >= p0 - 1) & (pos < n - 2)),
        "everything": nll.mean(),
        "all_positions": (nll * right.float()).sum() / nll.numel(),
        "sum": (nll * right.float()).sum(),
        "per_row": ((nll * right.float()).sum(1) / right.float().sum(1)).mean(),
    }


@checker
def check_completion_loss(loss_fn: Callable) -> None:
    """loss_fn(logits (B, L-1, V), tokens (B, L), prompt_lens (B,), lengths (B,)) -> the mean cross-entropy of the
    completion tokens (the answer and its newline) over the whole batch; logits[:, t] predict tokens[:, t+1]."""
    name = "check_completion_loss"
    tokens, prompt_lens, lengths = _rows()
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(tokens.shape[0], tokens.shape[1] - 1, 99, generator=g, requires_grad=True)
    v = {k: t.detach() for k, t in _variants(logits.detach(), tokens, prompt_lens, lengths).items()}
    got = loss_fn(logits, tokens.clone(), prompt_lens.clone(), lengths.clone())
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        raise CheckFailed(f"{name}: the loss should be a scalar tensor, got "
                          f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    d = got.detach().float()
    hints = {
        "late": "the first answer token is left out: tokens[:, p0] (the first completion token) is predicted at "
                "position p0 - 1, so the mask starts at prompt_len - 1",
        "prompt": "the prompt's tokens count too: distillation imitates the teacher's completion; the operands are "
                  "given, not something to learn",
        "padding": "the padding after each row counts: stop the mask at the row's real length",
        "no_stop": "the final newline is left out: the student must learn to stop, so the newline that ends the "
                   "completion counts",
        "everything": "this is the mean over every position: no mask at all",
        "all_positions": "masked positions are zeroed but you divide by every position; divide by the number of "
                         "completion tokens",
        "sum": "this is the sum over completion tokens, not their mean",
        "per_row": "you averaged each row first, then the rows: the course averages over all completion tokens of "
                   "the batch (as Transformer.forward with a loss mask)",
    }
    for key, hint in hints.items():
        if torch.allclose(d, v[key], atol=1e-5) and not torch.allclose(v[key], v["right"], atol=1e-5):
            raise CheckFailed(f"{name}: {hint}")
    _compare(name, d, v["right"], what="loss")
    if not got.requires_grad:
        raise CheckFailed(f"{name}: the loss carries no gradient to the logits: did you detach it or use .item()?")
    grad, = torch.autograd.grad(got, logits)
    T = tokens.shape[1] - 1
    pos = torch.arange(T)[None, :]
    outside = ~((pos >= prompt_lens[:, None] - 1) & (pos < lengths[:, None] - 1))
    if grad[outside].abs().max() > 0:
        raise CheckFailed(f"{name}: the gradient reaches positions outside the completion (prompt or padding): "
                          f"select the completion tokens, do not only reweight")
    _ok(name)


@checker
def check_verified_dataset(build: Callable) -> None:
    """build(task, problems, samples) -> [(problem, completion), ...]: every distinct completion the verifier
    accepts (task.verify) that is well formed (task.format_ok), in the order of the samples."""
    name = "check_verified_dataset"

    task = course_task()
    p, q, r = task.make(12, 34), task.make(5, 7), task.make(999, 1)  # answers 64, 21, 0001 (reversed)
    samples = [["64\n", "64\n", "65\n", "640\n"], ["21", "31\n", "21\n\n"], ["0001\n", "0001\n", "1000\n"]]
    expected = [(p, "64\n"), (p, "640\n"), (r, "0001\n")]
    got = build(task, [p, q, r], [list(s) for s in samples])
    if not isinstance(got, list) or not all(isinstance(x, tuple) and len(x) == 2 for x in got):
        raise CheckFailed(f"{name}: expected a list of (problem, completion) pairs, got {type(got).__name__}"
                          f"{'' if not isinstance(got, list) else ' holding ' + repr(got[:2])}")
    pairs = [(pp.prompt if hasattr(pp, "prompt") else pp, c) for pp, c in got]
    if ("12+34=", "65\n") in pairs or ("5+7=", "31\n") in pairs or ("999+1=", "1000\n") in pairs:
        raise CheckFailed(f"{name}: a wrong answer was kept ({pairs}): keep only the samples task.verify accepts")
    if ("5+7=", "21") in pairs or ("5+7=", "21\n\n") in pairs:
        raise CheckFailed(f"{name}: a right answer that is not well formed was kept ('21' has no stop newline, "
                          f"'21\\n\\n' writes past it): keep only samples task.format_ok accepts, so the student "
                          f"learns to stop")
    if len(pairs) != len(set(pairs)):
        raise CheckFailed(f"{name}: the same (problem, completion) appears twice ({pairs}): keep each distinct one "
                          f"once, or the problems the sampler finds easy dominate the data")
    if ("12+34=", "640\n") not in pairs and ("12+34=", "64\n") in pairs and ("999+1=", "0001\n") in pairs:
        raise CheckFailed(f"{name}: '640\\n' is a right answer too (reversed it reads 046 = 46) but was dropped: "
                          f"did you compare the text with problem.answer, or keep one completion per problem? "
                          f"Let the verifier decide, and keep every distinct right completion")
    if pairs != [(pp.prompt, c) for pp, c in expected]:
        raise CheckFailed(f"{name}: got {pairs}, expected {[(pp.prompt, c) for pp, c in expected]} (every distinct "
                          f"verified, well-formed completion, in the order of the samples)")
    if any(pp is not ee for (pp, _), (ee, _) in zip(got, expected)):
        raise CheckFailed(f"{name}: return the Problem objects you were given, paired with their completions")
    _ok(name)
