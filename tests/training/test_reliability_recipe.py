"""`python -m moe_lab train` finishes for any --steps >= 1 and every preset: when no check ran, or the
check set never reached the target, it keeps the model at the end of training, says so on stderr and
in the figures, and writes its checkpoint; it never fails after the work is done.

Run: .venv/bin/python -m pytest tests/training/test_reliability_recipe.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import moe_lab.training.recipe as recipe
from moe_lab.training.checkpoint import load_checkpoint
from moe_lab.training.loop import History

ROOT = Path(__file__).resolve().parents[2]


def test_one_step_keeps_the_end_of_training_and_writes_everything(tmp_path):
    """Every --steps below 25 (no check ran) crashed with an IndexError after training."""
    out, figures = tmp_path / "m.safetensors", tmp_path / "f.json"
    run = subprocess.run([sys.executable, "-m", "moe_lab", "train", "--preset", "ci", "--steps", "1", "--out", str(out),
                          "--figures", str(figures)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "keeping the model at the end of training (step 1): no check ran" in run.stderr
    f = json.loads(figures.read_text())
    assert f["snapshot_reached_target"] is False and f["snapshot"].startswith("end of training (step 1)")
    assert f["snapshot_step"] == 1 and f["checks"] == [] and f["check_exact_match"] is None and f["tries"] == 1
    model, _ = load_checkpoint(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _fake_train(model, batches, cfg, progress=True, desc="", on_step=None):
    """train() without the training: calls the hook at every step, as train does."""
    hist = History()
    for step in range(cfg.steps):
        hist.step.append(step + 1)
        hist.time.append(0.01 * (step + 1))
        on_step(step, hist)
    hist.val_loss.append(4.0)
    return hist


@pytest.fixture
def never_reached(monkeypatch):
    """Training that never reaches the target: every check answers 10 % right."""
    monkeypatch.setattr(recipe, "train", _fake_train)
    monkeypatch.setattr(recipe, "exact_match", lambda *a, **k: 0.10)


def test_ci_preset_that_never_reaches_the_target_is_not_retried_and_does_not_raise(never_reached, tmp_path, capsys):
    """The ci preset ran 3 x 600 steps, then RuntimeError, and wrote nothing."""
    out = tmp_path / "ci.safetensors"
    snap, hist, f = recipe.train_course_model("ci", out=str(out), progress=False)
    err = capsys.readouterr().err
    assert f["tries"] == 1 and f["steps"] == 600 and f["snapshot_step"] == 600
    assert f["snapshot_reached_target"] is False
    assert "end of training (step 600): the check set never reached 65% (last check 10% at step 600)" in f["snapshot"]
    assert "keeping the model at the end of training (step 600)" in err
    assert out.is_file() and not snap.training


def test_a_stall_of_a_full_cpu_schedule_is_retried_then_the_end_is_kept(never_reached, capsys):
    _, _, f = recipe.train_course_model("cpu", progress=False)
    err = capsys.readouterr().err
    assert f["tries"] == 3 and f["seed"] == 2 and f["snapshot_reached_target"] is False
    assert err.count("trying seed") == 2 and "keeping the model at the end of training (step 2000)" in err


def test_a_short_cpu_run_is_not_retried(never_reached):
    _, _, f = recipe.train_course_model("cpu", steps=30, progress=False)
    assert f["tries"] == 1 and f["snapshot_step"] == 30


def test_a_reached_target_keeps_the_snapshot(monkeypatch):
    monkeypatch.setattr(recipe, "train", _fake_train)
    monkeypatch.setattr(recipe, "exact_match", lambda *a, **k: 0.9)
    _, _, f = recipe.train_course_model("ci", steps=60, progress=False)
    assert f["snapshot_reached_target"] is True and f["snapshot_step"] == 25
    assert f["snapshot"] == "the first check at 65% (step 25)"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_max_tries_is_checked(bad, monkeypatch):
    monkeypatch.setattr(recipe, "train", lambda *a, **k: pytest.fail("trained despite a bad max_tries"))
    with pytest.raises(ValueError, match=r"max_tries=.*expected an integer >= 1"):
        recipe.train_course_model("ci", max_tries=bad, progress=False)


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_train_figures_path_is_checked_before_any_work(where, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recipe, "train_course_model", lambda *a, **k: pytest.fail("trained despite a bad --figures"))
    (tmp_path / "file").write_text("x")
    path = tmp_path if where == "folder" else tmp_path / "file" / "f.json"
    with pytest.raises(SystemExit) as info:
        recipe.main(["--preset", "ci", "--figures", str(path)])
    assert info.value.code == 2 and "argument --figures:" in capsys.readouterr().err
