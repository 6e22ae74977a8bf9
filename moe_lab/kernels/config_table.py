"""Which configuration each MoE kernel launches with: tables tuned ahead per device, a heuristic
where there is none, autotuning only when asked for.

A Triton GEMM kernel has free parameters that do not change what it computes but decide how fast it
runs: the tile (BLOCK_M x BLOCK_N), the reduction step BLOCK_K, the program order GROUP_M (see
moe_gemm), the warps per program and the pipeline depth `num_stages`. `triton.autotune` times a list
of them the first time a kernel meets a new shape: every new shape then compiles and times every
configuration before the first result, which makes a learner wait. Like vLLM's and SGLang's fused-MoE
kernels, the course instead reads a table per device, written ahead by `python -m moe_lab tune` on
that device and shipped with the course (found by moe_lab.core.paths):

    data/kernel_tables/<device>.json      e.g. nvidia-h200.json (which tables ship: data/kernel_tables/README.md)

holding, for the layer shapes of the course and a grid of token counts, the winning configuration of
each kernel with its measured time and the runner-up. At run time `choose` looks up the nearest
bucket (same dtype size, nearest (d, f) and rows per expert on a log scale): one compile per kernel
and configuration, no timing. Where the device has no table (or a float32 problem, which the tables
do not cover), `heuristic` picks a configuration that fits the device's shared memory, computed from
the tile sizes, stages and dtype (`shared_memory_bytes`); a T4, Colab's usual GPU, has 64 KiB per
block and no bfloat16. `MOE_LAB_TRITON_AUTOTUNE=1` switches to `triton.autotune` over `space()`
instead (notebook 07 shows what it does); under Triton's CPU interpreter every kernel uses one small
configuration (`INTERPRETER_CONFIG`).

Kernels (moe_gemm, moe_backward) and the tensors each program loads per reduction step:

    row-block kernels: one program per BLOCK_M sorted rows (one expert) x BLOCK_N output columns
        up              x rows (M x K), w1 and w3 tiles (2 x K x N)        d -> f, two accumulators
        down            h rows (M x K), w2 tile (K x N)                    f -> d
        swiglu_backward dy rows (M x K), w2^T tile (K x N)                 d -> f
        dx              da1, da3 rows (2 x M x K), w1^T, w3^T (2 x K x N)  f -> d
    weight-gradient kernels: one program per expert x (BLOCK_M x BLOCK_N) tile of the weight,
    stepping through the expert's rows BLOCK_K at a time
        dw13            x^T (M x K), da1 and da3 (2 x K x N)               (d x f), two accumulators
        dw2             h^T (M x K), dy (K x N)                            (f x d)

The row-block kernels share one layout (moe_routing.moe_align), so their BLOCK_M is the layout's
block_m: a table bucket names the block_m that was fastest for inference ("forward": up + down) and
for training (all six kernels), with the configurations of every kernel at that block_m.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from moe_lab.core import paths
from moe_lab.core.cost import kernel_itemsize
from moe_lab.core.machine import KNOWN_GPUS, slugify
from moe_lab.core.runtime import kernel_table_override

CONFIG_DIR = paths.data_path("kernel_tables")
SCHEMA = 1

ROW_KERNELS = ("up", "down", "swiglu_backward", "dx")
WEIGHT_KERNELS = ("dw13", "dw2")
KERNELS = ROW_KERNELS + WEIGHT_KERNELS
FORWARD_KERNELS = ("up", "down")

# Tiles each kernel loads per reduction step: (A tiles of BLOCK_M x BLOCK_K, B tiles of BLOCK_K x BLOCK_N),
# and the float32 accumulators it keeps (BLOCK_M x BLOCK_N each). See the module docstring.
KERNEL_TILES = {
    "up": (1, 2, 2), "down": (1, 1, 1), "swiglu_backward": (1, 1, 1), "dx": (2, 2, 1),
    "dw13": (1, 2, 2), "dw2": (1, 1, 1),
}



@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of an MoE kernel (the meta-parameters Triton compiles in)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 1; got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps must be 1, 2, 4, 8 or 16; got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"KernelConfig.num_stages must be an integer in 1..8; got {self.num_stages!r}")

    @property
    def meta(self) -> dict:
        """Keyword arguments of a kernel launch: the constexprs and Triton's num_warps / num_stages."""
        return asdict(self)

    @property
    def constexprs(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K, GROUP_M=self.GROUP_M)

    def short(self) -> str:
        return (f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K} g{self.GROUP_M} "
                f"w{self.num_warps} s{self.num_stages}")

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown KernelConfig keys {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


INTERPRETER_CONFIG = KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
"""The one configuration under Triton's interpreter, which pays per program and per loop step (BLOCK_M of
the row-block kernels comes from the layout instead)."""


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")


# ----------------------------------------------------------------------------------------------
# Shared memory
# ----------------------------------------------------------------------------------------------
def shared_memory_bytes(kernel: str, cfg: KernelConfig, dtype) -> int:
    """Shared memory a configuration needs, estimated the way Triton's pipeliner allocates it: each of
    `num_stages` stages holds the step's tiles (KERNEL_TILES), in the input dtype; the epilogue's
    layout conversion may reuse that space for one float32 BLOCK_M x BLOCK_N tile, so the need is the
    larger of the two. Triton's own count can differ by a few KiB; `fits` keeps a margin."""
    _check_kernel(kernel)
    n_a, n_b, _ = KERNEL_TILES[kernel]
    size = kernel_itemsize(dtype)
    stage = (n_a * cfg.BLOCK_M * cfg.BLOCK_K + n_b * cfg.BLOCK_K * cfg.BLOCK_N) * size
    epilogue = cfg.BLOCK_M * cfg.BLOCK_N * 4
    return max(max(1, cfg.num_stages) * stage, epilogue)


def accumulator_registers(kernel: str, cfg: KernelConfig) -> float:
    """float32 accumulator registers per thread (BLOCK_M x BLOCK_N per accumulator, over num_warps x 32
    threads). Past about 128 the compiler spills to local memory, which is slow."""
    _check_kernel(kernel)
    return KERNEL_TILES[kernel][2] * cfg.BLOCK_M * cfg.BLOCK_N / (cfg.num_warps * 32)


def fits(kernel: str, cfg: KernelConfig, dtype, shared_memory_limit: int, margin: int = 4096) -> bool:
    """Whether `cfg` fits `shared_memory_limit` bytes per block (with a margin for Triton's extras) and
    keeps its accumulators in registers."""
    return (shared_memory_bytes(kernel, cfg, dtype) + margin <= shared_memory_limit
            and accumulator_registers(kernel, cfg) <= 128)


@dataclass(frozen=True)
class DeviceLimits:
    """What the heuristic needs to know about a GPU."""

    name: str
    shared_memory: int  # bytes per block (opt-in limit)
    capability: tuple  # (major, minor)

    @property
    def has_bfloat16(self) -> bool:
        return tuple(self.capability) >= (8, 0)


def known_device(name: str) -> DeviceLimits:
    """Limits of a GPU named in KNOWN_GPUS (for tests and for planning without the GPU)."""
    if name not in KNOWN_GPUS:
        raise ValueError(f"unknown device {name!r}; known: {sorted(KNOWN_GPUS)}")
    return DeviceLimits(name, **KNOWN_GPUS[name])


@lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    import torch

    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 0
    if not smem:
        try:
            from triton.runtime import driver

            smem = driver.active.utils.get_device_properties(index)["max_shared_mem"]
        except Exception:  # an old Triton: assume the smallest GPU the course supports
            smem = 48 * 1024
    return DeviceLimits(props.name, int(smem), (props.major, props.minor))


def device_limits(device=None) -> DeviceLimits:
    """The limits of a CUDA device (default: the current one)."""
    import torch

    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device_limits needs a CUDA device; got {dev}")
    return _cuda_limits(dev.index if dev.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------
# The heuristic
# ----------------------------------------------------------------------------------------------
def rows_per_expert(tokens: int, top_k: int, n_experts: int) -> float:
    """Average routed rows per expert, T * k / E: what decides the row block and whether a layer is
    memory-bound (few rows share each weight byte) or compute-bound."""
    return tokens * top_k / max(1, n_experts)


def block_m_for(rows: float, largest: int = 128) -> int:
    """The row block of the layout for `rows` rows per expert: the power of two at or above it, between
    16 (tl.dot's minimum when compiled) and `largest` (padding wastes < BLOCK_M rows per expert)."""
    p = 16
    while p < rows and p < largest:
        p *= 2
    return p


def heuristic(kernel: str, dtype, limits: DeviceLimits, rows: float = 64.0, block_m: Optional[int] = None) -> KernelConfig:
    """A configuration that fits `limits`, for a device with no tuned table (documented rule):

    1. the row block: the layout's block_m (row-block kernels) or 64 (weight-gradient kernels);
    2. start from BLOCK_N = 128 and BLOCK_K = 64 (32 for float32, whose tiles are twice the bytes),
       8 warps when the tile has 128 x 128 elements or more, else 4;
    3. take the deepest pipeline of 4, 3, 2 stages that fits shared memory (pre-Ampere GPUs have no
       asynchronous copies: 2 stages); if none fits, halve BLOCK_K, then BLOCK_N, down to 16;
    4. GROUP_M 1: all column tiles of a row block run back to back, so its rows are read from memory
       once and the expert's weight tiles stay in L2 while its row blocks pass.
    """
    _check_kernel(kernel)
    size = kernel_itemsize(dtype)
    if kernel in ROW_KERNELS:
        bm = block_m if block_m is not None else block_m_for(rows)
    else:
        bm = 64
    bn, bk = 128, (32 if size == 4 else 64)
    stages = (4, 3, 2) if tuple(limits.capability) >= (8, 0) else (2,)
    while True:
        warps = 8 if bm * bn >= 128 * 128 else 4
        for s in stages:
            cfg = KernelConfig(bm, bn, bk, 1, warps, s)
            if fits(kernel, cfg, dtype, limits.shared_memory):
                return cfg
        if bk > 16:
            bk //= 2
        elif bn > 16:
            bn //= 2
        elif kernel in WEIGHT_KERNELS and bm > 16:
            bm //= 2
        else:  # 16 x 16 x 16 tiles fit every CUDA GPU; reached only with absurd limits
            raise ValueError(f"no configuration of {kernel} fits {limits.shared_memory} bytes of shared memory")


# ----------------------------------------------------------------------------------------------
# The space the tuner sweeps (and that opt-in autotuning uses)
# ----------------------------------------------------------------------------------------------
def space(kernel: str, block_m: Optional[int] = None, size: str = "full") -> list[KernelConfig]:
    """Configurations `python -m moe_lab tune` times for `kernel` (16-bit inputs on a Hopper-class GPU).

    size "full": tiles of 64 to 256 columns, reduction steps of 64 (and 128 for row blocks of at most
    32 rows, where reading the weights sets the time; 32 and 64 rows for the weight gradients), GROUP_M 1 (a row block's column tiles back to back) or 16 (16 row blocks per
    column tile: the expert's weight tile is reused across them while it is in L2), 4 or 8 warps, 3 or
    4 stages; combinations whose accumulators would spill or whose 16-bit tiles exceed an H100's
    shared memory are left out. "autotune": the four
    configurations opt-in autotuning times (MOE_LAB_TRITON_AUTOTUNE=1). "quick": a handful, for the
    tests (the interpreter) and a fast sweep.
    """
    _check_kernel(kernel)
    row = kernel in ROW_KERNELS
    if row and block_m is None:
        raise ValueError(f"{kernel} is a row-block kernel: pass the layout's block_m")
    out = []
    if size == "autotune":  # the short list opt-in autotuning times on every new shape (notebook 07)
        if row:
            return [KernelConfig(block_m, bn, bk, g, w, st) for bn, bk, g, w, st in
                    ((64, 64, 1, 4, 3), (128, 64, 1, 4, 3), (128, 32, 16, 8, 4), (64, 32, 16, 4, 4))]
        return [KernelConfig(bm, bn, bk, 1, w, 3) for bm, bn, bk, w in
                ((64, 64, 32, 4), (128, 64, 32, 4), (64, 128, 32, 4), (128, 128, 32, 8))]
    if size == "quick":
        bms = [block_m] if row else [32, 64]
        for bm in bms:
            for bn, bk, g in ((32, 32, 1), (64, 32, 4)):
                out.append(KernelConfig(bm, bn, bk, g, 4, 2))
        return out
    if size != "full":
        raise ValueError(f"size={size!r}: expected 'full', 'autotune' or 'quick'")
    limit = KNOWN_GPUS["H100"]["shared_memory"]
    if row:  # 128-wide steps only for small row blocks, where the weights' bytes set the time
        tiles = [(block_m, bn, bk) for bn in (64, 128, 256) for bk in ((64, 128) if block_m <= 32 else (64,))]
    else:
        tiles = [(bm, bn, bk) for bm in (64, 128) for bn in (64, 128) for bk in (32, 64)]
    for bm, bn, bk in tiles:
        for warps in (4, 8):
            for stages in (3, 4):
                for g in ((1, 16) if row else (1,)):
                    cfg = KernelConfig(bm, bn, bk, g, warps, stages)
                    if not fits(kernel, cfg, "bfloat16", limit):
                        continue
                    if warps == 8 and bm * bn < 64 * 128:  # too little work per warp
                        continue
                    if warps == 4 and bm * bn > 128 * 128:
                        continue
                    out.append(cfg)
    return out


# ----------------------------------------------------------------------------------------------
# Tables: schema, loading, lookup
# ----------------------------------------------------------------------------------------------
TABLE_KEYS = ("schema", "device", "capability", "driver", "torch", "triton", "date", "command", "buckets")
BUCKET_KEYS = ("dtype", "d_model", "d_expert", "rows_per_expert", "block_m", "kernels")


TABLE_DTYPES = ("float32", "float16", "bfloat16")  # what the kernels take (_itemsize)
MAX_BLOCK = 256  # the largest tile side: the tuner's space stops there, and larger tiles overflow shared memory


def _power_of_two(v, largest: int = MAX_BLOCK) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= largest and not v & (v - 1)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_config(config, block_m: int, kernel: str, where: str) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a 'config' object (BLOCK_M, BLOCK_N, ...); got {config!r:.80}")
    try:
        cfg = KernelConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: bad config: {err}") from None
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if getattr(cfg, name) > MAX_BLOCK:
            raise ValueError(f"{where}: bad config: {name} {getattr(cfg, name)} is larger than {MAX_BLOCK}")
    if kernel in ROW_KERNELS and cfg.BLOCK_M != block_m:
        raise ValueError(f"{where}: BLOCK_M {cfg.BLOCK_M} is not the layout's block_m {block_m}")


def _check_entry(entry, block_m: int, kernel: str, where: str) -> None:
    """One kernel's entry of a bucket at the layout's `block_m`: its configuration, its time and its
    runner-up's."""
    where = f"{where}: block_m {block_m}: {kernel}"
    if kernel not in KERNELS:
        raise ValueError(f"{where}: unknown kernel {kernel!r}; expected some of {KERNELS}")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with a 'config'; got {entry!r:.80}")
    _check_config(entry.get("config"), block_m, kernel, where)
    if "ms" in entry and not _positive_number(entry["ms"]):
        raise ValueError(f"{where}: ms {entry['ms']!r}: expected a finite number of milliseconds > 0")
    runner_up = entry.get("runner_up")
    if runner_up is not None:
        if not isinstance(runner_up, dict):
            raise ValueError(f"{where}: runner_up: expected an object with a 'config'; got {runner_up!r:.80}")
        _check_config(runner_up.get("config"), block_m, kernel, f"{where}: runner_up")
        if "ms" in runner_up and not _positive_number(runner_up["ms"]):
            raise ValueError(f"{where}: runner_up: ms {runner_up['ms']!r}: expected a finite number of milliseconds > 0")


def _check_bucket(b, where: str) -> None:
    """Every field of one bucket; `where` names the file and the bucket."""
    if not isinstance(b, dict):
        raise ValueError(f"{where}: expected an object with {BUCKET_KEYS}; got {type(b).__name__} {b!r:.40}")
    missing = [k for k in BUCKET_KEYS if k not in b]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    if b["dtype"] not in TABLE_DTYPES:
        raise ValueError(f"{where}: dtype {b['dtype']!r}: expected one of {TABLE_DTYPES}")
    for key in ("d_model", "d_expert"):
        if not _positive_int(b[key]):
            raise ValueError(f"{where}: {key} {b[key]!r}: expected an integer >= 1")
    if not _positive_number(b["rows_per_expert"]):
        raise ValueError(f"{where}: rows_per_expert {b['rows_per_expert']!r}: expected a finite number > 0")
    bm = b["block_m"]
    if not isinstance(bm, dict) or set(bm) != {"forward", "training"}:
        raise ValueError(f"{where}: block_m must be {{'forward': ..., 'training': ...}}; got {bm!r:.80}")
    for purpose, m in bm.items():
        if not _power_of_two(m):
            raise ValueError(f"{where}: block_m {m!r} ({purpose}): expected an integer power of two in 1..{MAX_BLOCK} "
                             f"(the layout's row block)")
    kernels = b["kernels"]
    if not isinstance(kernels, dict):
        raise ValueError(f"{where}: kernels must be an object {{block_m: {{kernel: entry}}}}; got "
                         f"{type(kernels).__name__}")
    for key, per_kernel in kernels.items():
        if not (key.isdigit() and _power_of_two(int(key))):
            raise ValueError(f"{where}: kernels: key {key!r}: expected a block_m, a power of two in 1..{MAX_BLOCK}")
        if not isinstance(per_kernel, dict):
            raise ValueError(f"{where}: kernels at block_m {key}: expected an object {{kernel: entry}}; got "
                             f"{type(per_kernel).__name__}")
        for k, entry in per_kernel.items():  # every entry, also those choose() reaches only with a forced block_m
            _check_entry(entry, int(key), k, where)
    for purpose, m in bm.items():
        per_kernel = kernels.get(str(m))
        wanted = FORWARD_KERNELS if purpose == "forward" else KERNELS
        if per_kernel is None or any(k not in per_kernel for k in wanted):
            raise ValueError(f"{where}: block_m {m} ({purpose}) lacks configurations of {wanted}")


def validate_table(table: dict, where: str = "table") -> None:
    """Raise ValueError naming what is missing or malformed in a configuration table: the file
    (`where`), the bucket, the layout's block_m and the kernel."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: a configuration table is a JSON object; got {type(table).__name__}")
    missing = [k for k in TABLE_KEYS if k not in table]
    if missing:
        raise ValueError(f"{where}: lacks {missing}; expected the keys {TABLE_KEYS}")
    if table["schema"] != SCHEMA:
        raise ValueError(f"{where}: schema {table['schema']!r}, this moe_lab reads schema {SCHEMA}")
    if not isinstance(table["buckets"], list):
        raise ValueError(f"{where}: 'buckets' must be a list")
    for i, b in enumerate(table["buckets"]):
        _check_bucket(b, f"{where}: bucket {i}")


def table_path(device_slug: str) -> Path:
    return CONFIG_DIR / f"{device_slug}.json"


@lru_cache(maxsize=None)
def load_table(path: str, required: bool = False) -> Optional[dict]:
    """The table at `path` (validated), or None when there is no file (an error instead when
    `required`: a table named on purpose). Cached per path."""
    p = Path(path)
    named = f"MOE_LAB_KERNEL_TABLE={path}" if required else str(p)
    if not p.exists():
        if not required:
            return None
        why = "a symbolic link that leads nowhere (or in a loop)" if p.is_symlink() else "no file there"
        raise ValueError(f"{named}: {why}; expected the path of a kernel table (JSON written by "
                         f"`python -m moe_lab tune`), or unset it to use the device's own")
    if p.is_dir():
        raise ValueError(f"{named}: is a folder; expected the path of a kernel table file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{named}: not a JSON text (its bytes are not UTF-8): not a kernel table") from None
    except OSError as err:
        raise ValueError(f"{named}: cannot be read ({err.strerror or err})") from None
    try:
        table = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err}); re-run `python -m moe_lab tune` or delete the file") from None
    validate_table(table, str(p))
    return table


def table_for(device_name: str) -> Optional[dict]:
    """The tuned table of a device by its name (torch.cuda.get_device_name), or None. The environment
    variable MOE_LAB_KERNEL_TABLE names another file (to try a table, or a fake device's in tests):
    named on purpose, a file that cannot be read there is an error, never a silent fallback."""
    override = kernel_table_override()
    if override:
        return load_table(override, required=True)
    return load_table(str(table_path(slugify(device_name))))


def _log_distance(a: float, b: float) -> float:
    return abs(math.log(max(a, 1e-9)) - math.log(max(b, 1e-9)))


def nearest_bucket(table: dict, dtype, d_model: int, d_expert: int, rows: float) -> Optional[dict]:
    """The bucket of `table` nearest to the problem: same dtype size, then nearest (d, f) on a log
    scale, then nearest rows per expert. None when no bucket has the dtype's size."""
    size = kernel_itemsize(dtype)
    same = [b for b in table["buckets"] if kernel_itemsize(b["dtype"]) == size]
    if not same:
        return None
    shape_dist = lambda b: _log_distance(b["d_model"], d_model) + _log_distance(b["d_expert"], d_expert)  # noqa: E731
    best_shape = min(shape_dist(b) for b in same)
    candidates = [b for b in same if shape_dist(b) == best_shape]
    return min(candidates, key=lambda b: (_log_distance(b["rows_per_expert"], rows), b["rows_per_expert"]))


@dataclass(frozen=True)
class Choice:
    """The configurations of one call of the expert path and where they came from."""

    block_m: int
    configs: dict  # kernel name -> KernelConfig
    source: str  # "table <file> bucket ...", "heuristic (...)", "interpreter" or "explicit"
    notes: tuple = field(default_factory=tuple)


def choose(dtype, d_model: int, d_expert: int, n_experts: int, top_k: int, tokens: int, training: bool,
           limits: Optional[DeviceLimits] = None, table: Optional[dict] = None, interpreted: bool = False,
           block_m: Optional[int] = None) -> Choice:
    """The configuration of every kernel for one call of the expert path.

    Order: the interpreter's single configuration; else the device's table (nearest bucket, only for
    16-bit dtypes, only configurations that fit the device); else `heuristic`. `block_m` forces the
    layout's row block (the table's configurations are then used only if tuned for it)."""
    rows = rows_per_expert(tokens, top_k, n_experts)
    if interpreted:
        bm = block_m or min(32, block_m_for(rows))
        cfgs = {k: KernelConfig(bm if k in ROW_KERNELS else INTERPRETER_CONFIG.BLOCK_M, INTERPRETER_CONFIG.BLOCK_N,
                                INTERPRETER_CONFIG.BLOCK_K, 1, 4, 1) for k in KERNELS}
        return Choice(bm, cfgs, "interpreter")
    if limits is None:
        raise ValueError("choose: pass the device's limits (device_limits()) when kernels are compiled")
    notes = []
    if table is not None and kernel_itemsize(dtype) == 2:
        b = nearest_bucket(table, dtype, d_model, d_expert, rows)
        if b is not None:
            bm = block_m or b["block_m"]["training" if training else "forward"]
            per_kernel = b["kernels"].get(str(bm))
            if per_kernel is not None:
                cfgs = {}
                for k in KERNELS:
                    entry = per_kernel.get(k)
                    cfg = KernelConfig.from_dict(entry["config"]) if entry else None
                    if cfg is None or not fits(k, cfg, dtype, limits.shared_memory, margin=0):
                        cfg = heuristic(k, dtype, limits, rows, bm)
                        notes.append(f"{k}: heuristic")
                    cfgs[k] = cfg
                src = (f"table {table.get('device', '?')} bucket d={b['d_model']} f={b['d_expert']} "
                       f"rows/expert={b['rows_per_expert']:g} ({b['dtype']})")
                return Choice(bm, cfgs, src, tuple(notes))
            notes.append(f"table has no configurations for block_m={bm}")
    bm = block_m or block_m_for(rows)
    cfgs = {k: heuristic(k, dtype, limits, rows, bm) for k in KERNELS}
    why = "no table for this device" if table is None else "no bucket for this dtype"
    return Choice(bm, cfgs, f"heuristic ({why})", tuple(notes))


def describe(choice: Choice) -> str:
    """A few lines saying which configuration each kernel uses and why (notebooks 06 and 07)."""
    lines = [f"block_m {choice.block_m}: {choice.source}"]
    lines += [f"  {k:16s} {c.short()}" for k, c in choice.configs.items()]
    lines += [f"  note: {n}" for n in choice.notes]
    return "\n".join(lines)


def configs_in(table: dict) -> Iterable[tuple[str, KernelConfig]]:
    """Every (kernel, configuration) a table names: what a process compiles at most."""
    seen = set()
    for b in table["buckets"]:
        for per_kernel in b["kernels"].values():
            for k, entry in per_kernel.items():
                cfg = KernelConfig.from_dict(entry["config"])
                if (k, cfg) not in seen:
                    seen.add((k, cfg))
                    yield k, cfg
