"""Runtime policy, decided in one place: mode, device, dtype, seeding and the Triton interpreter.

Every switch of how the course runs is read here and nowhere else: MOE_LAB_MODE, MOE_LAB_FAST / CI,
MOE_LAB_DEVICE, MOE_LAB_THREADS, MOE_LAB_TRITON_INTERPRET (and Triton's own TRITON_INTERPRET),
MOE_LAB_TRITON_AUTOTUNE, MOE_LAB_ALIGN, MOE_LAB_KERNEL_TABLE. Commands take their `--device` default
from `default_device()`; the kernels ask `triton_interpret()`. Two switches of where things are
written live with what they name: MOE_LAB_RUNS (moe_lab.core.paths) and MOE_LAB_COMMIT
(moe_lab.core.machine).

Modes (README, "CPU, GPU and the three modes"): "gpu" (CUDA present: full presets, bf16, compiled
Triton), "cpu" (presets that learn something real in minutes on 2 cores, float32, Triton through its
interpreter) and "ci" (the smallest presets that still exercise every code path). The mode comes
from, in order:

    1. the argument `setup(mode=...)`
    2. the environment variable MOE_LAB_MODE ("gpu", "cpu" or "ci")
    3. "ci" when CI or MOE_LAB_FAST is set to a true value ("1", "true", "yes")
    4. "gpu" when CUDA is available, else "cpu"

MOE_LAB_DEVICE=cpu forces the CPU even where CUDA exists. Triton kernels run through Triton's CPU
interpreter when no GPU is used, or when MOE_LAB_TRITON_INTERPRET=1 (to step through kernels on a
GPU machine too); an explicit TRITON_INTERPRET in the environment is left as it is.
Threads: see `thread_policy` (one torch thread on a CPU in modes "cpu" and "ci";
MOE_LAB_THREADS=N or OMP_NUM_THREADS=N to choose).
"""
from __future__ import annotations

import os
import platform
import random
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import moe_lab

MODES = ("gpu", "cpu", "ci")


def truthy(value: Optional[str]) -> bool:
    """How every MOE_LAB_* flag is read: "1", "true", "yes" or "on" (any case) is true."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def check_mode(mode: str, what: str = "mode") -> str:
    """`mode` if it is one of MODES, else a ValueError naming `what` and the value."""
    if mode not in MODES:
        raise ValueError(f"{what}={mode!r}: expected one of {MODES}")
    return mode


def detect_mode(env: Optional[dict] = None) -> str:
    """The mode this machine runs in, from the environment (see the module docstring)."""
    env = os.environ if env is None else env
    forced = env.get("MOE_LAB_MODE", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"MOE_LAB_MODE={forced!r}: expected one of {MODES}")
        return forced
    if truthy(env.get("CI")) or truthy(env.get("MOE_LAB_FAST")):
        return "ci"
    return "gpu" if _cuda_usable(env) else "cpu"


def _cuda_usable(env: Optional[dict] = None) -> bool:
    env = os.environ if env is None else env
    return torch.cuda.is_available() and env.get("MOE_LAB_DEVICE", "").strip().lower() != "cpu"


def default_device(env: Optional[dict] = None) -> str:
    """The device every command and notebook uses unless told otherwise: "cuda" where a GPU is
    usable and MOE_LAB_DEVICE=cpu is not set, else "cpu"."""
    return "cuda" if _cuda_usable(env) else "cpu"


def triton_interpret(env: Optional[dict] = None) -> bool:
    """Whether Triton kernels run through Triton's CPU interpreter in this process: TRITON_INTERPRET
    when set explicitly, else MOE_LAB_TRITON_INTERPRET=1, else whenever no GPU is used."""
    env = os.environ if env is None else env
    if env.get("TRITON_INTERPRET", "").strip():
        return truthy(env["TRITON_INTERPRET"])
    return truthy(env.get("MOE_LAB_TRITON_INTERPRET")) or not _cuda_usable(env)


def choose_triton_interpreter(device=None) -> bool:
    """Set TRITON_INTERPRET=1 when `triton_interpret()` says so, or when `device` (a command's
    --device) is the CPU (Triton reads it when a @triton.jit function is defined, so this runs before
    the kernels are imported); returns the choice."""
    interpret = triton_interpret() or (device is not None and torch.device(device).type == "cpu")
    if interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return interpret


def triton_autotune(env: Optional[dict] = None) -> bool:
    """MOE_LAB_TRITON_AUTOTUNE=1: the MoE kernels time configurations with triton.autotune instead of
    reading the tuned table (compiled kernels only)."""
    env = os.environ if env is None else env
    return truthy(env.get("MOE_LAB_TRITON_AUTOTUNE"))


def align_in_one_launch(env: Optional[dict] = None) -> bool:
    """False when MOE_LAB_ALIGN=torch: the routing layout is then built from PyTorch ops, not one kernel."""
    env = os.environ if env is None else env
    return env.get("MOE_LAB_ALIGN", "auto").strip().lower() != "torch"


def kernel_table_override(env: Optional[dict] = None) -> Optional[str]:
    """MOE_LAB_KERNEL_TABLE: the path of a kernel configuration table to use instead of the device's."""
    env = os.environ if env is None else env
    return env.get("MOE_LAB_KERNEL_TABLE", "").strip() or None


def require_device(device) -> torch.device:
    """The torch.device for a name such as "cpu", "cuda" or "cuda:1", or a ValueError that says plainly
    why it cannot be used here (no CUDA in this torch build, no GPU visible, an index past the last GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N' (the course runs on CPUs and CUDA GPUs)")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise ValueError(f"device={device!r}: {why} (torch {torch.__version__}); use device='cpu'")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return dev


def pick_dtype(device: torch.device, capability: Optional[tuple] = None) -> torch.dtype:
    """bf16 on GPUs that have it (compute capability >= 8.0: A100, H100, RTX 30xx+), fp16 on older
    GPUs (T4, V100), float32 on the CPU. `capability` can be passed to simulate a GPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a rerun gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:  # not installed (macOS) or broken install
        return None


@dataclass(frozen=True)
class Runtime:
    """What this notebook runs on. Print it with `print(rt)` or `rt.summary()`."""

    mode: str  # "gpu", "cpu" or "ci": which preset sizes to use
    device: torch.device  # where tensors live
    dtype: torch.dtype  # compute dtype for models and kernels
    seed: int  # the seed everything was seeded with
    triton_interpret: bool  # True when Triton kernels run through the CPU interpreter

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def summary(self) -> str:
        dev = torch.cuda.get_device_name(self.device) if self.on_gpu else f"CPU ({os.cpu_count()} cores)"
        if not self.on_gpu:
            dev += f", threads={torch.get_num_threads()} ({_THREADS_SOURCE})"
        tri = triton_version()
        tri = "not installed" if tri is None else tri + (" (interpreter)" if self.triton_interpret else " (compiled)")
        return (f"moe-lab | mode={self.mode} | device={dev} | dtype={str(self.dtype).replace('torch.', '')} | "
                f"seed={self.seed} | python {platform.python_version()} | torch {torch.__version__} | triton {tri}")

    def __str__(self) -> str:
        return self.summary()


def setup(seed: int = 0, mode: Optional[str] = None, verbose: bool = True) -> Runtime:
    """Decide mode, device and dtype, seed everything, and print a one-line summary.

    Also: warns when mode "gpu" is forced on a machine without a usable GPU (the GPU presets then
    run on the CPU, many times slower); says when torch's OpenMP threads spin while waiting (see
    `omp_note`); on Colab with ipywidgets 8, enables the custom widget manager Colab needs to
    draw them (`colab_widgets`)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"setup(mode={mode!r}): expected one of {MODES} or None")
    mode = mode or detect_mode()
    device = torch.device(default_device())
    if mode == "gpu" and device.type != "cuda":
        warnings.warn(gpu_mode_without_gpu_message(), UserWarning, stacklevel=2)
    apply_thread_policy(mode, device)
    interpret = choose_triton_interpreter()  # Triton kernels defined after this point run on CPU tensors
    seed_everything(seed)
    rt = Runtime(mode=mode, device=device, dtype=pick_dtype(device), seed=seed, triton_interpret=interpret)
    if in_colab():
        colab_widgets()
    if verbose:
        print(rt.summary(), file=sys.stdout)
        note = omp_note()
        if note:
            print(note, file=sys.stdout)
    return rt


def gpu_mode_without_gpu_message() -> str:
    why = ("MOE_LAB_DEVICE=cpu is set" if torch.cuda.is_available() else "torch sees no CUDA GPU")
    return (f"mode 'gpu' was asked for (setup(mode=...) or MOE_LAB_MODE), but {why}: the GPU presets will run on "
            "the CPU, many times slower than mode 'cpu' (notebook 05: about 5 min instead of 30 s). "
            "Unset MOE_LAB_MODE (or set it to 'cpu') unless you mean it.")


def omp_note() -> Optional[str]:
    """A line for the learner when torch's OpenMP threads spin while they wait, else None.

    OMP_WAIT_POLICY is read once, when torch loads its OpenMP library: `import moe_lab` (and
    `make lab`) set it to PASSIVE in time, but not when torch was imported first without it. Then
    two kernels computing at once on a small machine slow each other down many times over."""
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    if moe_lab.OMP_POLICY_SET_BEFORE_TORCH and policy.upper() != "ACTIVE":
        return None
    return ("note: torch's OpenMP threads spin while waiting here (torch was loaded before OMP_WAIT_POLICY=PASSIVE "
            "was set): if two notebooks compute at once they stall each other. Restart the kernel and import "
            "moe_lab first, or start Jupyter with OMP_WAIT_POLICY=PASSIVE (make lab does).")


def colab_widgets() -> bool:
    """On Colab, enable the custom widget manager that ipywidgets 8 needs there; True if enabled.

    Colab draws ipywidgets 7 itself and ipywidgets 8 only through its custom widget manager; the
    course's widgets use only what both versions share (moe_lab.course.widgets)."""
    try:
        import ipywidgets
        from google.colab import output  # type: ignore[import-not-found]
    except ImportError:
        return False
    if int(ipywidgets.__version__.split(".")[0]) < 8 or not hasattr(output, "enable_custom_widget_manager"):
        return False
    output.enable_custom_widget_manager()
    return True


def in_colab() -> bool:
    return "google.colab" in sys.modules


def environment_table(rt: Runtime) -> list[tuple[str, str]]:
    """What this machine offers the course, as (item, value) rows for notebook 00."""
    rows = [
        ("python", platform.python_version()),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("torch", torch.__version__),
        ("triton", triton_version() or "not installed (macOS/Windows: notebooks 05-07 cannot run kernels)"),
        ("CUDA available", str(torch.cuda.is_available())),
        ("device", torch.cuda.get_device_name(rt.device) if rt.on_gpu else f"CPU, {os.cpu_count()} cores"),
        ("compute dtype", str(rt.dtype).replace("torch.", "")),
        ("Triton kernels run", "compiled on the GPU" if rt.on_gpu else "through the interpreter (slow, small shapes)"),
        ("mode / presets", rt.mode),
        ("Colab", str(in_colab())),
    ]
    if rt.on_gpu:
        major, minor = torch.cuda.get_device_capability(rt.device)
        rows.append(("compute capability", f"{major}.{minor}"))
    return rows


# ---- the thread policy (issue 26): how many torch threads the course's CPU work uses -------------
# Measured on a 2-core x86 CPU with `python -m moe_lab cpu-bench` (README, "CPU step times"): the
# tiny presets' training steps are many small operations, and each one run on 2 threads pays for
# waking the second thread (OMP_WAIT_POLICY=PASSIVE) or spins it (OpenMP's default, which stalls a
# second notebook computing at once). One thread was as fast as or faster than either, alone, and
# two notebooks at once then share the cores without slowing each other. So setup() uses one torch
# thread on a CPU in modes "cpu" and "ci"; GPU mode keeps torch's default. The wait policy itself is
# set on `import moe_lab` (moe_lab/__init__.py), before torch loads.
THREADS_ENV = "MOE_LAB_THREADS"  # MOE_LAB_THREADS=N: use N torch threads (wins over OMP_NUM_THREADS)
CPU_THREADS = 1  # the policy's choice for modes "cpu" and "ci" on a CPU
_THREADS_SOURCE = "torch's default"  # why torch has the threads it has: said in the summary line


def thread_policy(mode: str, device, env: Optional[dict] = None) -> tuple[Optional[int], str]:
    """(torch threads to use, or None to leave torch's own choice; the reason, for the summary line).

    In order: MOE_LAB_THREADS=N; OMP_NUM_THREADS (torch started with it: left as it is); one thread
    on a CPU in modes "cpu" and "ci"; else torch's default. A MOE_LAB_THREADS that is not a whole
    number >= 1 is a ValueError naming it."""
    env = os.environ if env is None else env
    text = env.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{THREADS_ENV}={text!r}: expected a whole number of threads >= 1")
        return int(text), f"{THREADS_ENV}={int(text)}"
    if env.get("OMP_NUM_THREADS", "").strip():  # OpenMP's own setting (e.g. "2", or "4,2" for nesting)
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS'].strip()}"
    if torch.device(device).type == "cpu" and mode in ("cpu", "ci"):
        return CPU_THREADS, f"the course's CPU policy; {THREADS_ENV}=N to change"
    return None, "torch's default"


def apply_thread_policy(mode: str, device) -> int:
    """Set torch's thread count by `thread_policy`; returns the count now in use."""
    global _THREADS_SOURCE
    n, _THREADS_SOURCE = thread_policy(mode, device)
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
