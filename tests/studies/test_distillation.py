"""The distillation study (moe_lab.studies.distillation, notebook 12): the masked SFT loss, the verifier-filtered
dataset, the three methods under one budget, the record's schema and the command line's refusals.

Tiny models and budgets of a fraction of a second. Run:
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/studies/test_distillation.py -q
"""
import json
import os
import random

import pytest
import torch

from moe_lab.studies import distillation as D
from moe_lab.training import sft
from moe_lab.core.config import ModelConfig
from moe_lab.data import course_task
from moe_lab.model import Transformer

TASK = course_task()


def tiny_student(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=32, d_ff=32, ffn="dense"))


def fake_cache(n=40):
    """A teacher cache whose samples are the right answer, a wrong one and a malformed one."""
    problems = TASK.problems(n, "train", seed=5)
    samples = [[p.answer + "\n", p.answer + "\n", ("9" if p.answer[0] != "9" else "8") + p.answer[1:] + "\n", p.answer]
               for p in problems]
    return {"problems": [[p.a, p.b] for p in problems], "samples": samples}


# ---- the verifier-filtered dataset ------------------------------------------------------------------
def test_filtered_dataset_holds_only_verified_well_formed_distinct_completions():
    cache = fake_cache(30)
    problems = D.cache_problems(cache, TASK)
    data = sft.verified_dataset(TASK, problems, cache["samples"])
    assert len(data) == 30  # one per problem: the duplicate, the wrong one and the one without newline dropped
    for p, c in data:
        assert TASK.verify(c, p) and TASK.format_ok(c) and c == p.answer + "\n"
    assert len({(p.prompt, c) for p, c in data}) == len(data)


def test_filtered_dataset_drops_a_problem_with_no_right_sample_and_keeps_distinct_right_ones():
    p, q = TASK.make(12, 34), TASK.make(5, 7)
    # "64" reversed is 46 = 12 + 34; "640" reversed is 046 = 46 too: a different, still right, completion
    data = sft.verified_dataset(TASK, [p, q], [["64\n", "640\n", "65\n"], ["31\n", "x\n"]])
    assert data == [(p, "64\n"), (p, "640\n")]
    with pytest.raises(ValueError, match="2 problems but 1 lists"):
        sft.verified_dataset(TASK, [p, q], [["64\n"]])


# ---- the SFT loss counts completion tokens only ---------------------------------------------------
def test_completion_batch_masks_exactly_the_completion_targets():
    tok = D.TOKENIZER
    p = TASK.make(123, 45)
    x, y, mask = sft.completion_batch([(p, p.answer + "\n"), (TASK.make(1, 2), "3\n")])
    row = [tok.newline_id] + tok.encode(p.prompt) + tok.encode(p.answer + "\n")
    assert x[0].tolist() == row[:-1] and y[0].tolist() == row[1:]
    masked = [t for t, m in zip(y[0].tolist(), mask[0].tolist()) if m]
    assert tok.decode(masked, skip_special=False) == p.answer + "\n"
    assert tok.decode([t for t, m in zip(y[1].tolist(), mask[1].tolist()) if m], skip_special=False) == "3\n"
    assert mask[1, len("\n1+2=3\n") - 1:].sum() == 0  # padding carries no loss


def test_sft_loss_ignores_prompt_tokens():
    model = tiny_student()
    pairs = [(p, p.answer + "\n") for p in TASK.problems(6, "train", seed=1)]
    x, y, mask = sft.completion_batch(pairs)
    loss = sft.sft_loss(model, x, y, mask)
    y2 = y.clone()
    y2[mask == 0] = (y2[mask == 0] + 7) % model.cfg.vocab_size  # different targets where the prompt is
    assert torch.allclose(sft.sft_loss(model, x, y2, mask), loss)
    y3 = y.clone()
    y3[mask == 1] = (y3[mask == 1] + 7) % model.cfg.vocab_size
    assert not torch.allclose(sft.sft_loss(model, x, y3, mask), loss)
    logits = model(x)[0]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    assert torch.allclose(loss, nll[mask == 1].mean(), atol=1e-6)


# ---- the pool and the methods under the budget -----------------------------------------------------
def test_pool_task_draws_training_problems_from_its_pool_only():
    pool = TASK.problems(5, "train", seed=3)
    pt = D.PoolTask(TASK, pool)
    rng = random.Random(0)
    assert {pt.sample(rng, "train") for _ in range(200)} == set(pool)
    assert TASK.is_heldout(*(lambda p: (p.a, p.b))(pt.sample(rng, "heldout")))
    assert pt.max_answer_len == TASK.max_answer_len
    assert D.seed_pool(40, 10, 0) == D.seed_pool(40, 10, 0) != D.seed_pool(40, 10, 1)
    with pytest.raises(ValueError, match="holds only 40"):
        D.seed_pool(40, 41, 0)


@pytest.mark.parametrize("method", D.METHODS)
def test_each_method_runs_on_its_pool_and_respects_the_budget(method, monkeypatch):
    from moe_lab.training import grpo

    monkeypatch.setattr(D, "grpo_config", lambda seed: grpo.GRPOConfig(prompts_per_step=4, group_size=2, seed=seed))
    budget = D.Budget(seconds=0.4, problems=20, evals=2, eval_problems=8)
    sft_cfg = sft.SFTConfig(batch_size=8, prompts_per_step=4, group_size=2)
    student = tiny_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    r = D.run_method(method, student, fake_cache(), budget, seed=0, task=TASK, sft=sft_cfg)
    assert r["method"] == method and r["distinct_problems"] == 20
    assert budget.seconds <= r["seconds"] < budget.seconds + 5  # stops after the step that crosses the budget
    assert r["eval_seconds"] == [0.0, 0.2, 0.4] and len(r["eval_accuracy"]) == 3
    assert r["steps"] >= 1 and r["problem_visits"] >= r["steps"]
    if method != "expert_iteration":  # (a random tiny student may sample nothing right: no update)
        assert r["updates"] >= 1
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # a copy was trained


def test_distill_trains_on_the_seeds_pool_and_learns(monkeypatch):
    seen = []
    real = sft.SFTLearner.step
    monkeypatch.setattr(sft.SFTLearner, "step", lambda self, pairs: seen.extend(p for p, _ in pairs) or real(self, pairs))
    cache = fake_cache()
    budget = D.Budget(seconds=0.3, problems=10, evals=1, eval_problems=4)
    D.run_method("distill", tiny_student(), cache, budget, seed=2, task=TASK, sft=sft.SFTConfig(batch_size=4))
    problems = D.cache_problems(cache, TASK)
    pool = {problems[i] for i in D.seed_pool(len(problems), 10, 2)}
    assert seen and set(seen) <= pool


def test_methods_order_rotates_with_the_seed():
    orders = [D.methods_order(D.METHODS, s) for s in range(len(D.METHODS))]
    assert {o[0] for o in orders} == set(D.METHODS) and all(sorted(o) == sorted(D.METHODS) for o in orders)


def test_budget_refuses_bad_values():
    for kwargs, field in ((dict(seconds=0), "seconds"), (dict(seconds=float("nan")), "seconds"),
                          (dict(problems=0), "problems"), (dict(evals=1.5), "evals")):
        with pytest.raises(ValueError, match=f"Budget.{field}"):
            D.Budget(**kwargs)


# ---- the record -------------------------------------------------------------------------------------
def _record():
    runs = [{"method": m, "seed": s, "eval_seconds": [0.0, 1.0], "eval_accuracy": [0.5, 0.5 + 0.1 * s], "seconds": 1.02,
             "steps": 3, "problem_visits": 30, "distinct_problems": 10, "updates": 3, "threads": 1}
            for m in ("grpo", "distill") for s in (0, 1)]
    return {"command": "x", "commit": None, "machine": {}, "torch": "2", "date": "2026-01-01", "budget":
            {"seconds": 1.0, "problems": 10}, "sizes": {}, "teacher": {}, "student": {}, "methods": ["grpo", "distill"],
            "seeds": [0, 1], "runs": runs, "summary": D.summarize(runs)}


def test_record_schema_and_summary():
    rec = _record()
    D.validate_record(rec)
    s = rec["summary"]["distill"]
    assert s["final"] == [0.5, 0.6] and s["min"] == 0.5 and s["max"] == 0.6 and abs(s["mean"] - 0.55) < 1e-9


@pytest.mark.parametrize("breaks, match", [
    (lambda r: r.pop("commit"), "lacks \\['commit'\\]"),
    (lambda r: r["runs"][0].pop("problem_visits"), "runs\\[0\\] lacks"),
    (lambda r: r["runs"][1].update(method="sft"), "method='sft'"),
    (lambda r: r["runs"][2].update(seconds=0.5), "less than the budget"),
    (lambda r: r["runs"][3].update(distinct_problems=11), "used 11 problems"),
    (lambda r: r["runs"][0].update(eval_accuracy=[0.5]), "1 eval_accuracy"),
])
def test_record_validation_names_what_is_wrong(breaks, match):
    rec = _record()
    breaks(rec)
    with pytest.raises(ValueError, match=match):
        D.validate_record(rec)


def test_shipped_record_is_valid_with_five_seeds_per_method():
    rec = D.load_record()
    if rec is None:
        pytest.skip("no data/records/distillation_cpu.json in this checkout")
    D.validate_record(rec)
    for m in rec["methods"]:
        assert len(rec["summary"][m]["final"]) >= 5, m


# ---- the command line refuses bad arguments before any work ------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before the arguments were checked")
    for name in ("load_student", "load_teacher_cache", "train_student", "build_teacher", "compare"):
        monkeypatch.setattr(D, name, boom)


@pytest.mark.parametrize("argv, words", [
    (["--seconds", "-1"], "--seconds"), (["--seconds", "nan"], "--seconds"), (["--seconds", "abc"], "--seconds"),
    (["--methods", "grpo,sft"], "--methods"), (["--seeds", "x"], "--seeds"), (["--problems", "0"], "--problems"),
    (["--threads", "0"], "--threads"), (["bogus"], "invalid choice"), (["--out", "record.txt"], "--out"),
    (["one-seed", "--seeds", "0,1", "--out", "x.json"], "one-seed"),
])
def test_bad_arguments_exit_2_naming_them(argv, words, no_work, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        D.main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_out_that_is_a_folder_or_read_only_is_refused(no_work, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        D.main(["--out", str(tmp_path)])
    assert exc.value.code == 2 and "is a folder" in capsys.readouterr().err
    ro = tmp_path / "ro.json"
    ro.write_text("{}")
    ro.chmod(0o444)  # refused even when running as root, who could write it anyway
    with pytest.raises(SystemExit) as exc:
        D.main(["--out", str(ro)])
    assert exc.value.code == 2 and "read-only" in capsys.readouterr().err


def test_out_in_a_read_only_folder_is_refused(no_work, capsys, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exc:
            D.main(["--out", str(folder / "r.json")])
        assert exc.value.code == 2 and "not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)


def test_one_seed_writes_its_runs(monkeypatch, tmp_path):
    from moe_lab.training import grpo

    monkeypatch.setattr(D, "grpo_config", lambda seed: grpo.GRPOConfig(prompts_per_step=4, group_size=2, seed=seed))
    monkeypatch.setattr(D, "load_teacher_cache", lambda path=None: fake_cache())
    monkeypatch.setattr(D, "load_student", lambda device="cpu": (tiny_student(), {}))
    out = tmp_path / "runs.json"
    assert D.main(["one-seed", "--seeds", "1", "--methods", "distill,grpo", "--seconds", "0.2", "--problems", "10",
                   "--evals", "1", "--eval-problems", "4", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())
    assert [r["method"] for r in runs] == ["grpo", "distill"]  # rotated by the seed
    assert all(r["seed"] == 1 and r["seconds"] >= 0.2 for r in runs)


def test_spread_curves_and_ranking_read_the_seeds():
    rec = _record()  # distill ends at 0.5 / 0.6 over seeds, grpo the same: overlapping ranges
    c = D.spread_curves(rec)
    assert c["distill"]["seconds"] == [0.0, 1.0] and c["distill"]["min"] == [0.5, 0.5]
    assert c["distill"]["max"][1] == pytest.approx(0.6) and c["distill"]["mean"][1] == pytest.approx(0.55)
    assert D.ranking(rec) == []
    for r in rec["runs"]:
        if r["method"] == "distill" and r["seed"] == 1:
            r["eval_accuracy"][-1] = 0.7  # distill 0.5 / 0.7: a higher mean, but the ranges still overlap
    rec["summary"] = D.summarize(rec["runs"])
    assert D.ranking(rec) == []
    for r in rec["runs"]:
        if r["method"] == "distill":
            r["eval_accuracy"][-1] += 0.2  # now 0.7 / 0.8, above grpo's 0.5 / 0.6 on every seed
    rec["summary"] = D.summarize(rec["runs"])
    assert D.ranking(rec) == [("distill", "grpo")]
