"""moe_lab.studies.profiling: FLOP and byte models against hand counts and torch's own FLOP counter, the
roofline, the timers (with a fake clock: no timing is asserted), the profiler helper, and the bench
record files (schema, loading, plotting) on synthetic records written to a temporary directory.

Run: .venv/bin/python -m pytest tests/studies/test_profiling.py -q
"""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from moe_lab.core import machine
from moe_lab.course import plots  # noqa: E402
from moe_lab.studies import profiling as P  # noqa: E402
from moe_lab.studies import bench_records
from moe_lab.model.experts import experts_reference, experts_sorted  # noqa: E402
from moe_lab.core import cost


# ---- FLOPs ----------------------------------------------------------------------------------
def test_flops_match_a_hand_count():
    # T=3 tokens, k=2 -> 6 routed rows; each of gate, up, down: 2 * 6 * 4 * 5 = 240
    assert cost.moe_flops_breakdown(3, 4, 5, 2) == {"gate": 240, "up": 240, "down": 240}
    assert cost.moe_flops(3, 4, 5, 2) == 720
    assert cost.moe_flops(3, 4, 5, 2, "backward") == 1440
    assert cost.moe_flops(3, 4, 5, 2, "forward+backward") == 2160
    # fine-grained layer, 8192 tokens: 6 * 8192 * 8 * 2048 * 768
    assert cost.moe_flops(8192, 2048, 768, 8) == 618_475_290_624


def _routing(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])


@pytest.mark.parametrize("fn", [experts_reference, experts_sorted], ids=["reference", "sorted"])
@pytest.mark.parametrize("T, d, f, E, k", [(11, 8, 12, 5, 2), (1, 16, 4, 3, 3), (20, 6, 10, 8, 1)])
def test_flops_match_torch_flop_counter(fn, T, d, f, E, k):
    """torch.utils.flop_counter counts the matmuls a back-end really runs, forward and backward."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, d, generator=g, requires_grad=True)
    w = torch.rand(T, k, generator=g, requires_grad=True)
    W = [torch.randn(*s, generator=g).requires_grad_() for s in [(E, d, f), (E, d, f), (E, f, d)]]
    idx = _routing(T, E, k, T)
    with FlopCounterMode(display=False) as fwd:
        y = fn(x, idx, w, *W)
    with FlopCounterMode(display=False) as bwd:
        y.backward(torch.randn(T, d, generator=g))
    assert fwd.get_total_flops() == cost.moe_flops(T, d, f, k)
    assert bwd.get_total_flops() == cost.moe_flops(T, d, f, k, "backward")


def test_dense_ceiling_has_equal_flops():
    from moe_lab.core import cost

    for T, d, f, k in [(128, 2048, 768, 8), (32768, 4096, 14336, 2), (5, 3, 7, 1)]:
        m, kk, n = cost.dense_equal_flops_shape(T, d, f, k)  # (m, kk) @ (kk, n)
        assert cost.matmul_flops(m, n, kk) == cost.moe_flops(T, d, f, k)
    # C (2, 4) = A (2, 3) @ B (3, 4): A 6, B 12, C 8 elements; backward reads dC, A, B, writes dA, dB
    assert cost.matmul_bytes(2, 4, 3, 2) == (6 + 12 + 8) * 2
    assert cost.matmul_bytes(2, 4, 3, 2, mode="backward") == (8 + 6 + 12 + 6 + 12) * 2
    assert cost.matmul_bytes(2, 4, 3, "bfloat16", mode="forward+backward") == (26 + 44) * 2


def test_the_matmul_count_is_torchs():
    from torch.utils.flop_counter import FlopCounterMode

    from moe_lab.core import cost

    a, b = torch.randn(7, 5), torch.randn(5, 3)
    with FlopCounterMode(display=False) as count:
        a @ b
    assert count.get_total_flops() == cost.matmul_flops(7, 3, 5)
    with pytest.raises(ValueError, match="n_bytes=0"):
        cost.arithmetic_intensity(10, 0)
    with pytest.raises(ValueError, match="tiling"):
        cost.matmul_bytes(2, 4, 3, 2, block_m=16, block_n=16, mode="backward")
    assert cost.itemsize("bfloat16") == cost.itemsize(torch.float16) == 2 and cost.itemsize(4) == 4


# ---- bytes ----------------------------------------------------------------------------------
def test_expected_active_experts_limits_and_simulation():
    assert cost.expected_active_experts(0, 8, 2) == 0
    assert cost.expected_active_experts(1, 8, 2) == pytest.approx(2)  # one token: exactly k experts
    assert cost.expected_active_experts(5, 8, 8) == pytest.approx(8)  # k = E: all of them
    assert cost.expected_active_experts(4, 8, 2) == pytest.approx(8 * (1 - 0.75**4))
    # Monte Carlo under the stated assumption: k distinct experts per token, uniformly at random
    g = torch.Generator().manual_seed(0)
    T, E, k, trials = 6, 16, 3, 3000
    counts = [torch.rand(T, E, generator=g).argsort(-1)[:, :k].unique().numel() for _ in range(trials)]
    assert float(np.mean(counts)) == pytest.approx(cost.expected_active_experts(T, E, k), abs=0.1)
    with pytest.raises(ValueError, match="top_k=5"):
        cost.expected_active_experts(3, 4, 5)


def test_byte_model_matches_hand_counts():
    T, d, f, E, k, b = 4, 8, 16, 4, 2, 2  # N = 8 routed rows, bf16
    N = T * k
    m = cost.moe_bytes(T, d, f, E, k, b, "minimal", active_experts=3)
    assert m["weights"] == 3 * (3 * d * f) * b == 2304
    assert m["activations"] == 2 * T * d * b == 128
    assert m["intermediates"] == 0 and m["total"] == 2304 + 128
    tri = cost.moe_bytes(T, d, f, E, k, b, "triton", active_experts=3)
    assert tri["intermediates"] == (2 * N * d + 2 * N * f) * b  # h and the per-assignment buffer
    srt = cost.moe_bytes(T, d, f, E, k, b, "sorted", active_experts=3)
    assert srt["intermediates"] == (9 * N * d + 8 * N * f + 2 * T * d) * b
    ref = cost.moe_bytes(T, d, f, E, k, b, "reference", active_experts=3)
    assert ref["intermediates"] == (7 * N * d + 8 * N * f + T * d + 2 * 3 * T * d) * b  # y copied per expert
    bwd = cost.moe_bytes(T, d, f, E, k, b, "minimal", "backward", active_experts=3)
    assert bwd["weights"] == (3 + E) * 3 * d * f * b  # read the active experts, write every gradient
    assert bwd["activations"] == 3 * T * d * b
    fb = cost.moe_bytes(T, d, f, E, k, b, "sorted", "forward+backward", active_experts=3)
    fw, bw = srt, cost.moe_bytes(T, d, f, E, k, b, "sorted", "backward", active_experts=3)
    assert fb["total"] == fw["total"] + bw["total"]
    tfb = cost.moe_bytes(T, d, f, E, k, b, "triton", "forward+backward", active_experts=3)
    tbw = cost.moe_bytes(T, d, f, E, k, b, "triton", "backward", active_experts=3)
    assert tfb["intermediates"] == tri["intermediates"] + tbw["intermediates"] + 2 * N * f * b  # a1, a3 saved
    # the default active count is the expected one
    assert cost.moe_bytes(T, d, f, E, k, b)["weights"] == pytest.approx(cost.expected_active_experts(T, E, k) * 3 * d * f * b)


def test_byte_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend='cuda'"):
        cost.moe_bytes(4, 8, 16, 4, 2, 2, backend="cuda")
    with pytest.raises(ValueError, match="mode='fwd'"):
        cost.moe_bytes(4, 8, 16, 4, 2, 2, mode="fwd")
    with pytest.raises(ValueError, match="active_experts=9"):
        cost.moe_bytes(4, 8, 16, 4, 2, 2, active_experts=9)
    with pytest.raises(ValueError, match="n_bytes=0"):
        cost.arithmetic_intensity(10, 0)


def test_intensity_grows_with_tokens_until_weights_are_shared():
    """Few tokens: every weight byte serves few rows (memory-bound); many: intensity ~ T*k/E rows per expert."""
    ai = [cost.arithmetic_intensity(cost.moe_flops(T, 2048, 768, 8), cost.moe_bytes(T, 2048, 768, 128, 8, 2)["total"])
          for T in (128, 1024, 8192, 32768)]
    assert ai == sorted(ai) and ai[0] < 50 < ai[-1]


# ---- roofline -------------------------------------------------------------------------------
def test_roofline_is_the_lower_of_the_two_roofs():
    peak, bw = 1000.0, 10.0  # ridge at 100 FLOP/byte
    assert P.ridge_point(peak, bw) == 100
    assert P.roofline(5, peak, bw) == 50  # memory-bound: intensity * bandwidth
    assert P.roofline(100, peak, bw) == 1000
    assert P.roofline(1e6, peak, bw) == 1000  # compute-bound: the peak
    np.testing.assert_allclose(P.roofline(np.array([1.0, 1e3]), peak, bw), [10.0, 1000.0])
    assert torch.equal(P.roofline(torch.tensor([2.0, 500.0]), peak, bw), torch.tensor([20.0, 1000.0]))
    with pytest.raises(ValueError, match="bandwidth=0"):
        P.roofline(1.0, peak, 0)


# ---- timers ---------------------------------------------------------------------------------
def test_median_ms_with_a_fake_clock():
    """Warm-up runs are not timed; the median of the timed runs is returned, in milliseconds."""
    ticks = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])  # timed runs of 5 ms, 1 ms, 3 ms
    calls = []
    ms = P.median_ms(lambda: calls.append(1), warmup=2, repeats=3, clock=lambda: next(ticks))
    assert len(calls) == 5
    assert ms == pytest.approx(3.0)
    synced = []
    P.median_ms(lambda: None, warmup=0, repeats=2, clock=iter([0, 1, 2, 3]).__next__, sync=lambda: synced.append(1))
    assert len(synced) == 4  # before and after every timed run
    with pytest.raises(ValueError, match="repeats=0"):
        P.median_ms(lambda: None, repeats=0)


def test_bench_ms_on_cpu_resets_gradients_before_each_run():
    t = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(t.grad is None)
        (t * 2).sum().backward()

    ms = P.bench_ms(step, "cpu", warmup=1, repeats=3, grad_to_none=[t])
    assert seen == [True] * 4 and ms >= 0


# ---- profiler -------------------------------------------------------------------------------
def test_top_kernels_finds_the_matmul():
    a = torch.randn(256, 256)
    rows = P.top_kernels(lambda: (a @ a).relu(), "cpu", n=5, show=False)
    names = [r.name for r in rows]
    assert "aten::mm" in names
    assert all(r.calls >= 1 and r.self_us > 0 for r in rows)
    assert sum(r.share for r in rows) <= 1 + 1e-9
    assert [r.self_us for r in rows] == sorted((r.self_us for r in rows), reverse=True)


# ---- the machine and the records --------------------------------------------------------------
def test_slugify_makes_file_names():
    assert machine.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert machine.slugify("CPU: AMD EPYC (2 cores)") == "cpu-amd-epyc-2-cores"
    with pytest.raises(ValueError, match="name='..'"):
        machine.slugify("..")


def test_environment_record_carries_what_design_md_asks():
    rec = machine.environment_record("cpu", command="python -m moe_lab bench --quick")
    for key in ("device", "driver", "torch", "triton", "date", "command"):
        assert key in rec
    assert rec["driver"] == "none (CPU)" and rec["torch"] == torch.__version__
    assert rec["command"] == "python -m moe_lab bench --quick"


def synthetic_record(device="Synthetic GPU (test only)", date="2030-01-02T03:04:05+00:00"):
    """A record in the bench's schema with made-up numbers: written to tmp_path only, never to data/bench."""
    results = []
    for backend, speed in (("triton", 300.0), ("grouped_mm", 250.0), ("dense", 500.0)):
        for T in (128, 1024, 8192):
            for mode in ("forward", "forward+backward"):
                flops = cost.moe_flops(T, 2048, 768, 8, mode)
                ms = flops / (speed * 1e12 * min(1.0, T / 4096)) * 1e3
                results.append(dict(shape="fine", tokens=T, d_model=2048, d_expert=768, n_experts=128, top_k=8,
                                    backend=backend, status="ok", ms=ms, flops=flops, tflops=flops / ms / 1e9,
                                    weight_bytes=1e8, min_bytes=2e8, gbps=2e8 / ms / 1e6, intensity=flops / 2e8,
                                    **{"pass": mode}))
    results.append(dict(results[0], backend="reference", status="skipped", ms=None, note="not run"))
    return {"device": device, "driver": "0.0", "torch": "0", "triton": "0", "date": date,
            "command": "synthetic", "ceilings": {"peak_flops": 800e12, "bandwidth": 3e12}, "results": results}


def test_validate_record_names_what_is_wrong():
    bench_records.validate_record(synthetic_record())
    bad = synthetic_record()
    del bad["driver"]
    with pytest.raises(ValueError, match="driver"):
        bench_records.validate_record(bad)
    with pytest.raises(ValueError, match="date='yesterday'"):
        bench_records.validate_record(dict(synthetic_record(), date="yesterday"))
    broken = synthetic_record()
    broken["results"][0]["ms"] = 0
    with pytest.raises(ValueError, match="results\\[0\\].*ms=0"):
        bench_records.validate_record(broken)


def test_load_bench_records_from_a_directory(tmp_path):
    assert bench_records.load_bench_records(tmp_path) == []  # no recorded file: an empty list, not an error
    (tmp_path / "b.json").write_text(json.dumps(synthetic_record("B device")))
    (tmp_path / "a.json").write_text(json.dumps(synthetic_record("A device")))
    recs = bench_records.load_bench_records(tmp_path)
    assert [r["device"] for r in recs] == ["A device", "B device"]
    assert recs[0]["file"].endswith("a.json")
    assert bench_records.record_label(recs[0]) == "recorded on A device, 2030-01-02"
    assert len(bench_records.ok_results(recs[0], backend="triton", **{"pass": "forward"})) == 3
    (tmp_path / "c.json").write_text(json.dumps({"device": "x"}))
    with pytest.raises(ValueError, match="c.json"):
        bench_records.load_bench_records(tmp_path)


def test_recorded_figures_plot_with_their_device_and_date(tmp_path):
    """The path notebook 07 takes on a CPU when a recorded file exists, on a synthetic file."""
    (tmp_path / "gpu.json").write_text(json.dumps(synthetic_record()))
    (rec,) = bench_records.load_bench_records(tmp_path)
    ax = plots.plot_bench_tokens(rec, "fine", "forward")
    assert "recorded on Synthetic GPU (test only), 2030-01-02" in ax.get_title()
    assert ax.get_xlabel() == "tokens" and ax.get_ylabel() == "TFLOP/s" and ax.get_yscale() == "log"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"triton", "grouped_mm", "dense"}
    with pytest.raises(ValueError, match="shape='mixtral'"):
        plots.plot_bench_tokens(rec, "mixtral")
    pts = [dict(label=r["backend"], intensity=r["intensity"], flops=r["tflops"] * 1e12)
           for r in bench_records.ok_results(rec, **{"pass": "forward"})]
    ax2 = plots.plot_roofline(rec["ceilings"]["peak_flops"], rec["ceilings"]["bandwidth"], pts,
                              roof_label=bench_records.record_label(rec))
    assert ax2.get_xscale() == "log" and ax2.get_yscale() == "log"
    assert "arithmetic intensity" in ax2.get_xlabel() and "TFLOP/s" in ax2.get_ylabel()
    assert len(ax2.collections) == len(pts)
    ys = ax2.lines[0].get_ydata()
    assert ys.max() == pytest.approx(800.0)  # the roof flattens at the peak, in TFLOP/s
    live = [dict(r, shape="tiny", tokens=64) for r in bench_records.ok_results(rec, tokens=128, **{"pass": "forward"})]
    fig = plots.plot_bench_record(rec, live_rows=live, live_ceilings=P.Ceilings(1e11, 1e10, 64, 1, "float32", "CPU: test"))
    ax_fwd, ax_fb, ax_roof = fig.axes[:3]
    assert "recorded on Synthetic GPU (test only), 2030-01-02" in ax_fwd.get_title() and "forward+backward" in ax_fb.get_title()
    labels = [t.get_text() for t in ax_roof.get_legend().get_texts()]
    assert any(lb.startswith("recorded on Synthetic GPU") for lb in labels)
    assert any(lb.startswith("live here: CPU: test") for lb in labels) and "triton, tiny T=64" in labels
    assert len([ln for ln in ax_roof.lines if not ln.get_label().startswith("_")]) == 2  # the two roofs
    with pytest.raises(ValueError, match="unit='PFLOP/s'"):
        plots.plot_roofline(1e12, 1e9, unit="PFLOP/s")
    plt.close("all")


def test_measured_ceilings_are_positive_and_consistent():
    c = P.measure_ceilings("cpu", torch.float32, matmul_n=64, copy_bytes=1 << 16)
    assert c.peak_flops > 0 and c.bandwidth > 0 and c.matmul_n == 64 and c.copy_bytes == 1 << 16
    assert c.ridge == pytest.approx(c.peak_flops / c.bandwidth)
    assert c.as_dict()["ridge_flop_per_byte"] == pytest.approx(c.ridge)
