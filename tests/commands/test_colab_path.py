"""The Colab path: the package installed as the notebooks' setup cell installs it (a wheel, not an
editable clone), notebooks opened alone in an empty folder, and still the same data as a clone.

What this reproduces, without Colab and without the network:
- a fresh virtual environment (`venv --without-pip`) that sees this environment's packages (torch,
  nbclient, pip, setuptools ...) through a .pth file. A .pth line is a plain sys.path entry: the .pth
  files inside that folder (among them the editable install's finder of moe_lab) are never run, so
  this clone's moe_lab is invisible there;
- the package built from a copy of the repository and installed non-editable into that environment
  (`pip install --no-deps --no-build-isolation`), as `pip install git+https://...` does on Colab;
- notebooks 00, 07, 08 and 10, each copied alone into an empty folder and executed there by a kernel
  of that environment with MOE_LAB_MODE=ci.
Asserts: `import moe_lab` is the installed copy (no clone beside it); 07 plots the recorded H200 run;
08 and 10 load the shipped checkpoint instead of training; 10 prints the recorded MLA study's verdict.

Run (about 2-3 min on 2 cores): .venv/bin/python -m pytest tests/commands/test_colab_path.py -q
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("00_setup", "07_profiling", "08_grpo", "10_mla_kv_cache")
KERNEL = "moe-lab-colab-path"
# Appended to each notebook as run: which moe_lab the kernel imported, and whether a clone is beside it.
PROBE = ("import moe_lab\nfrom moe_lab.core import paths as _paths\n"
         "print('PROBE', moe_lab.__file__, '|', _paths.repository(), '|', _paths.data_dir())")

pytestmark = pytest.mark.slow


def _copy_for_build(dest: Path) -> Path:
    """What building the package reads (pyproject.toml, README.md, moe_lab/, data/), nothing of this
    checkout's build outputs or caches."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("moe_lab", "data"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    return dest


@pytest.fixture(scope="module")
def colab_env(tmp_path_factory):
    """A fresh environment with moe_lab installed from a wheel: (its python, its site-packages)."""
    base = tmp_path_factory.mktemp("colab_path")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               cwd=base, check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "project_packages.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    env = _clean_env()
    # before the install: the new environment must not see this clone's moe_lab at all
    seen = subprocess.run([str(python), "-c", "import moe_lab"], env=env, cwd=base, capture_output=True, text=True)
    assert seen.returncode != 0 and "No module named 'moe_lab'" in seen.stderr, (
        "the fresh environment imports moe_lab before it is installed (the editable install leaks in): "
        f"{seen.stdout}{seen.stderr}")
    source = _copy_for_build(base / "source")
    # --ignore-installed: never touch the editable moe-lab that pip sees through the .pth file
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--ignore-installed", "--no-index", str(source)],
                   env=env, check=True, cwd=base, capture_output=True)
    return python, site.resolve()  # resolved, as moe_lab.core.paths resolves its own location


def _clean_env() -> dict:
    """This process's environment without what would point the new one back at the clone, with the
    notebooks' ci presets, and matplotlib left to the kernel's inline backend (figures as outputs)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MPLBACKEND", "MOE_LAB_RUNS", "VIRTUAL_ENV", "PYTHONHOME")}
    env["MOE_LAB_MODE"] = "ci"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_the_installed_package_has_the_shipped_files(colab_env, tmp_path):
    """The wheel carries data/ as moe_lab/_data, and core.paths finds it there from any folder."""
    python, site = colab_env
    code = ("import moe_lab, json\nfrom moe_lab.core import paths\n"
            "from moe_lab.training.checkpoint import shipped_checkpoint\n"
            "from moe_lab.studies import bench_records, mla_study\n"
            "print(json.dumps({'file': moe_lab.__file__, 'clone': str(paths.repository()),\n"
            "  'data': str(paths.data_dir()), 'ckpt': str(shipped_checkpoint('moe_cpu')),\n"
            "  'bench': [r['device'] for r in bench_records.load_bench_records()],\n"
            "  'study': mla_study.load_record('cpu') is not None}))")
    out = subprocess.run([str(python), "-c", code], env=_clean_env(), cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site), f"moe_lab imported from {got['file']}, not the installed copy in {site}"
    assert got["clone"] == "None"
    assert Path(got["data"]) == site / "moe_lab" / "_data"
    assert got["ckpt"] == str(site / "moe_lab" / "_data" / "checkpoints" / "moe_cpu.safetensors")
    assert any("H200" in device for device in got["bench"]), got["bench"]
    assert got["study"]


@pytest.fixture(scope="module")
def executed(colab_env, tmp_path_factory):
    """Each notebook copied alone into an empty folder and executed there by the new environment's kernel:
    {name: the executed notebook}. A notebook that fails raises here, naming its cell."""
    from nbclient import NotebookClient

    python, _ = colab_env
    base = tmp_path_factory.mktemp("colab_notebooks")
    kernels = base / "jupyter" / "kernels" / KERNEL
    kernels.mkdir(parents=True)
    env = _clean_env()
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab path (moe_lab installed from a wheel)", "language": "python"}))
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for key in set(os.environ) - set(env):
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setenv("JUPYTER_PATH", str(base / "jupyter"))
        for name in NOTEBOOKS:
            folder = base / name
            folder.mkdir()
            shutil.copy2(ROOT / "notebooks" / f"{name}.ipynb", folder / f"{name}.ipynb")
            assert sorted(p.name for p in folder.iterdir()) == [f"{name}.ipynb"]
            nb = nbformat.read(folder / f"{name}.ipynb", as_version=4)
            nb.cells.append(nbformat.v4.new_code_cell(PROBE))
            NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(folder)}}).execute()
            results[name] = nb
    return results


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _all_text(nb) -> str:
    return "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_ran_on_the_installed_package(executed, colab_env, name):
    _, site = colab_env
    probe = _text(executed[name].cells[-1])
    assert probe.startswith("PROBE "), probe
    file, clone, data = (part.strip() for part in probe[len("PROBE "):].split("|"))
    assert Path(file).resolve().is_relative_to(site), f"{name}: the kernel imported moe_lab from {file}, not from {site}"
    assert clone == "None" and Path(data) == site / "moe_lab" / "_data", probe


def test_07_plots_the_recorded_gpu_run(executed):
    cells = [c for c in executed["07_profiling"].cells if c.cell_type == "code"]
    text = _all_text(executed["07_profiling"])
    assert "No recorded GPU figures yet" not in text
    plotted = [c for c in cells if "recorded on NVIDIA H200" in _text(c)]
    assert plotted, "notebook 07 printed no 'recorded on NVIDIA H200' label"
    assert any("image/png" in out.get("data", {}) for out in plotted[0].outputs), "the recorded run was not plotted"


@pytest.mark.parametrize("name", ["08_grpo", "10_mla_kv_cache"])
def test_the_shipped_checkpoint_is_loaded_not_retrained(executed, name):
    said = {"08_grpo": "loaded the shipped checkpoint moe_cpu.safetensors (no training)",
            "10_mla_kv_cache": "loaded moe_cpu.safetensors"}[name]
    text = _all_text(executed[name])
    assert said in text, f"{name} did not load the shipped checkpoint (expected {said!r} in its output)"
    assert "trained here" not in text


def test_10_shows_the_recorded_mla_study(executed):
    text = _all_text(executed["10_mla_kv_cache"])
    assert "no recorded comparison here" not in text
    assert "final validation loss, mean of seeds" in text and "MLA - MHA per seed" in text
