"""The machine a figure was measured on, named the same way in every record: device name, driver,
versions, date and command (README, "Benchmarks"), the file-name form of a device's name, and the
limits of the GPUs the course names."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from moe_lab.core import paths
from moe_lab.core.runtime import default_device, triton_version

# Named GPUs: the largest shared memory one program (CUDA block) may use, the "opt-in" per-block limit
# Triton checks when it compiles a kernel (an H100 SM has 228 KiB, of which one block may take 227 KiB),
# and the compute capability (bfloat16 from 8.0). For planning and tests without the GPU at hand; a
# real device is asked (moe_lab.kernels.config_table.device_limits).
KNOWN_GPUS = {
    "T4": dict(shared_memory=64 * 1024, capability=(7, 5)),
    "V100": dict(shared_memory=96 * 1024, capability=(7, 0)),
    "A10": dict(shared_memory=99 * 1024, capability=(8, 6)),
    "L4": dict(shared_memory=99 * 1024, capability=(8, 9)),
    "A100": dict(shared_memory=163 * 1024, capability=(8, 0)),
    "H100": dict(shared_memory=227 * 1024, capability=(9, 0)),
    "H200": dict(shared_memory=227 * 1024, capability=(9, 0)),
}


def device_name(device=None) -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU; 'CPU: <model name> (<n> cores)' otherwise."""
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores)"


def slugify(name: str) -> str:
    """A file-name-safe form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"name={name!r}: nothing left to make a file name from")
    return slug


def driver_version(device=None) -> str:
    """The NVIDIA driver version (from nvidia-smi), or a plain statement of why there is none."""
    device = torch.device(device or default_device())
    if device.type != "cuda":
        return "none (CPU)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return f"unknown (nvidia-smi not available; CUDA runtime {torch.version.cuda})"


def environment_record(device, command: Optional[str] = None) -> dict:
    """What a recorded figure must carry (README, "Benchmarks"): device, driver, versions, date and command."""
    return {
        "device": device_name(device),
        "driver": driver_version(device),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(["python -m moe_lab bench", *sys.argv[1:]]),
    }


def git_commit() -> Optional[str]:
    """The commit the bench ran at (MOE_LAB_COMMIT, else `git rev-parse`), '+dirty' when the tree has changes."""
    if os.environ.get("MOE_LAB_COMMIT"):
        return os.environ["MOE_LAB_COMMIT"]
    root = paths.repository()
    if root is None:  # installed without a clone: no commit to name
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
