"""moe_lab.studies.bench_generate and moe_lab.studies.mla_study: each measurement measures what it says on a tiny model,
the commands write their records where they say (never into data/ without --record), MLA's twin has
the parameters of its MHA model, and the verdict names who won on every seed. No timing is asserted.

Run: .venv/bin/python -m pytest tests/studies/test_bench_generate.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lab.studies import bench_generate, mla_study
from moe_lab.core.config import ModelConfig, MoEConfig, preset
from moe_lab.data import course_task
from moe_lab.model import Transformer
from moe_lab.model.transformer import Block

ROOT = Path(__file__).resolve().parents[2]


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=99, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=32, ffn="moe",
                      moe=MoEConfig(n_experts=4, top_k=2, d_expert=16))
    return Transformer(cfg).eval()


def test_rollout_times_pairs_runs_and_compares_completions():
    task = course_task()
    problems = task.problems(6, "train", seed=1)
    r = bench_generate.rollout_times(tiny_model(), problems, group_size=3, temperature=0.7, max_new_tokens=4, repeats=2)
    assert len(r["seconds"]["uncached"]) == len(r["seconds"]["cached"]) == 2
    assert r["speedup_per_pair"] == pytest.approx([u / c for u, c in zip(r["seconds"]["uncached"], r["seconds"]["cached"])])
    assert r["same_completions"] is True and r["problems"] == 6 and r["group_size"] == 3
    with pytest.raises(ValueError, match="repeats=0"):
        bench_generate.rollout_times(tiny_model(), problems, repeats=0)


def test_rollout_times_notices_when_the_two_paths_disagree(monkeypatch):
    import moe_lab.training.evaluation as ev

    real = ev.generate_completions

    def cache_changes_the_answer(model, problems, *args, use_cache=True, **kw):
        out = real(model, problems, *args, use_cache=use_cache, **kw)
        return [(p, c + [3]) for p, c in out] if use_cache else out

    monkeypatch.setattr(bench_generate, "generate_completions", cache_changes_the_answer)  # the name it calls
    r = bench_generate.rollout_times(tiny_model(), course_task().problems(4, "train", seed=2), group_size=2,
                                     max_new_tokens=3, repeats=1)
    assert r["same_completions"] is False


def test_throughput_and_per_token_rows():
    model = tiny_model()
    row = bench_generate.throughput(model, batch=2, prompt=4, new=6, repeats=1)
    assert row["cached_tokens_per_s"] > 0 and row["speedup"] == pytest.approx(row["cached_tokens_per_s"] / row["uncached_tokens_per_s"])
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        bench_generate.throughput(model, batch=1, prompt=20, new=20)
    rows = bench_generate.per_token_times(model.cfg, [8, 40], repeats=1)  # 40 > max_seq_len: the model is widened
    assert [r["context"] for r in rows] == [8, 40] and all(r["cached_ms"] > 0 and r["uncached_ms"] > 0 for r in rows)


def test_bench_generate_command_writes_its_record_outside_data(tmp_path):
    out = tmp_path / "gen.json"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "moe_lab", "bench-generate", "--quick", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    for key in ("device", "torch", "date", "command", "cpu_threads", "model", "rollouts", "throughput", "per_token"):
        assert key in rec, key
    assert rec["rollouts"]["same_completions"] and rec["rollouts"]["problems"] == 32 and rec["rollouts"]["group_size"] == 8
    assert rec["cpu_threads"] == 1 or torch.cuda.is_available()
    assert not (tmp_path / "data").exists()  # --record was not given


def test_mla_twin_has_the_parameters_of_its_mha_model():
    for name in ("ci", "cpu", "gpu"):
        mha = preset(name).moe
        mla = mla_study.mla_twin(mha)
        assert mla.attention == "mla" and mla.rope_dim == (mha.d_model // mha.n_heads) // 2
        for cfg in (mha, mla):  # the formula counts what the module holds
            assert mla_study.attention_params(cfg) == sum(p.numel() for p in Block(cfg, 0).attn.parameters())
        assert abs(Transformer(mla).n_params() - Transformer(mha).n_params()) <= 0.01 * Transformer(mha).n_params()
    q = mla_study.mla_twin(preset("ci").moe, q_rank=16)
    assert q.q_rank == 16 and mla_study.attention_params(q) == sum(p.numel() for p in Block(q, 0).attn.parameters())
    with pytest.raises(ValueError, match="attention='mla'"):
        mla_study.mla_twin(mla)


def test_summary_names_the_winner_only_when_every_seed_agrees():
    def runs(mha, mla):
        return {"mha": [{"seed": i, "final_val_loss": v} for i, v in enumerate(mha)],
                "mla": [{"seed": i, "final_val_loss": v} for i, v in enumerate(mla)]}

    assert mla_study.summarize(runs([1.0, 1.1], [1.2, 1.3]))["verdict"] == "MHA lower on every seed"
    assert mla_study.summarize(runs([1.0, 1.1], [0.9, 1.0]))["verdict"] == "MLA lower on every seed"
    s = mla_study.summarize(runs([1.0, 1.1], [0.9, 1.2]))
    assert s["verdict"] == "no consistent winner across seeds" and s["diff_mla_minus_mha"] == pytest.approx([-0.1, 0.1])


def test_mla_study_command_trains_both_on_every_seed(tmp_path):
    out = tmp_path / "study.json"
    assert mla_study.main(["--preset", "ci", "--seeds", "0,1", "--steps", "3", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["seeds"] == [0, 1] and rec["steps"] == 3
    assert [r["seed"] for r in rec["runs"]["mha"]] == [0, 1] == [r["seed"] for r in rec["runs"]["mla"]]
    assert rec["models"]["mla"]["cache_bytes_per_token_fp32"] < rec["models"]["mha"]["cache_bytes_per_token_fp32"]
    assert len(rec["summary"]["diff_mla_minus_mha"]) == 2
    with pytest.raises(SystemExit) as info:
        mla_study.main(["--seeds", "a,b", "--out", str(out)])
    assert info.value.code == 2


def test_the_recorded_comparison_is_complete():
    rec = mla_study.load_record("cpu")
    if rec is None:
        pytest.skip("no data/records/mla_vs_mha_cpu.json")
    assert len(rec["seeds"]) >= 2  # a claim about who wins rests on a spread
    for name in ("mha", "mla"):
        assert [r["seed"] for r in rec["runs"][name]] == rec["seeds"]
    assert rec["summary"] == mla_study.summarize(rec["runs"])


def test_the_recorded_comparison_was_made_with_todays_preset():
    """A record from another recipe (steps, data mix) is stale even when the model configs match."""
    rec = mla_study.load_record("cpu")
    if rec is None:
        pytest.skip("no data/records/mla_vs_mha_cpu.json")
    assert mla_study.is_current(rec), "re-run: python -m moe_lab mla-study --preset cpu --seeds 0,1,2 --record"
    for change in ({"steps": rec["steps"] + 1},
                   {"recipe": {**rec["recipe"], "mixture": {"code": 0.4, "arith": 0.6}}},
                   {"recipe": None}):
        assert not mla_study.is_current({**rec, **change}), change
