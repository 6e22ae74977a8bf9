"""Checkpoints: saved atomically, loaded with `weights_only=True`, with the config beside them.

    save_checkpoint("runs/moe.pt", model, extra={"val_loss": 1.2})
        writes runs/moe.pt (state dict + config + extra) and runs/moe.json (config + extra, to read)
    model, extra = load_checkpoint("runs/moe.pt")

Atomic: the file is written under a temporary name and renamed, so a crash never leaves half a
checkpoint. `weights_only=True` means loading runs no pickled code from the file.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch

from moe_lab.config import ModelConfig

FORMAT = "moe-lab-checkpoint-v1"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, extra: Optional[dict] = None) -> Path:
    """Save model (a moe_lab Transformer) with its config; returns the path."""
    path = Path(path)
    cfg = model.cfg.to_dict()
    extra = dict(extra or {})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "config": json.dumps(cfg), "extra": json.dumps(extra), "model": state}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    _atomic_write(path.with_suffix(".json"),
                  lambda tmp: Path(tmp).write_text(json.dumps({"config": cfg, "extra": extra}, indent=2)))
    return path


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
    """Load a checkpoint saved by save_checkpoint: returns (model, extra).

    With `expected`, a checkpoint of a different config raises a ValueError listing the fields that
    differ (ignoring the expert back-end, which does not change the function).
    """
    from moe_lab.model.transformer import Transformer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a moe-lab checkpoint (expected format {FORMAT!r})")
    cfg = ModelConfig.from_dict(json.loads(payload["config"]))
    if expected is not None:
        diff = {k: v for k, v in config_diff(expected, cfg).items() if k != "moe.backend"}
        if diff:
            lines = ", ".join(f"{k}: expected {a!r}, checkpoint has {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {path} was saved with a different config: {lines}")
    model = Transformer(cfg).to(device)
    model.load_state_dict(payload["model"])
    return model, json.loads(payload["extra"])
