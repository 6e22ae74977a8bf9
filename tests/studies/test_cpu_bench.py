"""The CPU benchmark command (moe_lab.studies.cpu_bench): its processes get the thread count and wait policy
asked for, its record holds what the README's table reads, and a bad --out is refused before any
work. Tiny sizes and no timing asserts (speed lives in the record).

Run: .venv/bin/python -m pytest tests/test_cpu_bench.py -q
"""
import json
import os

import pytest

from moe_lab.studies import cpu_bench
from moe_lab.model import expert_backends as B

TINY = ["--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1"]


def test_a_process_runs_with_the_wait_policy_and_threads_it_was_given(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as `import moe_lab` or make test sets it: "default" removes it
    env = cpu_bench.child_env(2, "default")
    assert "OMP_WAIT_POLICY" not in env and env["OMP_NUM_THREADS"] == env["MOE_LAB_THREADS"] == "2"
    assert cpu_bench.child_env(1, "PASSIVE", {})["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ValueError, match=r"policy='ACTIVE': expected one of \('PASSIVE', 'default'\)"):
        cpu_bench.child_env(1, "ACTIVE")


@pytest.mark.parametrize("policy, seen", [("default", "(unset)"), ("PASSIVE", "PASSIVE")])
def test_two_processes_at_once_each_time_every_model(policy, seen, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # must not leak into the "default" processes
    rows = cpu_bench.run_case(["sorted", cpu_bench.DENSE], threads=1, policy=policy, processes=2, batch=2, seq=16,
                              steps=2, warmup=1)
    assert [r["model"] for r in rows] == ["sorted", "dense"]
    for r in rows:
        assert r["OMP_WAIT_POLICY"] == seen and r["threads"] == 1 and r["processes"] == 2
        assert len(r["ms"]) == 2 and all(ms > 0 for ms in r["ms"]) and r["steps_timed"] == [2, 2]


def test_the_backends_come_from_the_registry_and_interpreted_ones_are_left_out(monkeypatch):
    ok, skipped = cpu_bench.runnable_backends()
    assert set(ok) | set(skipped) == set(B.names())
    assert {"reference", "sorted"} <= set(ok)
    for name in B.names(cpu_interpreted=True):
        assert name in skipped and "interpreter" in skipped[name]
    monkeypatch.setattr(B, "status", lambda name, *a: "not here" if name == "sorted" else None)
    ok, skipped = cpu_bench.runnable_backends()
    assert "sorted" not in ok and skipped["sorted"] == "not here"


def test_the_record_holds_machine_versions_command_and_rows(tmp_path):
    out = tmp_path / "rec.json"
    assert cpu_bench.main(["--threads", "1", "--policies", "PASSIVE", "--no-pairs", "--models", "sorted,dense",
                           "--out", str(out), "--note", "a test", *TINY]) == 0
    rec = json.loads(out.read_text())
    assert rec["machine"]["cores"] == os.cpu_count() and rec["machine"]["cpu"]
    assert rec["torch"] and rec["date"] and rec["note"] == "a test" and rec["partial"] is False
    assert rec["command"].startswith("python -m moe_lab cpu-bench --threads 1")
    assert [(r["model"], r["processes"], r["policy"]) for r in rec["rows"]] == [("sorted", 1, "PASSIVE"),
                                                                                ("dense", 1, "PASSIVE")]
    (moe_row,) = [s for s in rec["summary"] if s["model"] == "sorted"]
    assert moe_row["over_dense"] == pytest.approx(rec["rows"][0]["ms"][0] / rec["rows"][1]["ms"][0], abs=0.01)
    table = cpu_bench.markdown_table(rec)
    assert f"| 1 | PASSIVE | sorted | {rec['rows'][0]['ms'][0]:.1f} | {moe_row['over_dense']:.2f} | - | - |" in table
    assert rec["command"] in table and "a test" in table


def test_summary_reads_alone_pairs_and_ratios():
    rows = [dict(threads=1, policy="PASSIVE", processes=1, model="sorted", ms=[30.0]),
            dict(threads=1, policy="PASSIVE", processes=1, model="dense", ms=[20.0]),
            dict(threads=1, policy="PASSIVE", processes=2, model="sorted", ms=[33.0, 39.0]),
            dict(threads=1, policy="PASSIVE", processes=2, model="dense", ms=[20.0, 20.0])]
    s = {r["model"]: r for r in cpu_bench.summarize(rows)}
    assert s["sorted"]["alone_ms"] == 30.0 and s["sorted"]["pair_ms"] == 36.0
    assert s["sorted"]["pair_over_alone"] == 1.2 and s["sorted"]["over_dense"] == 1.5
    assert "over_dense" not in s["dense"] and s["dense"]["pair_over_alone"] == 1.0
    again = [dict(r, repeat=1, ms=[2 * ms for ms in r["ms"]]) for r in rows[:2]] + [dict(rows[3], repeat=1, ms=[10.0, 10.0])]
    s = {r["model"]: r for r in cpu_bench.summarize([dict(r, repeat=0) for r in rows] + again)}
    assert s["sorted"]["alone_runs"] == [30.0, 60.0] and s["sorted"]["alone_ms"] == 30.0  # the least disturbed run
    assert s["dense"]["pair_runs"] == [20.0, 10.0] and s["dense"]["pair_ms"] == 10.0 and s["dense"]["pair_over_alone"] == 0.5


def test_a_bad_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_bench, "run_case", lambda *a, **k: pytest.fail("measured despite a bad --out"))
    ro_file = tmp_path / "ro.json"
    ro_file.write_text("{}")
    ro_file.chmod(0o444)
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    ro_dir.chmod(0o555)
    cases = [(tmp_path, "is a folder"), (tmp_path / "x.txt", "ending in .json"), (ro_file, "read-only"),
             (ro_file / "x.json", "is a file")]
    if os.geteuid() != 0:  # root may write in any folder
        cases.append((ro_dir / "x.json", "not writable"))
    for path, why in cases:
        with pytest.raises(SystemExit) as exc:
            cpu_bench.main(["--out", str(path), *TINY])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --out" in err and str(path) in err and why in err, err


def test_bad_arguments_are_named():
    for argv, what in [(["--threads", "0"], "--threads"), (["--policies", "ACTIVE"], "ACTIVE"),
                       (["--steps", "0"], "--steps"), (["--model-budget-s", "0"], "--model-budget-s")]:
        with pytest.raises(SystemExit) as exc:
            cpu_bench.parse_args(argv)
        assert exc.value.code == 2, what
