"""Every command checks the files it will write before it works (a folder, a path under a file, a folder
it may not write in is an argparse usage error, status 2, naming the argument), writes them atomically
(no temporary file left when the final rename fails), and the long ones keep what they finished when
stopped. rl-spread and mla-study refuse bad arguments before loading anything.

Run: .venv/bin/python -m pytest tests/studies/test_reliability_outputs.py -q
"""
import json
import os
from pathlib import Path

import pytest

import moe_lab.core.files as files
import moe_lab.studies.bench as bench
import moe_lab.studies.bench_generate as bench_generate
import moe_lab.studies.mla_study as mla_study
import moe_lab.studies.recipe_spread as recipe_spread
import moe_lab.studies.rl_spread as rl_spread
import moe_lab.studies.tune as tune
from moe_lab.studies import profiling


def _no_work(*args, **kwargs):
    raise AssertionError("work started despite an output path that cannot be written")


def _tmp_left(folder: Path) -> list:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(params=["folder", "under_a_file", "read_only"])
def bad_out(request, tmp_path, monkeypatch):
    """(path that cannot be written, words its refusal says)."""
    if request.param == "folder":
        (tmp_path / "x.json").mkdir()
        return tmp_path / "x.json", "is a folder"
    if request.param == "under_a_file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "x.json", "is a file, so no folder can be made there"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access
    # root may write in a 0o555 folder: say what a read-only filesystem says
    monkeypatch.setattr(files.os, "access", lambda p, mode, *a, **k: False if Path(p) == ro else real(p, mode, *a, **k))
    return ro / "x.json", "is not writable"


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    return err


def test_tune_checks_out_and_timings_before_tuning(bad_out, capsys, monkeypatch):
    from moe_lab.studies import kernel_sweep  # the kernels: imported here after conftest chose the interpreter

    monkeypatch.setattr(kernel_sweep, "tune_bucket", _no_work)
    monkeypatch.setattr(kernel_sweep, "precompile", _no_work)
    path, words = bad_out
    base = ["--device", "cpu", "--space", "quick", "--shapes", "tiny", "--tokens", "64", "--no-progress"]
    err = _usage_error(tune.main, base + ["--out", str(path)], capsys)
    assert f"argument --out: {path}: " in err and words in err
    err = _usage_error(tune.main, base + ["--out", str(path.parent.parent / "ok.json"), "--timings", str(path)], capsys)
    assert f"argument --timings: {path}: " in err and words in err


def test_bench_checks_out_before_measuring(bad_out, capsys, monkeypatch):
    monkeypatch.setattr(profiling, "measure_ceilings", _no_work)
    monkeypatch.setattr(bench, "run", _no_work)
    path, words = bad_out
    err = _usage_error(bench.main, ["--quick", "--device", "cpu", "--no-progress", "--out", str(path)], capsys)
    assert f"argument --out: {path}: " in err and words in err


def test_bench_generate_checks_out_before_measuring(bad_out, capsys, monkeypatch):
    monkeypatch.setattr(bench_generate, "run", _no_work)
    path, words = bad_out
    err = _usage_error(bench_generate.main, ["--quick", "--device", "cpu", "--out", str(path)], capsys)
    assert f"argument --out: {path}: " in err and words in err


def test_mla_study_checks_out_before_training(bad_out, capsys, monkeypatch):
    monkeypatch.setattr(mla_study, "compare", _no_work)
    path, words = bad_out
    err = _usage_error(mla_study.main, ["--preset", "ci", "--steps", "1", "--seeds", "0", "--out", str(path)], capsys)
    assert f"argument --out: {path}: " in err and words in err


def test_rl_spread_checks_out_before_any_run(bad_out, capsys, monkeypatch):
    monkeypatch.setattr(rl_spread, "run_one", _no_work)
    path, words = bad_out
    err = _usage_error(rl_spread.main, ["--steps", "1", "--out", str(path)], capsys)
    assert f"argument --out: {path}: " in err and words in err


def test_recipe_spread_checks_out_before_any_run(bad_out, capsys, monkeypatch):
    monkeypatch.setattr(recipe_spread, "recipe_spread", _no_work)
    path, words = bad_out
    err = _usage_error(recipe_spread.main, ["--preset", "ci", "--out", str(path)], capsys)
    assert f"argument --out: {path}: " in err and words in err


# --- the atomic writer: nothing left behind when the final rename fails -----------------------------------
def test_no_temporary_file_is_left_when_the_target_became_a_folder_after_the_check(tmp_path):
    out = tmp_path / "r.json"
    files.check_output_path(out)
    out.mkdir()  # made by someone else between the check and the write
    with pytest.raises(IsADirectoryError):
        files.write_record({"a": 1}, out, quiet=True)
    assert _tmp_left(tmp_path) == []


def _fake_rl_run(mode, seed, advantage, steps=None):
    return {"mode": mode, "seed": seed, "advantage": advantage, "steps": steps, "start": 0.5, "end": 0.6,
            "curve": [], "seconds": 0.0, "threads": 1}


def test_rl_spread_leaves_no_temporary_file_when_its_out_became_a_folder(tmp_path, monkeypatch):
    out = tmp_path / "r.json"

    def run_then_block(*a, **k):
        out.mkdir(exist_ok=True)
        return _fake_rl_run(*a, **k)

    monkeypatch.setattr(rl_spread, "start_checkpoint", lambda: tmp_path / "m.safetensors")
    monkeypatch.setattr(rl_spread, "run_one", run_then_block)
    with pytest.raises(IsADirectoryError):
        rl_spread.main(["--steps", "1", "--seeds", "0", "--out", str(out)])
    assert _tmp_left(tmp_path) == []


# --- long commands keep what they finished -----------------------------------------------------------------
def test_rl_spread_stopped_after_one_run_keeps_it(tmp_path, monkeypatch):
    out, calls = tmp_path / "r.json", []

    def run_or_stop(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return _fake_rl_run(*a, **k)

    monkeypatch.setattr(rl_spread, "start_checkpoint", lambda: tmp_path / "m.safetensors")
    monkeypatch.setattr(rl_spread, "run_one", run_or_stop)
    with pytest.raises(KeyboardInterrupt):
        rl_spread.main(["--steps", "3", "--seeds", "0-2", "--out", str(out)])
    kept = json.loads(out.read_text())
    assert [r["seed"] for r in kept["runs"]] == [0] and kept["partial"] == "1 of 3 runs done"


def test_rl_spread_writes_the_whole_record_without_partial(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(rl_spread, "start_checkpoint", lambda: tmp_path / "m.safetensors")
    monkeypatch.setattr(rl_spread, "run_one", _fake_rl_run)
    assert rl_spread.main(["--steps", "3", "--seeds", "0,1", "--advantage", "group,batch_mean", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert len(rec["runs"]) == 4 and "partial" not in rec and set(rec["summary"]) == {"group", "batch_mean"}
    assert all(r["steps"] == 3 for r in rec["runs"])


def test_mla_study_stopped_after_one_seed_keeps_it(tmp_path, monkeypatch):
    out, seen = tmp_path / "m.json", []

    def fake_train_one(cfg, train_cfg, seed, *a, **k):
        if seed == 1:
            raise KeyboardInterrupt
        seen.append(seed)
        return {"seed": seed, "final_val_loss": 2.0 + 0.1 * (cfg.attention == "mla"), "model": None, "history": None}

    monkeypatch.setattr(mla_study, "train_one", fake_train_one)
    with pytest.raises(KeyboardInterrupt):
        mla_study.main(["--preset", "ci", "--steps", "2", "--seeds", "0,1", "--device", "cpu", "--out", str(out)])
    kept = json.loads(out.read_text())
    assert kept["seeds"] == [0] and kept["partial"] == "1 of 2 seeds done"
    assert [r["seed"] for r in kept["runs"]["mla"]] == [0] and kept["steps"] == 2


# --- rl-spread and mla-study arguments --------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "argument --steps: 0"),  # `steps or preset.steps` ran the preset's 100 steps
    (["--steps", "-1"], "argument --steps: -1"),
    (["--steps", "x"], "argument --steps: 'x'"),
    (["--seeds", "abc"], "argument --seeds: 'abc'"),
    (["--seeds", "-1"], "argument --seeds: '-1'"),
    (["--seeds", str(2**32)], "argument --seeds"),
    (["--advantage", "bogus"], "argument --advantage: 'bogus': expected a comma-separated list from"),
    (["--advantage", "group,"], "argument --advantage"),
])
def test_rl_spread_names_a_bad_argument_before_loading_anything(args, words, capsys, monkeypatch):
    monkeypatch.setattr(rl_spread, "run_one", _no_work)
    monkeypatch.setattr(rl_spread, "load_checkpoint", _no_work)
    monkeypatch.setattr(rl_spread, "shipped_checkpoint", _no_work)
    assert words in _usage_error(rl_spread.main, args, capsys)


def test_rl_spread_without_a_shipped_checkpoint_names_it(capsys, monkeypatch, tmp_path):
    run_one = rl_spread.run_one
    monkeypatch.setattr(rl_spread, "shipped_checkpoint", lambda name: None)
    monkeypatch.setattr(rl_spread, "run_one", _no_work)
    with pytest.raises(SystemExit) as info:
        rl_spread.main(["--steps", "1", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "no shipped checkpoint" in err and "moe_cpu.safetensors" in err
    with pytest.raises(FileNotFoundError, match="moe_cpu.safetensors"):
        run_one("ci", 0, "group", 1)


def test_rl_spread_run_one_passes_steps_0_to_the_config_which_names_it(monkeypatch, tmp_path):
    from moe_lab.core.config import preset
    from moe_lab.model import Transformer

    monkeypatch.setattr(rl_spread, "start_checkpoint", lambda: tmp_path / "m.safetensors")
    monkeypatch.setattr(rl_spread, "load_checkpoint", lambda *a, **k: (Transformer(preset("ci").moe), {}))
    monkeypatch.setattr(rl_spread.grpo, "GRPOTrainer", _no_work)
    with pytest.raises(ValueError, match=r"GRPOConfig\.steps=0"):
        rl_spread.run_one("ci", 0, "group", steps=0)


@pytest.mark.parametrize("seeds", ["-1", "abc", "0,", str(2**32)])
def test_mla_study_seeds_are_a_usage_error(seeds, capsys, monkeypatch):
    monkeypatch.setattr(mla_study, "compare", _no_work)
    assert "argument --seeds" in _usage_error(mla_study.main, ["--preset", "ci", "--seeds", seeds], capsys)
