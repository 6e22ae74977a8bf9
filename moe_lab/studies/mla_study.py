"""MLA against MHA at equal parameters, trained the same way (notebook 10).

The course's MoE model (a preset of moe_lab.core.config) is trained twice per seed on the same batches:
once with multi-head attention, once with multi-head latent attention whose latent width kv_rank is
chosen so that the whole model has as many parameters as the MHA one (`mla_twin`). Everything
else is shared: the MoE layers, the data, the schedule, the seed. The record keeps every
validation curve, the training time, held-out exact match, parameter counts and cache bytes per
token, so a claim about who wins rests on several seeds, not one.

    python -m moe_lab mla-study --preset cpu --seeds 0,1,2            # writes runs/mla_study/cpu.json
    python -m moe_lab mla-study --preset cpu --seeds 0,1,2 --record   # also data/records/mla_vs_mha_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from moe_lab.core import machine, paths
from moe_lab.core.arguments import check_outputs, positive_int, seed_list_arg
from moe_lab.core.config import ModelConfig, TrainConfig, preset
from moe_lab.core.files import write_record
from moe_lab.core.runtime import default_device, require_device, seed_everything
from moe_lab.data import batch_fn, course_mixture, course_task
from moe_lab.model import Transformer
from moe_lab.model.kv_cache import cache_bytes_per_token
from moe_lab.training.evaluation import exact_match
from moe_lab.training.loop import train

RECORD_DIR = paths.data_path("records")


def attention_params(cfg: ModelConfig) -> int:
    """Parameters of one block's attention under cfg (what MLA and MHA trade), counted by formula."""
    d, H = cfg.d_model, cfg.n_heads
    hd = d // H
    if cfg.attention == "mha":
        return 4 * d * d  # W_qkv (3 d^2) and W_o (d^2)
    dc, dr, dq = cfg.kv_rank, cfg.rope_dim, cfg.q_rank
    queries = (d * dq + dq + dq * H * (hd + dr)) if dq else d * H * (hd + dr)  # (W_DQ, its norm,) W_UQ / W_Q
    return queries + d * dc + dc + 2 * dc * H * hd + d * dr + H * hd * d  # W_DKV, norm, W_UK + W_UV, W_KR, W_O


def mla_twin(cfg: ModelConfig, rope_dim: Optional[int] = None, q_rank: Optional[int] = None) -> ModelConfig:
    """The MLA version of an MHA config with (nearly) the same number of parameters.

    rope_dim defaults to half the head size (DeepSeek-V3: 64 of 128); kv_rank is then the width
    whose attention parameters come closest to MHA's 4 * d_model^2 per block (ties: the smaller).
    """
    if cfg.attention != "mha":
        raise ValueError(f"mla_twin: cfg.attention={cfg.attention!r}: expected 'mha'")
    hd = cfg.d_model // cfg.n_heads
    rope_dim = rope_dim if rope_dim is not None else max(2, hd // 4 * 2)
    target = attention_params(cfg)
    best = min(range(1, 4 * cfg.d_model + 1),
               key=lambda r: abs(attention_params(replace(cfg, attention="mla", kv_rank=r, rope_dim=rope_dim,
                                                          q_rank=q_rank)) - target))
    return replace(cfg, attention="mla", kv_rank=best, rope_dim=rope_dim, q_rank=q_rank)


def train_one(cfg: ModelConfig, train_cfg: TrainConfig, seed: int, device="cpu", progress: bool = True,
              desc: str = "train", exact_match_problems: int = 500) -> dict:
    """Train a fresh model on the course mixture (as moe_lab.training.recipe.train_course_model does) and summarise it."""
    train_cfg = replace(train_cfg, seed=seed)
    seed_everything(seed)
    model = Transformer(cfg).to(device)
    batches = batch_fn(course_mixture(), train_cfg.batch_size, train_cfg.seq_len, seed=seed, device=device)
    hist = train(model, batches, train_cfg, progress=progress, desc=desc)
    acc = exact_match(model, course_task(), n=exact_match_problems) if exact_match_problems else None
    return {"seed": seed, "eval_step": hist.eval_step, "val_loss": hist.val_loss, "final_val_loss": hist.final_val_loss,
            "train_seconds": hist.time[-1], "ms_per_step": 1e3 * hist.time[-1] / len(hist.time),
            "heldout_exact_match": acc, "model": model, "history": hist}


def summarize(runs: dict) -> dict:
    """Per-seed differences MLA - MHA of the final validation loss, and who wins by how much."""
    by_seed = {r["seed"]: r for r in runs["mha"]}
    diffs = [m["final_val_loss"] - by_seed[m["seed"]]["final_val_loss"] for m in runs["mla"] if m["seed"] in by_seed]
    mean = {k: statistics.mean(r["final_val_loss"] for r in v) for k, v in runs.items()}
    spread = {k: max(r["final_val_loss"] for r in v) - min(r["final_val_loss"] for r in v) for k, v in runs.items()}
    if all(d < 0 for d in diffs):
        verdict = "MLA lower on every seed"
    elif all(d > 0 for d in diffs):
        verdict = "MHA lower on every seed"
    else:
        verdict = "no consistent winner across seeds"
    return {"diff_mla_minus_mha": diffs, "mean_diff": statistics.mean(diffs), "mean_final_val_loss": mean,
            "seed_spread": spread, "verdict": verdict}


def compare(preset_name: str, seeds: Sequence[int], steps: Optional[int] = None, device="cpu",
            progress: bool = True, exact_match_problems: int = 500, on_seed: Optional[Callable[[dict], None]] = None) -> dict:
    """Train MHA and its equal-parameter MLA twin on every seed; returns a record (models not included).

    on_seed(record so far) is called after each seed's pair of runs (the command writes it, so a run
    stopped from outside keeps the seeds it finished)."""
    p = preset(preset_name)
    train_cfg = replace(p.train, steps=p.train.steps if steps is None else steps)
    cfgs = {"mha": p.moe, "mla": mla_twin(p.moe)}
    hd = p.moe.d_model // p.moe.n_heads
    info = {}
    for name, cfg in cfgs.items():
        info[name] = {"config": cfg.to_dict(), "params": Transformer(cfg).n_params(),
                      "attention_params_per_block": attention_params(cfg),
                      "cache_bytes_per_token_fp32": cache_bytes_per_token(name, cfg.n_layers, cfg.n_heads, hd, 4,
                                                                          kv_rank=cfg.kv_rank, rope_dim=cfg.rope_dim)}
    runs = {name: [] for name in cfgs}
    for seed in seeds:
        for name, cfg in cfgs.items():
            r = train_one(cfg, train_cfg, seed, device, progress, f"{name} seed {seed}", exact_match_problems)
            r.pop("model"), r.pop("history")
            runs[name].append(r)
        if on_seed is not None:
            on_seed({"preset": preset_name, "steps": train_cfg.steps, "seeds": list(seeds)[:len(runs["mha"])],
                     "models": info, "runs": runs, "recipe": recipe(train_cfg), "summary": summarize(runs)})
    return {"preset": preset_name, "steps": train_cfg.steps, "seeds": list(seeds), "models": info, "runs": runs,
            "recipe": recipe(train_cfg), "summary": summarize(runs)}


def recipe(train_cfg: TrainConfig) -> dict:
    """What the runs were trained on and how (beside the model configs): a record whose recipe differs
    from today's preset is stale even when the models are the same."""
    from dataclasses import asdict

    mixture = course_mixture()
    return {"train": asdict(train_cfg) | {"seed": None},  # the seed is per run
            "mixture": {name: round(float(p), 6) for name, p in zip(mixture.names, mixture.probs)}}


def is_current(record: dict, preset_name: str = "cpu") -> bool:
    """Whether a recorded comparison was made with today's preset: its models, steps and training recipe."""
    p = preset(preset_name)
    return (record["models"]["mha"]["config"] == p.moe.to_dict() and record["steps"] == p.train.steps
            and record.get("recipe") == json.loads(json.dumps(recipe(p.train))))


def load_record(preset_name: str = "cpu") -> Optional[dict]:
    """The recorded comparison data/records/mla_vs_mha_<preset>.json, or None where it is not there (e.g. Colab)."""
    path = paths.data_path("records", f"mla_vs_mha_{preset_name}.json")
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_lab mla-study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu", choices=["ci", "cpu", "gpu"])
    ap.add_argument("--seeds", type=seed_list_arg, default=[0, 1], help="seeds, e.g. 0,1 or 0-4 (at least 2 for a spread)")
    ap.add_argument("--steps", type=positive_int, help="override the preset's number of steps (>= 1)")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--out", help="JSON output (default runs/mla_study/<preset>.json)")
    ap.add_argument("--record", action="store_true", help=f"also write {RECORD_DIR}/mla_vs_mha_<preset>.json")
    args = ap.parse_args(argv)
    seeds = args.seeds
    try:
        require_device(args.device)
    except ValueError as e:
        ap.error(f"argument --device: {e}")
    outs = [Path(args.out) if args.out else paths.runs_path("mla_study", f"{args.preset}.json")]
    if args.record:
        outs.append(RECORD_DIR / f"mla_vs_mha_{args.preset}.json")
    check_outputs(ap, {"--out": outs[0], "--record": outs[1] if args.record else None})  # before any training
    t0 = time.perf_counter()
    record = machine.environment_record(args.device, " ".join(["python -m moe_lab mla-study", *(sys.argv[1:] if argv is None else argv)]))
    record["cpu_threads"] = torch.get_num_threads()

    def write_partial(done: dict) -> None:  # after each seed: a run stopped from outside keeps the seeds it finished
        write_record({**record, **done, "partial": f"{len(done['seeds'])} of {len(seeds)} seeds done",
                      "wall_seconds": time.perf_counter() - t0}, outs[0], quiet=True)

    record.update(compare(args.preset, seeds, args.steps, args.device, on_seed=write_partial))
    record["wall_seconds"] = time.perf_counter() - t0
    s = record["summary"]
    print(f"final validation loss, mean over seeds {seeds}: MHA {s['mean_final_val_loss']['mha']:.4f}, "
          f"MLA {s['mean_final_val_loss']['mla']:.4f}; MLA - MHA per seed: "
          + ", ".join(f"{d:+.4f}" for d in s["diff_mla_minus_mha"]) + f" ({s['verdict']})")
    write_record(record, outs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
