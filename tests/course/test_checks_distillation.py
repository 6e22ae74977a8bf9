"""Cases for the checkers of notebook 12 (moe_lab.course.checks.distillation), run by tests/course/test_checks.py's generic
tests: the right answer passes, each plausible wrong answer fails with a message naming the mistake, a stub
is "not implemented yet"."""
import torch
import torch.nn.functional as F

from moe_lab.training import sft


def _loss(start_shift=0, end_shift=0, prompt=False, padding=False, reduce="mean", per_row=False, detach=False):
    def loss(logits, tokens, prompt_lens, lengths):
        y = tokens[:, 1:]
        pos = torch.arange(y.shape[1])[None, :]
        lo = torch.zeros_like(prompt_lens)[:, None] if prompt else prompt_lens[:, None] - 1 + start_shift
        hi = torch.full_like(lengths, y.shape[1] + 1)[:, None] if padding else lengths[:, None] - 1 + end_shift
        mask = ((pos >= lo) & (pos < hi)).float()
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        if per_row:
            out = ((nll * mask).sum(1) / mask.sum(1)).mean()
        elif reduce == "sum":
            out = (nll * mask).sum()
        elif reduce == "all":
            out = (nll * mask).sum() / nll.numel()
        else:
            out = (nll * mask).sum() / mask.sum()
        return out.detach() if detach else out
    return loss


def _dataset(verify=True, fmt=True, dedupe=True, by_text=False, one_per_problem=False):
    def build(task, problems, samples):
        out = []
        for p, ss in zip(problems, samples):
            for c in ss:
                ok = (c.split("\n")[0] == p.answer) if by_text else task.verify(c, p)
                if (ok or not verify) and (task.format_ok(c) or not fmt) and (not dedupe or (p, c) not in out):
                    out.append((p, c))
                    if one_per_problem:
                        break
        return out
    return build


CASES = {
    "check_completion_loss": (_loss(), [
        (_loss(start_shift=1), "first answer token is left out"),
        (_loss(prompt=True), "prompt's tokens count"),
        (_loss(padding=True), "padding"),
        (_loss(end_shift=-1), "final newline is left out"),
        (lambda lg, t, p, n: F.cross_entropy(lg.flatten(0, 1), t[:, 1:].flatten()), "no mask at all"),
        (_loss(reduce="all"), "divide by every position"),
        (_loss(reduce="sum"), "sum over completion tokens"),
        (_loss(per_row=True), "averaged each row first"),
        (_loss(detach=True), "no gradient"),
    ]),
    "check_verified_dataset": (sft.verified_dataset, [
        (_dataset(verify=False), "wrong answer was kept"),
        (_dataset(fmt=False), "not well formed"),
        (_dataset(dedupe=False), "appears twice"),
        (_dataset(by_text=True), "'640\\\\n' is a right answer too"),
        (_dataset(one_per_problem=True), "keep one completion per problem"),
        (lambda task, problems, samples: {p.prompt: s for p, s in zip(problems, samples)}, "list of \\(problem, completion\\)"),
    ]),
}
