"""Kernel configurations: tables tuned ahead per device, the heuristic, and the tuner (moe_lab.studies.tune).

On a CPU: the table's schema and lookup, the shared-memory arithmetic and the heuristic's fit for named
GPUs (a T4's 64 KiB, an H100's 227 KiB), a table of a fake device, and the tuner's sweep under the
interpreter with a tiny space. Tests marked `gpu` check the lookup on the real device and that a sweep
over token counts compiles each kernel once.
"""
import copy
import importlib.util
import json
import math

import pytest

from moe_lab.core import machine
import torch

if importlib.util.find_spec("triton") is None:  # find_spec: importing triton here would come too early
    pytest.skip("Triton is not installed (Linux only)", allow_module_level=True)

from moe_lab.kernels import INTERPRETED  # noqa: E402  (before triton: it picks the interpreter)
from moe_lab.kernels import config_table as CT  # noqa: E402

CUDA = torch.cuda.is_available() and not INTERPRETED
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with compiled Triton (here: no GPU or interpreter mode)")


def cfg(bm=64, bn=128, bk=64, g=1, w=4, s=3):
    return CT.KernelConfig(bm, bn, bk, g, w, s)


def fake_table(device="Fake GPU 9000"):
    """A table as the tuner writes it: two shapes, a few buckets."""
    def entry(c, ms):
        return {"config": c.meta, "ms": ms, "candidates": 2, "runner_up": {"config": cfg(c.BLOCK_M, 64, 64).meta, "ms": ms * 1.2}}

    def bucket(d, f, rows, fwd_bm, train_bm):
        kernels = {}
        for bm in sorted({fwd_bm, train_bm}):
            kernels[str(bm)] = {k: entry(cfg(bm if k in CT.ROW_KERNELS else 128, 128 if d > 1000 else 64, 64, 16, 8, 3), 1.0)
                                for k in CT.KERNELS}
        return dict(dtype="bfloat16", shape="x", tokens=0, d_model=d, d_expert=f, n_experts=8, top_k=2,
                    rows_per_expert=rows, block_m={"forward": fwd_bm, "training": train_bm}, kernels=kernels)

    return dict(schema=CT.SCHEMA, device=device, capability=[9, 0], driver="1", torch="t", triton="3", date="2026-11-26",
                command="python -m moe_lab tune", buckets=[bucket(2048, 768, 8, 16, 16), bucket(2048, 768, 512, 64, 128),
                                                           bucket(256, 128, 64, 32, 64)])


# ---------------------------------------------------------------------------------------------
# Shared memory and the heuristic
# ---------------------------------------------------------------------------------------------
def test_shared_memory_counts_every_tile_of_every_stage():
    c = cfg(bm=64, bn=128, bk=64, s=3)
    # up: one x tile (64 x 64) and two weight tiles (64 x 128) per stage, 2 bytes each
    assert CT.shared_memory_bytes("up", c, torch.bfloat16) == 3 * (64 * 64 + 2 * 64 * 128) * 2
    assert CT.shared_memory_bytes("down", c, torch.float16) == 3 * (64 * 64 + 64 * 128) * 2
    assert CT.shared_memory_bytes("down", c, torch.float32) == 3 * (64 * 64 + 64 * 128) * 4  # twice the bytes
    assert CT.shared_memory_bytes("dx", c, "bfloat16") == 3 * (2 * 64 * 64 + 2 * 64 * 128) * 2
    one_stage = cfg(bm=128, bn=256, bk=16, s=1)  # the epilogue's float32 tile is larger than one stage
    assert CT.shared_memory_bytes("down", one_stage, "bfloat16") == 128 * 256 * 4
    with pytest.raises(ValueError, match="kernel='gemm'"):
        CT.shared_memory_bytes("gemm", c, "bfloat16")


@pytest.mark.parametrize("gpu_name", sorted(machine.KNOWN_GPUS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kernel", CT.KERNELS)
def test_the_heuristic_fits_every_known_gpu(gpu_name, dtype, kernel):
    limits = CT.known_device(gpu_name)
    c = CT.heuristic(kernel, dtype, limits, rows=300.0)
    assert CT.shared_memory_bytes(kernel, c, dtype) + 4096 <= limits.shared_memory
    assert CT.accumulator_registers(kernel, c) <= 128
    if kernel in CT.ROW_KERNELS:
        assert c.BLOCK_M == 128 == CT.block_m_for(300.0)  # the layout's block for 300 rows per expert
    if not limits.has_bfloat16:
        assert c.num_stages == 2, "no asynchronous copies before Ampere: no deeper pipeline"


def test_the_heuristic_shrinks_tiles_for_a_t4_and_not_for_an_h100():
    t4, h100 = CT.known_device("T4"), CT.known_device("H100")
    big = CT.heuristic("up", "float16", h100, rows=512.0)
    small = CT.heuristic("up", "float16", t4, rows=512.0)
    assert (big.BLOCK_N, big.BLOCK_K, big.num_stages) == (128, 64, 4)
    assert CT.shared_memory_bytes("up", big, "float16") > 64 * 1024  # would not fit a T4
    assert CT.shared_memory_bytes("up", small, "float16") + 4096 <= 64 * 1024
    assert CT.known_device("T4").has_bfloat16 is False
    with pytest.raises(ValueError, match="unknown device"):
        CT.known_device("Z80")
    tiny = CT.DeviceLimits("toy", 256, (9, 0))
    with pytest.raises(ValueError, match="fits 256 bytes"):
        CT.heuristic("up", "bfloat16", tiny)


@pytest.mark.parametrize("kernel", CT.KERNELS)
def test_the_search_space_fits_an_h100_and_keeps_the_layout_block(kernel):
    bms = (16, 32, 64, 128) if kernel in CT.ROW_KERNELS else (None,)
    for bm in bms:
        space = CT.space(kernel, bm)
        assert len(space) >= 8 and len(set(space)) == len(space)
        for c in space:
            assert CT.fits(kernel, c, "bfloat16", machine.KNOWN_GPUS["H100"]["shared_memory"])
            if bm is not None:
                assert c.BLOCK_M == bm
        if kernel in CT.ROW_KERNELS:
            assert {c.GROUP_M for c in space} == {1, 16}, "the program order is part of the search"
    with pytest.raises(ValueError, match="pass the layout's block_m"):
        CT.space("up")


def test_kernel_config_rejects_what_triton_cannot_compile():
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        cfg(bn=96)
    with pytest.raises(ValueError, match="num_warps"):
        cfg(w=3)
    with pytest.raises(ValueError, match="unknown KernelConfig keys"):
        CT.KernelConfig.from_dict({**cfg().meta, "BLOCK_Q": 4})


# ---------------------------------------------------------------------------------------------
# Tables and lookup
# ---------------------------------------------------------------------------------------------
def test_a_valid_table_passes_and_each_defect_is_named():
    table = fake_table()
    CT.validate_table(table)
    for mutate, message in [
        (lambda t: t.pop("driver"), "lacks \\['driver'\\]"),
        (lambda t: t.update(schema=99), "schema 99"),
        (lambda t: t["buckets"][0].pop("rows_per_expert"), "bucket 0 lacks"),
        (lambda t: t["buckets"][1]["block_m"].update(training=32), "block_m 32 \\(training\\) lacks"),
        (lambda t: t["buckets"][1]["kernels"]["64"]["up"]["config"].update(BLOCK_M=32), "BLOCK_M 32 is not the layout's block_m 64"),
        (lambda t: t["buckets"][2]["kernels"]["32"]["down"]["config"].update(num_warps=5), "down: bad config"),
    ]:
        broken = copy.deepcopy(table)
        mutate(broken)
        with pytest.raises(ValueError, match=message):
            CT.validate_table(broken)


def test_lookup_takes_the_nearest_bucket_on_a_log_scale():
    table = fake_table()
    near = CT.nearest_bucket(table, torch.bfloat16, 2048, 768, rows=400.0)
    assert near["rows_per_expert"] == 512
    assert CT.nearest_bucket(table, torch.bfloat16, 2048, 768, rows=10.0)["rows_per_expert"] == 8
    # (d, f) first: a layer near the teaching shape takes its bucket whatever the rows
    assert CT.nearest_bucket(table, torch.float16, 300, 100, rows=4096.0)["d_model"] == 256
    assert CT.nearest_bucket(table, torch.float32, 2048, 768, rows=400.0) is None  # 4-byte tiles: not tuned


def test_choose_uses_the_table_then_the_heuristic_and_says_which():
    table, h100 = fake_table(), CT.known_device("H100")
    fwd = CT.choose(torch.bfloat16, 2048, 768, 128, 8, 8192, training=False, limits=h100, table=table)
    train = CT.choose(torch.bfloat16, 2048, 768, 128, 8, 8192, training=True, limits=h100, table=table)
    assert fwd.block_m == 64 and train.block_m == 128  # the bucket's choices for inference and training
    assert fwd.source.startswith("table Fake GPU 9000") and fwd.configs["up"] == cfg(64, 128, 64, 16, 8, 3)
    assert set(train.configs) == set(CT.KERNELS)
    # no table, or float32 (not tuned): the heuristic, named as such
    assert CT.choose(torch.bfloat16, 2048, 768, 128, 8, 8192, False, limits=h100).source.startswith("heuristic (no table")
    f32 = CT.choose(torch.float32, 2048, 768, 128, 8, 8192, False, limits=h100, table=table)
    assert f32.source.startswith("heuristic") and f32.block_m == 128
    # a T4 cannot hold the table's tiles: each kernel falls back to the heuristic, and the choice says so
    t4 = CT.choose(torch.float16, 2048, 768, 128, 8, 8192, False, limits=CT.known_device("T4"), table=table)
    assert all(CT.fits(k, c, "float16", 64 * 1024, margin=0) for k, c in t4.configs.items())
    assert "up: heuristic" in t4.notes
    assert "block_m 64" in CT.describe(fwd)
    # the interpreter: one small configuration whatever the table
    assert CT.choose(torch.float32, 2048, 768, 128, 8, 8192, False, interpreted=True).configs["down"].BLOCK_N == 32


def test_a_fake_devices_table_is_found_by_name_and_by_override(tmp_path, monkeypatch):
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(fake_table()))
    monkeypatch.setenv("MOE_LAB_KERNEL_TABLE", str(path))
    assert CT.table_for("whatever")["device"] == "Fake GPU 9000"
    monkeypatch.delenv("MOE_LAB_KERNEL_TABLE")
    monkeypatch.setattr(CT, "CONFIG_DIR", tmp_path)
    (tmp_path / "fake-gpu-9000.json").write_text(json.dumps(fake_table()))
    assert CT.table_for("Fake GPU 9000")["device"] == "Fake GPU 9000"
    assert CT.table_for("Another GPU") is None
    (tmp_path / "bad-gpu.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CT.table_for("Bad GPU")


def test_shipped_tables_are_valid_and_name_their_provenance():
    for path in sorted(CT.CONFIG_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        CT.validate_table(table, str(path))
        assert table["command"].startswith("python -m moe_lab tune") and table["device"] and table["triton"]
        for b in table["buckets"]:
            for per_kernel in b["kernels"].values():
                for entry in per_kernel.values():
                    if "runner_up" in entry:
                        assert entry["ms"] <= entry["runner_up"]["ms"], "the winner is the fastest measured"


def test_block_m_for_is_a_power_of_two_at_or_above_the_rows():
    assert [CT.block_m_for(r) for r in (1, 16, 17, 64, 100, 5000)] == [16, 16, 32, 64, 128, 128]
    assert CT.block_m_for(5000, largest=32) == 32
    assert math.isclose(CT.rows_per_expert(8192, 8, 128), 512.0)


# ---------------------------------------------------------------------------------------------
# The tuner, under the interpreter
# ---------------------------------------------------------------------------------------------
def test_the_tuner_writes_a_valid_table_whose_winners_are_the_fastest(tmp_path):
    from moe_lab.studies import tune

    out, timings = tmp_path / "table.json", tmp_path / "timings.json"
    args = ["--shapes", "tiny", "--tokens", "32", "--space", "quick", "--no-progress", "--out", str(out),
            "--timings", str(timings)]
    if not CUDA:
        args += ["--device", "cpu"]
    assert tune.main(args) == 0
    table = json.loads(out.read_text())
    CT.validate_table(table)
    rows = json.loads(timings.read_text())["timings"]
    (bucket,) = table["buckets"]
    for bm, per_kernel in bucket["kernels"].items():
        for kernel, entry in per_kernel.items():
            mine = [r for r in rows if r["kernel"] == kernel and r["ms"] is not None
                    and (kernel in CT.WEIGHT_KERNELS or r["block_m"] == int(bm))]
            assert entry["ms"] == pytest.approx(min(r["ms"] for r in mine), abs=1e-4)
            assert entry["candidates"] == len(mine) == len(CT.space(kernel, int(bm) if kernel in CT.ROW_KERNELS else None, "quick"))
    fwd = {int(k): v for k, v in bucket["forward_ms"].items()}
    assert bucket["block_m"]["forward"] == min(fwd, key=fwd.get)
    assert table["command"].startswith("python -m moe_lab tune --shapes tiny")


def test_the_tuner_names_bad_arguments_before_any_work(capsys):
    from moe_lab.studies import tune

    base = ["--device", "cpu", "--space", "quick"]
    for args, message in [(["--shapes", "huge"], "--shapes 'huge'"), (["--tokens", "0"], "must be positive"),
                          (["--tokens", "a,b"], "list of positive integers"), (["--budget-s", "-1"], "--budget-s"),
                          (["--workers", "-2"], "--workers")]:
        with pytest.raises(SystemExit):
            tune.main(base + (args if "--shapes" in args else ["--shapes", "tiny", *args]))
        assert message in capsys.readouterr().err
    if not CUDA:
        with pytest.raises(SystemExit):
            tune.main(["--device", "cpu"])  # the full space on the interpreter
        assert "only --space quick --shapes tiny" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
def test_the_device_uses_its_table_or_says_it_has_none():
    from moe_lab.kernels.moe_gemm import kernel_choice

    limits = CT.device_limits()
    choice = kernel_choice(torch.bfloat16, "cuda", 2048, 768, 128, 8, 8192, training=False)
    if CT.table_for(limits.name) is None:
        assert choice.source.startswith("heuristic (no table")
    else:
        assert choice.source.startswith("table ")
    assert all(CT.fits(k, c, "bfloat16", limits.shared_memory, margin=0) for k, c in choice.configs.items())


@gpu
@pytest.mark.gpu
def test_a_sweep_over_token_counts_compiles_each_kernel_once():
    from moe_lab.kernels import moe_gemm

    def variants(jit_fn):
        caches = getattr(jit_fn, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton does not expose its kernel cache")
        return sum(len(c[0]) for c in caches.values())

    from moe_lab.kernels.moe_routing import moe_align

    g = torch.Generator(device="cuda").manual_seed(0)
    E, d, f, k = 8, 256, 128, 2
    w1, w3 = (torch.randn(E, d, f, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    w2 = torch.randn(E, f, d, device="cuda", dtype=torch.bfloat16, generator=g)
    c = CT.KernelConfig(32, 64, 64, 1, 4, 3)  # one configuration for every token count
    counts = []
    for T in (100, 333, 1000, 1001, 2048):  # odd and even, multiples of 16 and not
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
        idx = torch.randint(0, E, (T, k), device="cuda", generator=g)
        align = moe_align(idx, E, c.BLOCK_M)
        h, _, _ = moe_gemm.moe_up(x, w1, w3, align, config=c)
        moe_gemm.moe_down(h, w2, torch.rand(T, k, device="cuda"), idx, align, config=c)
        counts.append((variants(moe_gemm.moe_up_kernel), variants(moe_gemm.moe_down_kernel)))
    assert counts[0] == counts[-1], f"recompiled for a new token count: {counts}"


def test_knob_effect_reads_each_knobs_best_against_the_best_overall():
    from moe_lab.studies import tune

    def row(ms, bn, g, bm=64, kernel="up", tokens=128):
        return dict(shape="fine", tokens=tokens, block_m=bm, kernel=kernel, ms=ms,
                    config=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=g, num_warps=4, num_stages=3))

    rows = [row(1.0, 128, 1), row(2.0, 64, 1), row(1.5, 128, 16), row(4.0, 64, 16),
            row(3.0, 128, 1, tokens=8192), row(3.0, 64, 16, tokens=8192), row(None, 256, 1, tokens=8192)]
    by_n = tune.knob_effect(rows, "BLOCK_N")["up"]
    assert by_n[128] == pytest.approx(1.0) and by_n[64] == pytest.approx(math.sqrt(2.0 * 1.0))  # buckets 2x and 1x
    assert 256 not in by_n, "a configuration that failed has no time"
    by_g = tune.knob_effect(rows, "GROUP_M")
    assert set(by_g) == {"up"} and by_g["up"][16] == pytest.approx(math.sqrt(1.5 * 1.0))
    assert "dw13" not in tune.knob_effect(rows + [row(1.0, 64, 1, kernel="dw13")], "GROUP_M")
    with pytest.raises(ValueError, match="knob='colour'"):
        tune.knob_effect(rows, "colour")


def test_a_tuning_run_cut_short_keeps_a_valid_table_of_its_finished_buckets(tmp_path, monkeypatch):
    from moe_lab.studies import kernel_sweep, tune

    real, calls = kernel_sweep.tune_bucket, []

    def second_one_dies(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 2:
            raise KeyboardInterrupt("the machine was taken back")
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_sweep, "tune_bucket", second_one_dies)
    out = tmp_path / "table.json"
    args = ["--shapes", "tiny", "--tokens", "16,32", "--space", "quick", "--no-progress", "--out", str(out),
            "--timings", str(tmp_path / "t.json")] + ([] if CUDA else ["--device", "cpu"])
    with pytest.raises(KeyboardInterrupt):
        tune.main(args)
    table = json.loads(out.read_text())
    CT.validate_table(table)
    assert [b["tokens"] for b in table["buckets"]] == [16]

