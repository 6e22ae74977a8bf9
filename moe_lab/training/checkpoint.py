"""Checkpoints: one safetensors file holding the weights, the config and the figures (README, "Checkpoints").

    save_checkpoint("runs/moe.safetensors", model, extra={"val_loss": 1.2})
    model, extra = load_checkpoint("runs/moe.safetensors")
    python -m moe_lab checkpoint runs/moe.safetensors      # prints its config and figures

The file is safetensors (the format the Hugging Face ecosystem reads): an 8-byte header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw bytes. Loading it runs no
pickled code at all. The model's config and the `extra` figures are JSON strings in the header's
metadata (`format`, `config`, `extra`), so any safetensors reader shows them.

Saved atomically: the bytes go to a temporary file beside the target, flushed to disk, then renamed
over it, so a crash leaves the old checkpoint whole and never half a new one. The file gets the
usual permissions (0666 less the umask, like any file you write), not a temporary file's 0600. A
save killed outright (SIGKILL) leaves its hidden temporary file `.<name>.<pid>.<hex>.tmp`; the next
save to that path removes it (core.files.remove_stale_temporaries).

Loaded whole or not at all: a read opens the file once (a save renamed over the path meanwhile cannot
mix two saves), the config must name every field the model needs (no silent defaults), every tensor
must be floating point, and the loader names the path and the cause of every failure: a missing,
empty, truncated or foreign file, malformed metadata of any shape.
It still reads the course's earlier format, a torch `.pt` (format moe-lab-checkpoint-v1, loaded with
`weights_only=True`, which refuses pickled code), so a checkpoint saved before still loads.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional, Union

import torch

from moe_lab.core import paths
from moe_lab.core.config import ModelConfig, MoEConfig
from moe_lab.core.files import OutputPathError, atomic_write_bytes, check_output_path
from moe_lab.model.transformer import Transformer

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
    try:
        return check_output_path(path)  # not a folder, not under a file, in a folder we may write in
    except OutputPathError as exc:
        raise CheckpointError(path, str(exc).removeprefix(f"{path}: ")) from None


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
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
# A model's weights are floating point: these are the safetensors dtypes a checkpoint may hold.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Fields that came after the first checkpoints were saved, with the value that gives the model those
# checkpoints were saved from (multi-head attention); the latent-attention widths only matter for "mla".
LATER_FIELDS = {"attention": "mha"}
MLA_FIELDS = ("kv_rank", "q_rank", "rope_dim")


def missing_fields(config: dict) -> list[str]:
    """The fields of ModelConfig (and moe.x of MoEConfig) a saved config lacks that the model needs.

    Every field is needed (a default would silently give another model: the logits of a checkpoint
    saved with rope_theta=5e5 differ when it loads with 1e4), except those added after checkpoints
    were first written (LATER_FIELDS), whose absence means what they mean for those checkpoints."""
    optional = set(LATER_FIELDS)
    if config.get("attention", LATER_FIELDS["attention"]) != "mla":
        optional |= set(MLA_FIELDS)
    missing = [f.name for f in fields(ModelConfig) if f.name not in config and f.name not in optional]
    if isinstance(config.get("moe"), dict):
        missing += [f"moe.{f.name}" for f in fields(MoEConfig) if f.name not in config["moe"]]
    return missing


def _json_object(path: Path, meta: dict, key: str, default: str) -> dict:
    """json.loads(meta[key]) as a dict (str keys), or a CheckpointError naming the key."""
    raw = meta.get(key, default)
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"its metadata's {key!r} is not JSON text ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"its metadata's {key!r} is a JSON {type(value).__name__}, expected an object")
    return value


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_entries(path: Path, header: dict, data_bytes: int) -> dict:
    """{name: (torch dtype, shape, begin, end)} of a safetensors header, each entry checked, or a
    CheckpointError naming the tensor and what is wrong with it."""
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(path, f"{where}: its header entry is a {type(info).__name__}, expected an object "
                                        f"with dtype, shape and data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise CheckpointError(path, f"{where}: its header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointError(path, f"{where}: dtype {dtype!r} is not a safetensors dtype name")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(path, f"{where} has dtype {dtype}: a model's weights are floating point, expected "
                                        f"one of {', '.join(FLOAT_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(path, f"{where}: shape {shape!r} is not a list of sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(path, f"{where}: data_offsets {offsets!r} is not [begin, end], two integers "
                                        f"with 0 <= begin <= end")
        begin, end = offsets
        nbytes = math.prod(shape) * FLOAT_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise CheckpointError(path, f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but its "
                                        f"data_offsets {offsets} hold {end - begin}")
        if end > data_bytes:
            raise CheckpointError(path, f"truncated: {where} ends at byte {end} of the tensor data, but the file "
                                        f"holds {data_bytes} bytes of it (an interrupted copy or download?)")
        entries[name] = (FLOAT_DTYPES[dtype], shape, begin, end)
    spans = sorted((b, e, n) for n, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(path, f"tensors {n0!r} and {n1!r} overlap in the file (data_offsets "
                                        f"[{b0}, {e0}] and [{b1}, {e1}])")
    return entries


def _read_safetensors(path: Path, f, size: int, head: bytes) -> tuple[dict, dict, dict]:
    """(config, extra, state) from the open file f: header and tensors from this one file, whatever
    is renamed over the path meanwhile."""
    if size < 8:
        raise CheckpointError(path, f"only {size} bytes: truncated, or not a checkpoint (a safetensors file starts "
                                    f"with an 8-byte header length)")
    (n,) = struct.unpack("<Q", head[:8])
    if not 2 <= n <= _MAX_HEADER:
        raise CheckpointError(path, f"not a safetensors or torch checkpoint (it starts with {head[:16]!r})")
    if 8 + n > size:
        raise CheckpointError(path, f"truncated: its header says {n} bytes of JSON follow the first 8, but the file "
                                    f"has {size} bytes in all")
    f.seek(8)
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(path, f"not a safetensors or torch checkpoint (no JSON header; it starts with "
                                    f"{head[:16]!r})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a safetensors checkpoint: its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"its header's __metadata__ is a {type(meta).__name__}, expected an object of "
                                    f"strings (format, config, extra, aliases)")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise CheckpointError(path, f"its header's __metadata__[{key!r}] is a {type(value).__name__}, expected a "
                                        f"string (safetensors metadata holds strings only)")
    entries = _tensor_entries(path, header, size - 8 - n)
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"a safetensors file but not a moe-lab checkpoint: its metadata has "
                                    f"format={meta.get('format')!r}, expected {FORMAT!r} (metadata keys: "
                                    f"{sorted(meta)})")
    if "config" not in meta:
        raise CheckpointError(path, "its metadata lacks the model's config")
    config = _json_object(path, meta, "config", "{}")
    extra = _json_object(path, meta, "extra", "{}")
    aliases = _json_object(path, meta, "aliases", "{}")
    for name, target in aliases.items():
        if not isinstance(target, str) or target not in entries:
            raise CheckpointError(path, f"its metadata's 'aliases' maps {name!r} to {target!r}, which is not a "
                                        f"tensor of the file")
    state = {}
    if entries:
        # one read of the data through the same file handle; tensors are copied out of it
        f.seek(8 + n)
        data = bytearray(size - 8 - n)
        got = f.readinto(data)
        if got != len(data):
            raise CheckpointError(path, f"truncated: read {got} bytes of tensor data, expected {len(data)}")
        for name, (dtype, shape, begin, end) in entries.items():
            t = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin) if end > begin \
                else torch.empty(0, dtype=dtype)
            state[name] = t.reshape(shape).clone()
        del data
    for name, target in aliases.items():  # tied weights were stored once
        state[name] = state[target]
    return config, extra, state


def _read_legacy(path: Path, f) -> tuple[dict, dict, dict]:
    try:
        f.seek(0)  # a file object: torch reads it by content, whatever its name
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
        config, extra, state = json.loads(payload["config"]), json.loads(payload["extra"]), payload["model"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"a moe-lab {LEGACY_SUFFIX} checkpoint with a damaged entry: {exc!r}") from None
    for key, value in (("config", config), ("extra", extra), ("model", state)):
        if not isinstance(value, dict):
            raise CheckpointError(path, f"its {key!r} is a {type(value).__name__}, expected a dict")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(path, f"tensor {name!r} is {what}: a model's weights are floating point")
    return config, extra, state


def read_checkpoint(path: Union[str, Path]) -> tuple[ModelConfig, dict, dict]:
    """(config, extra, state dict on the CPU) of a checkpoint, without building the model.

    Reads the safetensors format and the earlier torch .pt one, whatever the file is called: the
    first bytes decide (a .pt is a zip archive or a pickle; safetensors starts with its header's length).
    The file is opened once: its size, header and tensors all come from that one handle, so a save
    renamed over the path meanwhile can never mix one save's config with another's tensors.
    """
    path = Path(path)
    if not path.exists():
        other = [p.name for p in (path.with_suffix(SUFFIX), path.with_suffix(LEGACY_SUFFIX)) if p != path and p.exists()]
        raise FileNotFoundError(f"no checkpoint at {path}" + (f" (but {other[0]} is there)" if other else ""))
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(path, "the file is empty (0 bytes): an interrupted save, copy or download?")
        head = f.read(16)
        # safetensors: an 8-byte little-endian header length, then a JSON object. Asked first: the length's
        # low byte can be 0x80, the first byte of an old pickle.
        n = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
        looks_safetensors = head[8:9] == b"{" and 0 < n <= size - 8
        if not looks_safetensors and (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save
            config, extra, state = _read_legacy(path, f)
        else:
            config, extra, state = _read_safetensors(path, f, size, head)
    missing = missing_fields(config)
    if missing:
        raise CheckpointError(path, f"its config lacks {', '.join(missing)}: a checkpoint must name every field of "
                                    f"the model it holds (a default could be another model)")
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
    """The checkpoint the course ships in data/checkpoints/ (made by `python -m moe_lab train --preset cpu`),
    safetensors preferred over an earlier .pt; None where there is none (e.g. installed from git on Colab)."""
    return find_checkpoint(paths.data_path("checkpoints", name))


def describe(path: Union[str, Path]) -> dict:
    """What a checkpoint holds, for people: its format, config, figures and tensors."""
    cfg, extra, state = read_checkpoint(path)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "config": cfg.to_dict(), "extra": extra,
            "tensors": len(state), "parameters": sum(t.numel() for t in state.values())}


def main(argv=None) -> int:
    """`python -m moe_lab checkpoint PATH`: print what a checkpoint holds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: python -m moe_lab checkpoint PATH   (prints the checkpoint's config and figures)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    try:
        print(json.dumps(describe(argv[0]), indent=2))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
