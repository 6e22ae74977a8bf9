"""The thread policy of moe_lab.core.runtime (issue 26): one torch thread on a CPU in modes "cpu" and "ci",
torch's default on a GPU, MOE_LAB_THREADS or OMP_NUM_THREADS when set; said in the summary line.

Run: .venv/bin/python -m pytest tests/test_thread_policy.py -q
"""
import pytest
import torch

from moe_lab.core import runtime


@pytest.mark.parametrize("mode", ["cpu", "ci"])
def test_one_thread_for_the_tiny_presets_on_a_cpu(mode):
    n, why = runtime.thread_policy(mode, "cpu", env={})
    assert n == 1 and "MOE_LAB_THREADS" in why


def test_gpu_mode_keeps_torchs_default():
    assert runtime.thread_policy("gpu", "cuda", env={}) == (None, "torch's default")
    assert runtime.thread_policy("gpu", "cpu", env={})[0] is None  # gpu presets forced onto a CPU: torch decides


def test_the_environment_overrides_the_policy_moe_lab_threads_first():
    assert runtime.thread_policy("cpu", "cpu", env={"OMP_NUM_THREADS": "2"}) == (None, "OMP_NUM_THREADS=2")  # torch has it
    assert runtime.thread_policy("cpu", "cpu", env={"OMP_NUM_THREADS": "4,2"}) == (None, "OMP_NUM_THREADS=4,2")
    assert runtime.thread_policy("cpu", "cpu", env={"OMP_NUM_THREADS": "2", "MOE_LAB_THREADS": "3"}) == \
        (3, "MOE_LAB_THREADS=3")
    assert runtime.thread_policy("gpu", "cuda", env={"MOE_LAB_THREADS": "4"})[0] == 4
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ValueError, match=rf"MOE_LAB_THREADS='{bad}': expected a whole number of threads >= 1"):
            runtime.thread_policy("cpu", "cpu", env={"MOE_LAB_THREADS": bad})


def test_setup_applies_the_policy_and_says_so(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MOE_LAB_THREADS", "2")
    try:
        rt = runtime.setup(mode="ci")
        if rt.on_gpu:
            pytest.skip("the summary names threads on a CPU only")
        assert torch.get_num_threads() == 2
        assert "threads=2 (MOE_LAB_THREADS=2)" in capsys.readouterr().out
        monkeypatch.delenv("MOE_LAB_THREADS")
        runtime.setup(mode="ci")
        assert torch.get_num_threads() == 1
        assert "threads=1 (the course's CPU policy; MOE_LAB_THREADS=N to change)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
