"""Checkpoints: one safetensors file holding the weights, the config and the figures (README, "Checkpoints").

    save_checkpoint("runs/moe.safetensors", model, extra={"val_loss": 1.2})
    model, extra = load_checkpoint("runs/moe.safetensors")
    python -m moe_lab.checkpoint runs/moe.safetensors      # prints its config and figures

The file is safetensors (the format the Hugging Face ecosystem reads): an 8-byte header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw bytes. Loading it runs no
pickled code at all. The model's config and the `extra` figures are JSON strings in the header's
metadata (`format`, `config`, `extra`), so any safetensors reader shows them.

Saved atomically: the bytes go to a temporary file beside the target, flushed to disk, then renamed
over it, so a crash leaves the old checkpoint whole and never half a new one. The file gets the
usual permissions (0666 less the umask, like any file you write), not a temporary file's 0600.

The loader names the path and the cause of every failure: a missing, empty, truncated or foreign file.
It still reads the course's earlier format, a torch `.pt` (format moe-lab-checkpoint-v1, loaded with
`weights_only=True`, which refuses pickled code), so a checkpoint saved before still loads.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch

from moe_lab.config import ModelConfig

FORMAT = "moe-lab-checkpoint-v2"  # safetensors, config and figures in its metadata
LEGACY_FORMAT = "moe-lab-checkpoint-v1"  # torch.save of {"format", "config", "extra", "model"}: read only
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header (bytes)


class CheckpointError(ValueError):
    """A file that is not a loadable moe-lab checkpoint; the message names the path and the cause."""

    def __init__(self, path: Union[str, Path], cause: str):
        self.path = Path(path)
        super().__init__(f"checkpoint {path}: {cause}")


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def check_save_path(path: Union[str, Path]) -> Path:
    """The path save_checkpoint would write, checked before any work: a CheckpointError if it cannot be.

    The name must end in .safetensors (the only file written, besides a temporary one beside it that
    is renamed over it), must not be a folder, and its folder must be a folder we may write in.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        hint = f" (name it {path.with_suffix(SUFFIX).name})" if path.suffix in (LEGACY_SUFFIX, ".json", ".pth", ".bin") else ""
        raise CheckpointError(path, f"expected a file name ending in {SUFFIX}{hint}: a checkpoint is one safetensors "
                                    f"file (older {LEGACY_SUFFIX} checkpoints are still read, no longer written)")
    if path.is_dir():
        raise CheckpointError(path, "is a folder: expected the path of a file to write")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CheckpointError(path, f"{parent} is a file, so no folder can be made there")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(path, f"the folder {parent} is not writable")
    return path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path through a temporary file beside it, renamed over it once on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies: a file's usual mode
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _unaliased_state(model: torch.nn.Module) -> tuple[dict, dict]:
    """The state dict without repeated storage (tied embeddings), and {dropped name: kept name}.

    safetensors stores each tensor once and refuses two names for one storage.
    """
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.cpu().contiguous()
    return tensors, aliases


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, extra: Optional[dict] = None) -> Path:
    """Save model (a moe_lab Transformer) with its config and `extra` (JSON figures) as one safetensors file."""
    from safetensors.torch import save

    path = check_save_path(path)
    try:
        extra_json = json.dumps(dict(extra or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_checkpoint: extra must be JSON (numbers, strings, lists, dicts): {exc}") from exc
    tensors, aliases = _unaliased_state(model)
    metadata = {"format": FORMAT, "config": json.dumps(model.cfg.to_dict()), "extra": extra_json,
                "aliases": json.dumps(aliases)}
    _atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _safetensors_header(path: Path, size: int, head: bytes) -> dict:
    """The JSON header of a safetensors file, checked against the file's size, or a CheckpointError."""
    if size < 8:
        raise CheckpointError(path, f"only {size} bytes: truncated, or not a checkpoint (a safetensors file starts "
                                    f"with an 8-byte header length)")
    (n,) = struct.unpack("<Q", head[:8])
    if not 2 <= n <= _MAX_HEADER:
        raise CheckpointError(path, f"not a safetensors or torch checkpoint (it starts with {head[:16]!r})")
    if 8 + n > size:
        raise CheckpointError(path, f"truncated: its header says {n} bytes of JSON follow the first 8, but the file "
                                    f"has {size} bytes in all")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(path, f"not a safetensors or torch checkpoint (no JSON header; it starts with "
                                    f"{head[:16]!r})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a safetensors checkpoint: its header is not a JSON object")
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise CheckpointError(path, f"truncated: its tensors need {need} bytes but the file has {size} (an "
                                    f"interrupted copy or download?)")
    return header


def _read_safetensors(path: Path, size: int, head: bytes) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    meta = _safetensors_header(path, size, head).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"a safetensors file but not a moe-lab checkpoint: its metadata has "
                                    f"format={meta.get('format')!r}, expected {FORMAT!r} (metadata keys: "
                                    f"{sorted(meta)})")
    try:
        config, extra = json.loads(meta["config"]), json.loads(meta.get("extra", "{}"))
        aliases = json.loads(meta.get("aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"its metadata lacks a readable config: {exc!r}") from None
    try:
        state = load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error, named with the path
        raise CheckpointError(path, f"safetensors could not read its tensors: {exc}") from exc
    for name, target in aliases.items():  # tied weights were stored once
        if target in state:
            state[name] = state[target]
    return config, extra, state


def _read_legacy(path: Path) -> tuple[dict, dict, dict]:
    try:
        with open(path, "rb") as f:  # a file object: torch reads it by content, whatever its name
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, "refused: it holds pickled objects other than tensors and numbers, which could "
                                    "run code; moe_lab never loads such a file (weights_only=True)") from exc
    except Exception as exc:  # noqa: BLE001 - torch's zip and pickle errors, named with the path
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"a torch file that cannot be read (truncated or corrupt): {cause}") from exc
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(path, f"a torch file but not a moe-lab checkpoint (format {fmt!r}, expected "
                                    f"{LEGACY_FORMAT!r} or a {SUFFIX} file)")
    try:
        return json.loads(payload["config"]), json.loads(payload["extra"]), payload["model"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"a moe-lab {LEGACY_SUFFIX} checkpoint with a damaged entry: {exc!r}") from None


def read_checkpoint(path: Union[str, Path]) -> tuple[ModelConfig, dict, dict]:
    """(config, extra, state dict on the CPU) of a checkpoint, without building the model.

    Reads the safetensors format and the earlier torch .pt one, whatever the file is called: the
    first bytes decide (a .pt is a zip archive or a pickle; safetensors starts with its header's length).
    """
    path = Path(path)
    if not path.exists():
        other = [p.name for p in (path.with_suffix(SUFFIX), path.with_suffix(LEGACY_SUFFIX)) if p != path and p.exists()]
        raise FileNotFoundError(f"no checkpoint at {path}" + (f" (but {other[0]} is there)" if other else ""))
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes): an interrupted save, copy or download?")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: an 8-byte little-endian header length, then a JSON object. Asked first: the length's
    # low byte can be 0x80, the first byte of an old pickle.
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    looks_safetensors = head[8:9] == b"{" and 0 < n <= size - 8
    if not looks_safetensors and (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save
        config, extra, state = _read_legacy(path)
    else:
        config, extra, state = _read_safetensors(path, size, head)
    try:
        cfg = ModelConfig.from_dict(config)
    except ValueError as exc:
        raise CheckpointError(path, f"its config is not valid here: {exc}") from exc
    return cfg, extra, state


def config_diff(a: ModelConfig, b: ModelConfig) -> dict:
    """Fields that differ between two configs: {field: (a_value, b_value)} (nested MoE fields as moe.x)."""
    da, db = asdict(a), asdict(b)
    diff = {}
    for k in da:
        if isinstance(da[k], dict):
            diff.update({f"{k}.{kk}": (da[k][kk], db[k][kk]) for kk in da[k] if da[k][kk] != db[k][kk]})
        elif da[k] != db[k]:
            diff[k] = (da[k], db[k])
    return diff


def load_checkpoint(path: Union[str, Path], expected: Optional[ModelConfig] = None,
                    device: Union[str, torch.device] = "cpu"):
    """Load a checkpoint saved by save_checkpoint (or an earlier .pt one): returns (model, extra).

    With `expected`, a checkpoint of a different config raises a ValueError listing the fields that
    differ (ignoring the expert back-end, which does not change the function), and the model runs its
    experts with `expected`'s back-end (the preset's choice for this machine, not the saving one's).
    """
    from moe_lab.model.transformer import Transformer

    cfg, extra, state = read_checkpoint(path)
    if expected is not None:
        diff = {k: v for k, v in config_diff(expected, cfg).items() if k != "moe.backend"}
        if diff:
            lines = ", ".join(f"{k}: expected {a!r}, checkpoint has {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {path} was saved with a different config: {lines}")
    model = Transformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(path, f"its tensors do not fit its own config: {exc}") from exc
    if expected is not None and expected.ffn == "moe" and cfg.ffn == "moe":
        model.set_backend(expected.moe.backend)
    return model.to(device), extra


def find_checkpoint(stem: Union[str, Path]) -> Optional[Path]:
    """stem.safetensors if it exists, else the earlier stem.pt, else None."""
    stem = Path(stem)
    return next((p for p in (stem.with_suffix(SUFFIX), stem.with_suffix(LEGACY_SUFFIX)) if p.is_file()), None)


def shipped_checkpoint(name: str = "moe_cpu") -> Optional[Path]:
    """The checkpoint the course ships in data/checkpoints/ (made by `python -m moe_lab.train --preset cpu`),
    safetensors preferred over an earlier .pt; None where there is none (e.g. installed from git on Colab)."""
    from moe_lab.data.corpus import data_dir

    return find_checkpoint(data_dir() / "checkpoints" / name)


def describe(path: Union[str, Path]) -> dict:
    """What a checkpoint holds, for people: its format, config, figures and tensors."""
    cfg, extra, state = read_checkpoint(path)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "config": cfg.to_dict(), "extra": extra,
            "tensors": len(state), "parameters": sum(t.numel() for t in state.values())}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m moe_lab.checkpoint PATH   (prints the checkpoint's config and figures)")
    try:
        print(json.dumps(describe(sys.argv[1]), indent=2))
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
