"""Does an export answer the course's task as moe_lab does? Held-out exact match through both.

    python -m moe_lab export-agreement [CHECKPOINT] [--n 500]

Exports the checkpoint (default: the shipped one) into a temporary folder, loads it with
`transformers.AutoModelForCausalLM`, and answers the same n held-out 3-digit additions
(`moe_lab.data.course_task()`, seed 1234, as `moe_lab.training.evaluation.exact_match`) greedily through
transformers' `generate` and through moe_lab: prints both exact matches and how many completions differ.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from moe_lab.data import course_task
from moe_lab.data.tokenizer import TOKENIZER as tok
from moe_lab.open_weights.export import export
from moe_lab.training.checkpoint import load_checkpoint, shipped_checkpoint
from moe_lab.training.evaluation import solve


def hf_solve(hf_model, problems, max_new_tokens: Optional[int] = None) -> list[str]:
    """transformers' greedy completions of the problems, cut after the first newline, as moe_lab.training.evaluation.solve.

    Prompts are a newline then the problem (as moe_lab's), grouped by length so no row is padded."""
    max_new = max_new_tokens or max(len(p.answer) for p in problems) + 2
    out: list = [None] * len(problems)
    by_len = defaultdict(list)
    for i, p in enumerate(problems):
        by_len[len(p.prompt)].append(i)
    for _, idxs in sorted(by_len.items()):
        prompts = torch.tensor([[tok.newline_id] + tok.encode(problems[i].prompt) for i in idxs])
        with torch.no_grad():
            seqs = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_new, do_sample=False,
                                     eos_token_id=tok.newline_id, pad_token_id=tok.newline_id)
        for r, row in enumerate(seqs[:, prompts.shape[1]:].tolist()):
            if tok.newline_id in row:
                row = row[: row.index(tok.newline_id) + 1]
            out[idxs[r]] = tok.decode(row, skip_special=False)
    return out


def compare(checkpoint=None, n: int = 500, seed: int = 1234) -> dict:
    """{moe_lab exact match, transformers exact match, completions that differ, n} on n held-out problems."""
    from transformers import AutoModelForCausalLM

    checkpoint = checkpoint or shipped_checkpoint()
    if checkpoint is None:
        raise FileNotFoundError("no checkpoint given and none shipped in data/checkpoints/")
    task = course_task()
    problems = task.problems(n, "heldout", seed)
    ours, _ = load_checkpoint(checkpoint)
    ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        export(checkpoint, Path(tmp) / "export")
        hf_model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "export", dtype=torch.float32).eval()
    a, b = solve(ours, problems), hf_solve(hf_model, problems)
    return {"checkpoint": str(checkpoint), "n": n, "seed": seed, "architecture": type(hf_model).__name__,
            "moe_lab_exact_match": sum(task.verify(c, p) for c, p in zip(a, problems)) / n,
            "transformers_exact_match": sum(task.verify(c, p) for c, p in zip(b, problems)) / n,
            "completions_that_differ": sum(x != y for x, y in zip(a, b))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lab export-agreement", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="a moe_lab checkpoint (default: the shipped one)")
    parser.add_argument("--n", type=int, default=500, help="held-out problems (default 500)")
    args = parser.parse_args(argv)
    print(json.dumps(compare(args.checkpoint, args.n), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
