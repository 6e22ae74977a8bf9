"""`python -m moe_lab bench-generate`: generation with and without the KV cache (notebook 10).

Three measurements of the course model (the shipped checkpoint when it is there, else the cpu
preset's model with fresh weights, which the record says):

1. rollouts    notebook 08's GRPO rollouts: 32 training problems x 8 samples at temperature 0.7,
               stopping at the newline, through `evaluation.generate_completions` (what
               `grpo.sample_rollouts` runs), without the cache (re-running the prefix, as before
               notebook 10) and with it. Runs alternate, so a busy machine slows both alike; the
               record keeps every time and the ratio of each pair, and checks that both give the
               same completions.
2. throughput  tokens per second generating `new` tokens after a prompt of `prompt` tokens, batch 1
               and a batch of rows, with and without the cache.
3. per_token   the time of one more token at a given context length: a forward over the whole
               context (no cache) against one decode step over a cache holding it. The model is the
               course model's shape with a longer max_seq_len (fresh weights: time does not depend on them).

    python -m moe_lab bench-generate                 # all three; writes runs/bench/generate-<device>.json
    python -m moe_lab bench-generate --quick         # fewer repeats and contexts (CI, seconds)
    python -m moe_lab bench-generate --record        # also writes data/bench/generate/<device>.json

Like `python -m moe_lab bench` (which times the expert back-ends; this module stands beside it), a
CPU run uses one thread by default (`--threads`): small operations are dominated by threading
overhead, and a machine shared with other jobs makes two threads erratic. The record carries the
device, versions, date, command and thread count (moe_lab.studies.profiling.environment_record).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from moe_lab.core import machine, paths
from moe_lab.core.arguments import check_outputs
from moe_lab.core.config import preset
from moe_lab.core.files import write_record
from moe_lab.core.runtime import default_device
from moe_lab.data import course_task
from moe_lab.model import Transformer
from moe_lab.training.checkpoint import load_checkpoint, shipped_checkpoint
from moe_lab.training.evaluation import generate_completions

RECORD_DIR = paths.data_path("bench", "generate")  # beside data/bench/*.json (notebook 07's records), not among them


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def course_model(device="cpu"):
    """(model, where it came from): the shipped checkpoint, or the cpu preset's model with fresh weights."""
    path = shipped_checkpoint("moe_cpu")
    if path is not None:
        model, _ = load_checkpoint(path, device=device)
        return model.eval(), f"shipped checkpoint {path.name}"
    torch.manual_seed(0)
    return Transformer(preset("cpu").moe).to(device).eval(), "cpu preset model, fresh weights (no checkpoint found)"


def rollout_times(model, problems: Sequence, group_size: int = 8, temperature: float = 0.7,
                  max_new_tokens: Optional[int] = None, repeats: int = 5, seed: int = 0) -> dict:
    """Time `generate_completions` as GRPO's rollouts use it, alternating uncached and cached runs.

    Every run of a pair samples from the same seed, so the two must return the same completions
    (checked: `same_completions`). Returns the seconds of each run and the ratio of each pair.
    """
    if repeats < 1:
        raise ValueError(f"rollout_times(repeats={repeats}): expected an integer >= 1")
    device = next(model.parameters()).device
    times = {"uncached": [], "cached": []}
    same = True
    generate_completions(model, problems[:2], 2, temperature, max_new_tokens=max_new_tokens)  # warm-up
    for r in range(repeats):
        outs = {}
        for name, use_cache in (("uncached", False), ("cached", True)):
            g = torch.Generator(device=device).manual_seed(seed + r)
            holder = {}
            times[name].append(_timed(lambda: holder.setdefault("out", generate_completions(
                model, problems, group_size, temperature, generator=g, max_new_tokens=max_new_tokens,
                use_cache=use_cache)), device))
            outs[name] = holder["out"]
        same &= outs["uncached"] == outs["cached"]
    ratios = [u / c for u, c in zip(times["uncached"], times["cached"])]
    return {"problems": len(problems), "group_size": group_size, "temperature": temperature,
            "prompt_lengths": sorted({len(p.prompt) for p in problems}), "seconds": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "speedup_per_pair": ratios, "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios), "speedup_max": max(ratios), "same_completions": bool(same)}


def throughput(model, batch: int, prompt: int, new: int, repeats: int = 3, seed: int = 0) -> dict:
    """Generated tokens per second (batch * new / seconds), greedy, no stop token, with and without the cache."""
    if prompt + new > model.cfg.max_seq_len:
        raise ValueError(f"throughput: prompt={prompt} + new={new} exceeds max_seq_len={model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    idx = torch.randint(0, model.cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed)).to(device)
    row = {"batch": batch, "prompt": prompt, "new": new}
    model.generate(idx, 2, temperature=0)  # warm-up
    for name, use_cache in (("uncached", False), ("cached", True)):
        best = min(_timed(lambda: model.generate(idx, new, temperature=0, use_cache=use_cache), device)
                   for _ in range(repeats))
        row[f"{name}_tokens_per_s"] = batch * new / best
    row["speedup"] = row["cached_tokens_per_s"] / row["uncached_tokens_per_s"]
    return row


def per_token_times(cfg, contexts: Sequence[int], batch: int = 1, repeats: int = 5, device="cpu") -> list[dict]:
    """Milliseconds for one more token at each context length: full forward vs one cached decode step."""
    longest = max(contexts) + 1
    torch.manual_seed(0)
    model = Transformer(replace(cfg, max_seq_len=max(cfg.max_seq_len, longest))).to(device).eval()
    x = torch.randint(0, cfg.vocab_size, (batch, longest), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    with torch.inference_mode():
        for n in contexts:
            uncached = min(_timed(lambda: model(x[:, :n + 1]), device) for _ in range(repeats))
            cache = model.new_cache(n + 1)
            model(x[:, :n], cache=cache)  # the prefill: n tokens cached

            def step():
                for layer in cache.layers:
                    layer.length = n  # forget the previous timing's token
                model(x[:, n:n + 1], cache=cache)

            step()
            cached = min(_timed(step, device) for _ in range(repeats))
            rows.append({"context": n, "batch": batch, "uncached_ms": uncached * 1e3, "cached_ms": cached * 1e3})
    return rows


def run(quick: bool = False, device="cpu", progress: bool = True) -> dict:
    """All three measurements; returns the results part of a record."""
    model, source = course_model(device)
    task = course_task()
    import random

    rng = random.Random(0)
    problems = [task.sample(rng, "train") for _ in range(32)]  # one GRPO step's prompts (grpo_preset("cpu"))
    say = print if progress else (lambda *a, **k: None)
    say(f"model: {source}")
    roll = rollout_times(model, problems, 8, 0.7, task.max_answer_len + 2, repeats=3 if quick else 11)
    say(f"rollouts 32 x 8: uncached {roll['median_s']['uncached'] * 1e3:.1f} ms, cached "
        f"{roll['median_s']['cached'] * 1e3:.1f} ms (medians); speed-up median {roll['speedup_median']:.2f}x "
        f"(pairs {roll['speedup_min']:.2f}-{roll['speedup_max']:.2f}); same completions: {roll['same_completions']}")
    L = model.cfg.max_seq_len
    shapes = [(1, 8, min(32, L - 8)), (64, 8, min(32, L - 8))]
    thr = [throughput(model, b, p, n, repeats=1 if quick else 3) for b, p, n in shapes]
    for row in thr:
        say(f"throughput batch {row['batch']}, {row['new']} new tokens after {row['prompt']}: "
            f"{row['uncached_tokens_per_s']:.0f} -> {row['cached_tokens_per_s']:.0f} tokens/s ({row['speedup']:.1f}x)")
    contexts = [16, 64, 256] if quick else [16, 32, 64, 128, 256, 512, 1024]
    per = per_token_times(model.cfg, contexts, repeats=2 if quick else 5, device=device)
    for row in per:
        say(f"one more token at context {row['context']:>5}: uncached {row['uncached_ms']:.2f} ms, cached {row['cached_ms']:.2f} ms")
    return {"model": source, "rollouts": roll, "throughput": thr, "per_token": per}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_lab bench-generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and context lengths (CI, seconds)")
    ap.add_argument("--out", help="JSON output (default runs/bench/generate-<device>[-quick].json)")
    ap.add_argument("--record", action="store_true", help=f"also write {RECORD_DIR}/<device>.json (recorded figures)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default 1 on a CPU, as moe_lab.studies.bench --quick)")
    args = ap.parse_args(argv)
    dev_type = args.device or default_device()
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    device = torch.device(dev_type)
    threads = args.threads if args.threads is not None else (1 if dev_type == "cpu" else None)
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads {threads}: expected a positive number")
        torch.set_num_threads(threads)
    slug = machine.slugify(machine.device_name(device))
    out = Path(args.out) if args.out else paths.runs_path("bench", f"generate-{slug}{'-quick' if args.quick else ''}.json")
    outs = [out] + ([RECORD_DIR / f"{slug}.json"] if args.record else [])
    check_outputs(ap, {"--out": out, "--record": outs[1] if args.record else None})  # before any work
    command = " ".join(["python -m moe_lab bench-generate", *(sys.argv[1:] if argv is None else argv)])
    record = machine.environment_record(device, command)
    record.update(schema=1, kind="generate", mode="quick" if args.quick else "full", dtype="float32",
                  cpu_threads=torch.get_num_threads())
    record.update(run(args.quick, device))
    write_record(record, outs)
    return 0 if record["rollouts"]["same_completions"] else 1


if __name__ == "__main__":
    sys.exit(main())
