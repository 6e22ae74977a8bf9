"""moe_lab.studies.bench: the torch._grouped_mm back-end agrees with the reference, each case measures what it
claims, the targets are computed only from measured rows, the CPU refuses the large shapes, and
`python -m moe_lab bench --quick` runs as a subprocess and writes a valid record outside data/bench.
No timing is asserted.

Run: .venv/bin/python -m pytest tests/studies/test_bench.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lab.core import cost
from moe_lab.studies import bench
from moe_lab.studies import profiling as P
from moe_lab.studies import bench_records
from moe_lab.model import expert_backends as B
from moe_lab.model.experts import experts_reference

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


def _case(T=19, d=8, f=16, E=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    idx[idx == E - 1] = -1  # the last expert gets nothing; those assignments are dropped
    w = torch.rand(T, k, generator=g, dtype=torch.float64)
    W = [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(E, d, f), (E, d, f), (E, f, d)]]
    return x, idx, w, W


def test_backend_status_comes_from_the_registry(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm")
    assert bench.backend_status("grouped_mm", "cpu", torch.float32).startswith("not available in this torch")
    assert bench.backend_status("dense", "cpu", torch.float32) is None
    with pytest.raises(ValueError, match="backend='cublas'"):
        bench.backend_status("cublas", "cpu", torch.float32)
    assert bench.BACKENDS[:-1] == B.names() and bench.BACKENDS[-1] == "dense"


def test_case_model_uses_the_profiling_models():
    s = bench.SHAPES["fine"]
    assert (s.d_model, s.d_expert, s.n_experts, s.top_k) == (2048, 768, 128, 8)
    assert (bench.SHAPES["mixtral"].d_model, bench.SHAPES["mixtral"].d_expert) == (4096, 14336)
    dense = bench.case_model(s, 1024, "dense", "forward", 2, 128)
    moe = bench.case_model(s, 1024, "triton", "forward", 2, 128)
    assert dense["flops"] == moe["flops"] == cost.moe_flops(1024, 2048, 768, 8)
    fb = bench.case_model(s, 1024, "dense", "forward+backward", 2, 128)
    assert fb["flops"] == 3 * dense["flops"]
    assert moe["weight_bytes"] == 128 * 3 * 2048 * 768 * 2
    assert moe["min_bytes"] <= moe["model_bytes"]


@pytest.mark.parametrize("backend", ["reference", "sorted", "grouped_mm", "padded", "dense", "triton"])
def test_measure_case_returns_a_complete_row(backend):
    status = bench.backend_status(backend, "cpu", torch.float32)
    if status is not None:
        pytest.skip(status)
    inp = bench.make_inputs(bench.SHAPES["tiny"], 16, "cpu", torch.float32)
    with torch.no_grad():
        expected = bench.experts_sorted(*(inp[n] for n in ("x", "expert_idx", "weights", "w1", "w3", "w2")))
    ceil = P.Ceilings(1e11, 1e10, 64, 1 << 16, "float32", "test")
    for mode in ("forward", "forward+backward"):
        row = bench.measure_case("tiny", 16, backend, mode, "cpu", torch.float32, ceil, inp, expected,
                                 warmup=0, repeats=1)
        assert row["status"] == "ok", row["note"]
        assert all(k in row for k in bench_records.RESULT_KEYS)
        assert row["tflops"] == pytest.approx(row["flops"] / row["ms"] / 1e9)
        assert row["gbps"] == pytest.approx(row["min_bytes"] / row["ms"] / 1e6)
        assert 0 < row["frac_roofline"] and row["roofline_tflops"] <= 0.1 + 1e-12


def test_a_failing_or_wrong_backend_becomes_an_error_row(monkeypatch):
    inp = bench.make_inputs(bench.SHAPES["tiny"], 8, "cpu", torch.float32)
    with torch.no_grad():
        expected = bench.experts_sorted(*(inp[n] for n in ("x", "expert_idx", "weights", "w1", "w3", "w2")))

    def boom(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(B, "experts_fn", lambda name: boom)
    row = bench.measure_case("tiny", 8, "sorted", "forward", "cpu", torch.float32, None, inp, expected, 0, 1)
    assert row["status"] == "error" and "kernel exploded" in row["note"] and row["ms"] is None
    monkeypatch.setattr(B, "experts_fn", lambda name: lambda *a: experts_reference(*a) * 1.5)
    row = bench.measure_case("tiny", 8, "sorted", "forward", "cpu", torch.float32, None, inp, expected, 0, 1)
    assert row["status"] == "error" and "differs from `sorted`" in row["note"]


def test_targets_come_only_from_measured_rows():
    def row(backend, mode, tokens, ms, shape="fine", **kw):
        return dict(shape=shape, backend=backend, tokens=tokens, status="ok", ms=ms, **{"pass": mode}, **kw)

    rows = [row("triton", "forward", 8192, 1.0), row("grouped_mm", "forward", 8192, 1.6),
            row("dense", "forward", 8192, 0.6), row("triton", "forward+backward", 16384, 3.0),
            row("grouped_mm", "forward+backward", 16384, 3.3),
            row("triton", "forward", 512, 1.0, min_bytes=3.0e9), row("grouped_mm", "forward", 512, 0.9),
            row("triton", "forward", 4096, 2.0, shape="mixtral"), row("grouped_mm", "forward", 4096, 2.2, shape="mixtral"),
            row("triton", "forward", 128, 0.12, shape="teaching")]
    ceil = P.Ceilings(peak_flops=700e12, bandwidth=4e12, matmul_n=8192, copy_bytes=1 << 30, dtype="bfloat16", device="x")
    found = bench.check_targets(rows, ceil)

    def target(words, tokens):
        hits = [t for t in found if words in t["target"] and t["tokens"] == tokens]
        assert len(hits) == 1, (words, tokens, hits)
        return hits[0]

    dense = target("forward >= 0.65x dense", 8192)
    assert dense["value"] == pytest.approx(0.6) and not dense["met"]
    fb = target("forward+backward >= 1.2x grouped_mm", 16384)
    assert fb["value"] == pytest.approx(1.1) and not fb["met"]
    assert target("forward >= 1.5x grouped_mm", 8192)["met"]
    assert not [t for t in found if t["tokens"] == 512 and "grouped_mm" in t["target"]], "512 tokens: below 2048"
    mem = target("memory-bound end", 512)
    assert mem["value"] == pytest.approx(3.0e9 / 1e-3 / 4e12) and mem["met"]  # 75 % of the copy bandwidth
    assert target("mixtral triton forward >= 1.0x grouped_mm", 4096)["met"]
    teach = target("teaching layer", 128)
    assert teach["value"] == 0.12 and not teach["met"]
    assert bench.check_targets([], ceil) == []  # nothing measured: no verdict


def test_the_sweep_reaches_every_shape_first_and_bounds_the_slow_backends():
    tokens = {"fine": (128, 8192, 32768), "mixtral": (512, 16384)}
    cases = bench.plan_cases(["fine", "mixtral"], lambda s: tokens[s], ["reference", "triton", "dense"], ["forward"])
    first_mixtral = cases.index(("mixtral", 512, "triton", "forward"))
    assert first_mixtral < cases.index(("fine", 8192, "triton", "forward")), "shapes interleave by token count"
    slow = [c for c in cases if c[2] == "reference"]
    assert all(cases.index(c) > cases.index(("fine", 32768, "dense", "forward")) for c in slow), "slow ones last"
    assert len(cases) == len(set(cases)) == 5 * 3


def test_bad_arguments_are_named_before_any_refusal_or_work(capsys):
    with pytest.raises(SystemExit, match="--shapes 'nope'"):
        bench.main(["--shapes", "nope"])
    with pytest.raises(SystemExit, match="--tokens 'x'"):
        bench.main(["--quick", "--tokens", "x"])
    with pytest.raises(SystemExit, match="--budget-s"):
        bench.main(["--quick", "--budget-s", "0"])


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU's refusals")
def test_cpu_refuses_the_large_shapes_unless_asked(capsys):
    with pytest.raises(SystemExit, match="--quick"):
        bench.main(["--out", "unused.json"])
    with pytest.raises(SystemExit, match="allow-large-on-cpu"):
        bench.main(["--quick", "--shapes", "fine"])
    with pytest.raises(SystemExit, match="--backends"):
        bench.main(["--quick", "--backends", "cublas"])


def test_bench_quick_runs_as_a_command_and_writes_a_valid_record(tmp_path):
    out = tmp_path / "quick.json"
    bench_dir = ROOT / "data" / "bench"
    before = sorted(bench_dir.glob("*")) if bench_dir.exists() else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "moe_lab", "bench", "--quick", "--out", str(out), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    bench_records.validate_record(rec)
    assert rec["command"].startswith("python -m moe_lab bench --quick")
    assert rec["mode"] == "quick" and rec["ceilings"]["peak_flops"] > 0 and rec["ceilings"]["bandwidth"] > 0
    backends = {r["backend"] for r in rec["results"]}
    ok = [r for r in rec["results"] if r["status"] == "ok"]
    assert {"reference", "sorted", "dense"} <= {r["backend"] for r in ok}
    assert {r["pass"] for r in ok} == {"forward", "forward+backward"}
    if NO_CUDA:
        assert "triton" not in backends and any("triton: skipped on the CPU" in n for n in rec["notes"])
        assert rec["driver"] == "none (CPU)" and rec["cpu_threads"] == 1
        assert rec["targets"] == []  # the H100 targets are computed for GPU runs only
    for r in ok:
        assert r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9)
    assert "wrote" in proc.stdout and "TFLOP/s" in proc.stdout
    assert not (tmp_path / "data").exists()  # --record was not given
    after = sorted(bench_dir.glob("*")) if bench_dir.exists() else []
    assert after == before


# ---- moe_lab.commands.gpu_suite: everything a GPU session should run, in one call ----------------------------
def test_gpu_suite_plans_every_step_with_limits(tmp_path):
    from moe_lab.commands import gpu_suite

    steps = gpu_suite.plan(tmp_path, timeouts={"bench": 300}, device_slug="nvidia-h100-80gb-hbm3")
    assert [s["name"] for s in steps] == ["smoke", "tests", "nb-05", "nb-06", "nb-07", "bench"]  # no tuning by default
    smoke, tests, nb05, nb06, nb07, bch = steps
    assert smoke["fatal"] and not any(s["fatal"] for s in steps[1:])
    assert tests["cmd"][2:6] == ["pytest", "-m", "gpu", "tests"]
    for nb, name in ((nb05, "05_triton_basics"), (nb06, "06_triton_moe_kernels"), (nb07, "07_profiling")):
        assert nb["env"]["MOE_LAB_MODE"] == "gpu" and nb["env"]["COLD_TRITON_CACHE"] == "1"
        assert nb["cmd"][nb["cmd"].index("--execute") + 1] == f"notebooks/{name}.ipynb"
        assert nb["cmd"][nb["cmd"].index("--to") + 1] == str(tmp_path / "notebooks" / f"{name}.ipynb")
    assert "--record" in bch["cmd"] and str(tmp_path / "bench-nvidia-h100-80gb-hbm3.json") in bch["cmd"]
    assert bch["timeout"] == 300 and bch["cmd"][bch["cmd"].index("--budget-s") + 1] == "240"
    assert all(s["log"] == str(tmp_path / f"{s['name']}.log") for s in steps)
    tuned = gpu_suite.plan(tmp_path, with_tune=True, device_slug="x")
    assert [s["name"] for s in tuned][:3] == ["smoke", "tune", "tests"]
    assert str(tmp_path / "tune-x.json") in tuned[1]["cmd"]
    only = gpu_suite.plan(tmp_path, only="notebooks", with_04=True)
    assert only[0]["name"] == "nb-04" and len(only) == 4
    with_grpo = gpu_suite.plan(tmp_path, only="notebooks", with_08=True)
    assert with_grpo[-1]["name"] == "nb-08"


def test_gpu_suite_executes_a_notebook_and_keeps_its_outputs(tmp_path):
    import nbformat

    from moe_lab.commands import gpu_suite

    src = tmp_path / "nb.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(nb, src)
    out = tmp_path / "ran" / "nb.ipynb"
    assert gpu_suite.execute_notebook(str(src), str(out), 60) == 0
    ran = nbformat.read(out, as_version=4)
    assert ran.cells[0].outputs[0]["text"].strip() == "42"
    nb.cells.append(nbformat.v4.new_code_cell("raise ValueError('boom')"))
    nbformat.write(nb, src)
    assert gpu_suite.execute_notebook(str(src), str(out), 60) == 1
    assert "boom" in str(nbformat.read(out, as_version=4).cells[1].outputs)


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal without a GPU")
def test_gpu_suite_refuses_without_cuda(tmp_path, capsys):
    from moe_lab.commands import gpu_suite

    assert gpu_suite.main(["--out", str(tmp_path / "x")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert gpu_suite.main(["--out", str(tmp_path / "x"), "--only", "bench", "--dry-run"]) == 0
    assert "-m moe_lab bench --record" in capsys.readouterr().out


def test_gpu_suite_step_runner_logs_and_enforces_its_limit(tmp_path):
    from moe_lab.commands import gpu_suite

    ok = gpu_suite.run_step(dict(name="ok", cmd=[sys.executable, "-c", "print('hello')"], env={},
                                 log=str(tmp_path / "ok.log")), timeout=60)
    assert ok["status"] == "passed" and ok["returncode"] == 0 and "hello" in (tmp_path / "ok.log").read_text()
    bad = gpu_suite.run_step(dict(name="bad", cmd=[sys.executable, "-c", "raise SystemExit(3)"], env={},
                                  log=str(tmp_path / "bad.log")), timeout=60)
    assert bad["status"] == "failed" and bad["returncode"] == 3
    slow = gpu_suite.run_step(dict(name="slow", cmd=[sys.executable, "-c", "import time; time.sleep(30)"], env={},
                                   log=str(tmp_path / "slow.log")), timeout=1)
    assert slow["status"].startswith("timed out") and slow["returncode"] is None


def test_gpu_suite_gives_a_cold_triton_cache_and_removes_it(tmp_path):
    from moe_lab.commands import gpu_suite

    probe = "import os; print('CACHE', os.environ['TRITON_CACHE_DIR'], os.listdir(os.environ['TRITON_CACHE_DIR']))"
    res = gpu_suite.run_step(dict(name="nb", cmd=[sys.executable, "-c", probe], env={"COLD_TRITON_CACHE": "1"},
                                  log=str(tmp_path / "nb.log")), timeout=60)
    line = [ln for ln in (tmp_path / "nb.log").read_text().splitlines() if ln.startswith("CACHE")][0]
    assert res["status"] == "passed" and line.endswith("[]"), "an empty cache of its own"
    assert not Path(line.split()[1]).exists(), "removed afterwards"


def test_gpu_suite_names_bad_arguments(tmp_path, capsys):
    from moe_lab.commands import gpu_suite

    for args, message in [(["--budget-s", "0"], "--budget-s"), (["--timeout-bench", "-5"], "--timeout-bench"),
                          ([], "--out DIR is required")]:
        with pytest.raises(SystemExit):
            gpu_suite.main((["--out", str(tmp_path)] if args else []) + args)
        assert message in capsys.readouterr().err


def test_gpu_suite_archive_holds_the_folder_and_the_written_records(tmp_path):
    import tarfile

    from moe_lab.commands import gpu_suite

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    dest = tmp_path / "back" / "suite.tar.gz"
    gpu_suite.archive(tmp_path / "out", dest)
    names = tarfile.open(dest).getnames()
    assert "out/summary.json" in names
    assert any(n.startswith("repo/data/bench/") for n in names), "the recorded bench files travel too"
    assert not dest.with_name("suite.tar.gz.tmp").exists()


def test_the_bench_writes_a_partial_record_after_every_case(tmp_path, monkeypatch):
    """A run stopped from outside keeps what it measured: the file exists, valid, after the first case."""
    out = tmp_path / "b.json"
    seen = []
    real_measure = bench.measure_case

    def measure_then_look(*args, **kwargs):
        row = real_measure(*args, **kwargs)
        if out.exists():
            seen.append(len(json.loads(out.read_text())["results"]))
        return row

    monkeypatch.setattr(bench, "measure_case", measure_then_look)
    assert bench.main(["--quick", "--shapes", "tiny", "--tokens", "16", "--backends", "sorted,dense",
                       "--passes", "forward", "--out", str(out), "--no-progress"]) == 0
    assert seen == [1], "after the first case, the file held it"
    rec = json.loads(out.read_text())
    bench_records.validate_record(rec)
    assert not any("partial" in n for n in rec["notes"]) and len(rec["results"]) == 2

