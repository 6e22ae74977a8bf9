"""The command-line tools refuse bad arguments before any work, naming them; a missing device is said
plainly; expert back-ends name a weight of the wrong dtype; distributed runs leave no temporary
files behind (the forkserver's pymp-* socket folder, torchrun's torchelastic_* folder).

Run: .venv/bin/python -m pytest tests/studies/test_reliability_cli.py -q
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")


def _no_work(*args, **kwargs):
    raise AssertionError("work started despite a bad argument")


# --- python -m moe_lab train ------------------------------------------------------------------------------
def test_train_steps_0_is_refused_at_once_not_run_as_the_presets_600():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "moe_lab", "train", "--preset", "ci", "--steps", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "argument --steps: 0" in out.stderr, out.stdout + out.stderr
    assert time.perf_counter() - t0 < 60  # no training ran


def test_train_course_model_with_steps_0_names_the_field(monkeypatch):
    import moe_lab.training.recipe as train_mod

    monkeypatch.setattr(train_mod, "train", _no_work)
    with pytest.raises(ValueError, match=r"TrainConfig\.steps=0"):
        train_mod.train_course_model("ci", steps=0, progress=False)


@pytest.mark.parametrize("args, words", [
    (["--steps", "-3"], "argument --steps: -3"),
    (["--steps", "x"], "argument --steps: 'x'"),
    (["--seed", "-1"], "argument --seed: -1"),
    (["--preset", "tpu"], "argument --preset"),
    (["--out", "runs/m.pt"], "argument --out: checkpoint runs/m.pt: expected a file name ending in .safetensors"),
    (["--out", "README.md/m.safetensors"], "README.md is a file"),
    (["--device", "tpu"], "argument --device: device='tpu'"),
])
def test_train_names_a_bad_argument_before_any_work(args, words, capsys, monkeypatch):
    import moe_lab.training.recipe as train_mod

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(train_mod, "train_course_model", _no_work)
    with pytest.raises(SystemExit) as info:
        train_mod.main(args)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "argument --steps: 0"),  # `steps or preset's` ran the preset's whole length
    (["--steps", "-3"], "argument --steps: -3"),
    (["--seeds", "a,b"], "argument --seeds: 'a,b'"),
] + ([(["--device", "cuda"], "argument --device: device='cuda'")] if not torch.cuda.is_available() else []))
def test_mla_study_names_a_bad_argument_before_any_work(args, words, capsys, monkeypatch):
    import moe_lab.studies.mla_study as study

    monkeypatch.setattr(study, "compare", _no_work)
    with pytest.raises(SystemExit) as info:
        study.main(args)
    assert info.value.code == 2  # argparse's usage error, as train's
    assert words in capsys.readouterr().err


@NO_CUDA
def test_train_says_plainly_that_cuda_is_missing(capsys, monkeypatch):
    import moe_lab.training.recipe as train_mod

    monkeypatch.setattr(train_mod, "train_course_model", _no_work)
    with pytest.raises(SystemExit):
        train_mod.main(["--device", "cuda"])
    err = capsys.readouterr().err
    assert "argument --device: device='cuda'" in err and "CUDA" in err and "device='cpu'" in err


def test_require_device():
    from moe_lab.core.runtime import require_device

    assert require_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        require_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            require_device("cuda:0")


# --- python -m moe_lab distributed ------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--tokens", "0"], "argument --tokens: 0: expected an integer >= 1"),
    (["--d-model", "0"], "argument --d-model"),
    (["--top-k", "9"], "argument --top-k: 9: expected at most --n-experts=8"),
    (["--n-experts", "6", "--world-size", "4"], "argument --n-experts: 6: expected a multiple of the world size 4"),
    (["--n-shared", "-1"], "argument --n-shared"),
    (["--world-size", "0"], "argument --world-size"),
    (["--capacity-factor", "nan"], "argument --capacity-factor: nan"),
    (["--capacity-factor", "0"], "argument --capacity-factor: 0.0"),
    (["--tol", "inf"], "argument --tol: inf"),
    (["--timeout", "-5"], "argument --timeout: -5.0"),
    (["--local-backend", "triton"], "argument --dtype: 'float64'"),
])
def test_distributed_names_a_bad_argument_before_starting_a_process(args, words, capsys, monkeypatch):
    import moe_lab.distributed.__main__ as cli

    monkeypatch.setattr(cli, "launch", _no_work)
    assert cli.main(args) == 2
    assert words in capsys.readouterr().err


@NO_CUDA
def test_distributed_says_plainly_that_nccl_needs_cuda(capsys, monkeypatch):
    import moe_lab.distributed.__main__ as cli

    monkeypatch.setattr(cli, "launch", _no_work)
    assert cli.main(["--backend", "nccl"]) == 2
    err = capsys.readouterr().err
    assert "argument --backend: 'nccl' runs one rank per CUDA GPU" in err and "--backend gloo" in err


# --- python -m moe_lab gpu-suite (its checks are the integrator's; these pin what they refuse) ---------------
@pytest.mark.parametrize("args, words", [
    (["--budget-s", "0"], "--budget-s 0.0"),
    (["--budget-s", "nan"], "--budget-s nan"),
    (["--timeout-tests", "-1"], "--timeout-tests -1.0"),
    (["--timeout-bench", "nan"], "--timeout-bench nan"),
])
def test_gpu_suite_names_a_bad_argument_even_in_a_dry_run(tmp_path, args, words, capsys):
    from moe_lab.commands import gpu_suite

    with pytest.raises(SystemExit) as info:
        gpu_suite.main(["--out", str(tmp_path / "out"), "--dry-run", *args])
    assert info.value.code == 2 and words in capsys.readouterr().err


# --- expert back-ends name a weight of the wrong dtype -------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "sorted"])
@pytest.mark.parametrize("bad", ["w1", "w3", "w2"])
def test_expert_backends_name_a_weight_of_another_dtype(backend, bad):
    from moe_lab.model.expert_backends import run_experts

    torch.manual_seed(0)
    x, idx, w = torch.randn(5, 4), torch.randint(0, 2, (5, 2)), torch.rand(5, 2)
    W = {"w1": torch.randn(2, 4, 6), "w3": torch.randn(2, 4, 6), "w2": torch.randn(2, 6, 4)}
    W[bad] = W[bad].double()
    with pytest.raises(TypeError, match=rf"{bad} has dtype torch.float64 but x has torch.float32"):
        run_experts(backend, x, idx, w, W["w1"], W["w3"], W["w2"])


# --- no temporary files left behind ------------------------------------------------------------------------
@pytest.fixture
def private_tmp():
    """A fresh, short temporary folder (a Unix socket path inside it must stay under ~100 characters)."""
    folder = Path(tempfile.mkdtemp(prefix="mlt"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _leftovers(folder: Path, wait: float = 10.0) -> list:
    deadline = time.monotonic() + wait
    while True:
        left = sorted(p.name for p in folder.iterdir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_a_killed_notebook_kernel_leaves_no_forkserver_socket_folder(tmp_path, private_tmp):
    """Like nbval and Jupyter's "shut down now": SIGKILL to the kernel's whole process group after a launch()."""
    tmp = private_tmp
    script = textwrap.dedent("""
        import os, signal
        from moe_lab.distributed import launch
        from moe_lab.distributed.workers import sleep_on_rank
        if __name__ == "__main__":
            assert launch(sleep_on_rank, 2, -1, 0.0, timeout=60) == [0, 1]
            print(sorted(os.listdir(os.environ["TMPDIR"])), flush=True)
            os.killpg(0, signal.SIGKILL)
    """)
    (tmp_path / "kernel.py").write_text(script)
    out = subprocess.run([sys.executable, str(tmp_path / "kernel.py")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True)
    assert out.returncode == -9 and "pymp-" in out.stdout, out.stdout + out.stderr  # the folder existed
    assert _leftovers(tmp) == []


def test_a_torchrun_run_leaves_no_torchelastic_folder(private_tmp):
    tmp = private_tmp
    code = ("from moe_lab.distributed.launch import run_torchrun; r = run_torchrun(2, '--tokens', 8); "
            "print(r.returncode); print(r.stdout); print(r.stderr[-2000:])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert out.stdout.startswith("0\n") and "match (tolerance" in out.stdout, out.stdout + out.stderr
    assert _leftovers(tmp, wait=2.0) == []
