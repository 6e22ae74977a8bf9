"""Kernel tables are checked whole when read: an explicit MOE_LAB_KERNEL_TABLE that cannot be read is an
error naming it (never the heuristic in silence), every field of every bucket is validated naming the
file, the bucket and the kernel, and moe_align refuses a row block that is not a power of two.

Runs on a CPU (Triton's interpreter). Run: .venv/bin/python -m pytest tests/kernels/test_kernel_table_checks.py -q
"""
import copy
import importlib.util
import json
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # find_spec: importing triton here would come too early
    pytest.skip("Triton is not installed (Linux only)", allow_module_level=True)

from moe_lab.kernels import config_table as CT  # noqa: E402
from moe_lab.kernels.moe_routing import moe_align  # noqa: E402

from test_kernel_configs import fake_table  # noqa: E402  (the tuner-shaped table of the neighbouring tests)


@pytest.fixture
def override(tmp_path, monkeypatch):
    """Point MOE_LAB_KERNEL_TABLE at a path under tmp_path; returns a function that does it."""
    def use(name):
        path = tmp_path / name
        monkeypatch.setenv("MOE_LAB_KERNEL_TABLE", str(path))
        return path
    return use


# --- an explicit table that cannot be read ------------------------------------------------------------
def test_an_explicit_table_that_is_missing_is_an_error_naming_it(override):
    path = override("missing.json")
    with pytest.raises(ValueError) as info:
        CT.table_for("Fake GPU 9000")
    assert "MOE_LAB_KERNEL_TABLE" in str(info.value) and str(path) in str(info.value) and "no file" in str(info.value)


def test_an_explicit_table_that_is_a_symlink_loop_is_an_error_naming_it(override):
    path = override("loop.json")
    os.symlink(path, path)  # a link to itself
    with pytest.raises(ValueError) as info:
        CT.table_for("Fake GPU 9000")
    assert "MOE_LAB_KERNEL_TABLE" in str(info.value) and str(path) in str(info.value)


def test_an_explicit_table_that_is_a_folder_is_an_error_naming_it(override):
    path = override("tables")
    path.mkdir()
    with pytest.raises(ValueError) as info:
        CT.table_for("Fake GPU 9000")
    assert str(path) in str(info.value) and "folder" in str(info.value), str(info.value)


def test_an_explicit_table_that_is_binary_is_an_error_naming_it(override):
    path = override("binary.json")
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError) as info:
        CT.table_for("Fake GPU 9000")
    assert str(path) in str(info.value) and "not a JSON text" in str(info.value), str(info.value)


def test_a_good_explicit_table_is_used(override):
    path = override("good.json")
    path.write_text(json.dumps(fake_table()))
    assert CT.table_for("whatever")["device"] == "Fake GPU 9000"


# --- every field of every bucket ------------------------------------------------------------------------
def _set(bucket, key, value):
    def change(t):
        t["buckets"][bucket][key] = value
    return change


def _entry(bucket, block_m, kernel, value):
    def change(t):
        t["buckets"][bucket]["kernels"][block_m][kernel] = value
    return change


def _config(bucket, block_m, kernel, **fields):
    def change(t):
        t["buckets"][bucket]["kernels"][block_m][kernel]["config"].update(fields)
    return change


# (change, the words the error must hold besides the file): bucket 1 of fake_table has the forward
# block_m 64 and the training one 128; bucket 2 has 32 and 64
BUCKET_DEFECTS = {
    "bucket an int": (lambda t: t["buckets"].__setitem__(0, 7), ["bucket 0", "object"]),
    "kernels a list": (_set(0, "kernels", [1, 2]), ["bucket 0", "kernels"]),
    "dtype int8": (_set(0, "dtype", "int8"), ["bucket 0", "dtype", "'int8'"]),
    "d_model a string": (_set(1, "d_model", "64"), ["bucket 1", "d_model", "'64'"]),
    "d_model NaN": (_set(1, "d_model", float("nan")), ["bucket 1", "d_model", "nan"]),
    "d_model 0": (_set(1, "d_model", 0), ["bucket 1", "d_model", "0"]),
    "d_expert True": (_set(1, "d_expert", True), ["bucket 1", "d_expert"]),
    "rows_per_expert -5": (_set(2, "rows_per_expert", -5), ["bucket 2", "rows_per_expert", "-5"]),
    "rows_per_expert infinite": (_set(2, "rows_per_expert", float("inf")), ["bucket 2", "rows_per_expert"]),
    "layout block_m 1<<20": (lambda t: t["buckets"][1]["block_m"].update(forward=1 << 20),
                             ["bucket 1", "block_m", "1048576"]),
    "layout block_m a string": (lambda t: t["buckets"][2]["block_m"].update(forward="32"),
                                ["bucket 2", "block_m", "'32'"]),
    "layout block_m 48": (lambda t: t["buckets"][2]["block_m"].update(training=48), ["bucket 2", "block_m", "48"]),
    "a bad dx at a forward-only block_m": (_config(1, "64", "dx", num_warps=5), ["bucket 1", "block_m 64", "dx"]),
    "a dx entry that is a list": (_entry(1, "64", "dx", [1]), ["bucket 1", "block_m 64", "dx"]),
    "a dx entry without its config": (_entry(1, "64", "dx", {"ms": 1.0}), ["bucket 1", "block_m 64", "dx", "config"]),
    "an unknown kernel": (_entry(1, "64", "gemm", {"config": {}}), ["bucket 1", "block_m 64", "'gemm'"]),
    "a block_m key that is no number": (lambda t: t["buckets"][2]["kernels"].update(abc={}), ["bucket 2", "'abc'"]),
    "a kernel's BLOCK_N of 1<<20": (_config(0, "16", "up", BLOCK_N=1 << 20), ["bucket 0", "block_m 16", "up", "BLOCK_N"]),
    "a kernel's BLOCK_M a string": (_config(0, "16", "down", BLOCK_M="16"), ["bucket 0", "down", "BLOCK_M"]),
    "a row kernel off the layout": (_config(0, "16", "swiglu_backward", BLOCK_M=32),
                                    ["bucket 0", "block_m 16", "swiglu_backward", "BLOCK_M 32"]),
    "ms negative": (lambda t: t["buckets"][0]["kernels"]["16"]["dw2"].update(ms=-1.0), ["bucket 0", "dw2", "ms"]),
    "buckets a dict": (lambda t: t.update(buckets={}), ["buckets"]),
}


@pytest.mark.parametrize("case", sorted(BUCKET_DEFECTS))
def test_each_bucket_defect_is_named_with_the_file_the_bucket_and_the_kernel(case, override):
    change, words = BUCKET_DEFECTS[case]
    table = copy.deepcopy(fake_table())
    change(table)
    path = override("table.json")
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError) as info:
        CT.table_for("whatever")
    msg = str(info.value)
    assert str(path) in msg and all(w in msg for w in words), msg


def test_the_fake_table_and_the_tuners_own_entries_pass():
    CT.validate_table(fake_table(), "fake.json")


# --- the layout's row block ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block_m", [3, 0, -4, 48, 2.0, True, "16"])
def test_moe_align_refuses_a_block_that_is_not_a_power_of_two(block_m):
    from moe_lab.kernels.moe_align_triton import moe_align_triton

    idx = torch.tensor([[0, 1], [1, 2], [2, 0]])
    for align in (moe_align, moe_align_triton):
        with pytest.raises(ValueError) as info:
            align(idx, 3, block_m)
        assert f"block_m={block_m!r}" in str(info.value) and "power of two" in str(info.value), str(info.value)


def test_moe_align_takes_every_power_of_two():
    idx = torch.tensor([[0, 1], [1, 2], [2, 0]])  # two rows for each of the 3 experts
    for block_m in (1, 2, 16, 128):
        assert int(moe_align(idx, 3, block_m).offsets[-1]) == 3 * (-(-2 // block_m) * block_m)
