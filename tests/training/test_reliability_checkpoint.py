"""Checkpoints: one safetensors file, written atomically with a file's usual permissions; every bad
file is an error naming its path and its cause; the earlier .pt format still loads.

Run: .venv/bin/python -m pytest tests/training/test_reliability_checkpoint.py -q
"""
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from moe_lab.training.checkpoint import load_checkpoint, save_checkpoint
from moe_lab.core.config import ModelConfig, MoEConfig, preset
from moe_lab.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(**kw):
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared=1)
    return ModelConfig(**{**dict(vocab_size=20, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=48, ffn="moe",
                                 moe=moe), **kw})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(tiny_cfg())


def same_function(a, b) -> bool:
    x = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    return torch.equal(a(x)[0], b(x)[0])


# --- saving ------------------------------------------------------------------------------------------
def test_one_safetensors_file_with_usual_permissions(tmp_path, model):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", model, extra={"val_loss": 1.5})
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0666 less the umask, not mkstemp's 0600
    assert path.read_bytes()[8:9] == b"{"  # safetensors: an 8-byte length, then the JSON header
    loaded, extra = load_checkpoint(path, expected=tiny_cfg())
    assert extra == {"val_loss": 1.5} and same_function(loaded, model)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_embeddings_round_trip(tmp_path, tie):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tie_embeddings=tie))
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    with safe_open(str(path), "pt") as f:
        assert ("head.weight" in f.keys()) == (not tie)  # a tied weight is stored once
    loaded, _ = load_checkpoint(path)
    assert same_function(loaded, model)
    assert (loaded.head.weight is loaded.embed.weight) == tie


@pytest.mark.parametrize("name, words", [
    ("m.json", "ending in .safetensors"),  # it used to be overwritten by its own .json sidecar
    ("m.pt", "name it m.safetensors"),
    ("m", "ending in .safetensors"),
    ("folder.safetensors/", "is a folder"),
    ("afile/m.safetensors", "is a file"),
])
def test_a_save_path_that_cannot_hold_one_checkpoint_file_is_refused(tmp_path, model, name, words):
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "afile").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError) as info:
        save_checkpoint(tmp_path / name, model)
    assert words in str(info.value) and str(tmp_path / name.rstrip("/")) in str(info.value), str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_extra_that_is_not_json_is_refused_before_writing(tmp_path, model):
    with pytest.raises(ValueError, match="extra must be JSON"):
        save_checkpoint(tmp_path / "m.safetensors", model, extra={"t": torch.zeros(1)})
    assert not list(tmp_path.iterdir())


def test_a_crash_while_writing_keeps_the_old_checkpoint_and_leaves_nothing(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", model, extra={"v": 1})
    old_bytes = path.read_bytes()

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, Transformer(tiny_cfg()), extra={"v": 2})
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes and load_checkpoint(path)[1] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --- loading: every bad file names its path and its cause ---------------------------------------------
def _good(tmp_path, model) -> bytes:
    return save_checkpoint(tmp_path / "good.safetensors", model).read_bytes()


def _foreign_safetensors(tmp_path, model) -> bytes:
    from safetensors.torch import save

    return save({"w": torch.zeros(3)}, metadata={"format": "pt"})


def _malicious_pickle(tmp_path, model) -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    return pickle.dumps(Evil(), protocol=2)


def _foreign_torch(tmp_path, model) -> bytes:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "f.pt")
    return (tmp_path / "f.pt").read_bytes()


BAD_FILES = {
    "empty": (lambda t, m: b"", "empty"),
    "four bytes": (lambda t, m: _good(t, m)[:4], "truncated"),
    "cut in the header": (lambda t, m: _good(t, m)[:40], "truncated"),
    "cut in the tensors": (lambda t, m: _good(t, m)[:-100], "truncated"),
    "random bytes": (lambda t, m: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).tolist()), "not a safetensors or torch checkpoint"),
    "text": (lambda t, m: b"not a checkpoint at all\n" * 4, "not a safetensors or torch checkpoint"),
    "foreign safetensors": (_foreign_safetensors, "not a moe-lab checkpoint"),
    "foreign torch file": (_foreign_torch, "not a moe-lab checkpoint"),
    "truncated torch file": (lambda t, m: _foreign_torch(t, m)[:300], "truncated or corrupt"),
    "malicious pickle": (_malicious_pickle, "refused"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_an_error_naming_its_path_and_cause(tmp_path, model, case, suffix):
    make, cause = BAD_FILES[case]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(make(tmp_path, model))
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and cause in msg, msg
    assert "weights_only=False" not in msg  # never the advice to run a file's code
    assert not (tmp_path / "pwned").exists()


def test_a_missing_checkpoint_or_a_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"m.safetensors \(but m.pt is there\)"):
        load_checkpoint(tmp_path / "m.safetensors")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ValueError, match="d.safetensors: is a folder"):
        load_checkpoint(tmp_path / "d.safetensors")


# --- the earlier .pt format still loads ------------------------------------------------------------------
def test_the_shipped_checkpoint_loads_and_its_old_pt_form_gives_the_same_model(tmp_path):
    """The shipped checkpoint is safetensors; written back in the earlier .pt format, with the expert
    weights under their old names (before the experts had a module of their own: ...ffn.w1), it loads
    as the same model."""
    model, extra = load_checkpoint(ROOT / "data/checkpoints/moe_cpu.safetensors", expected=preset("cpu").moe)
    assert 0.45 <= extra["heldout_exact_match"] < 0.8 and extra["snapshot_step"] < extra["steps"]
    old_keys = {k.replace("ffn.experts.", "ffn."): v for k, v in model.state_dict().items()}
    assert any(k.endswith("ffn.w1") for k in old_keys)
    torch.save({"format": "moe-lab-checkpoint-v1", "config": json.dumps(model.cfg.to_dict()),
                "extra": json.dumps(extra), "model": old_keys}, tmp_path / "moe_cpu.pt")
    again, extra_again = load_checkpoint(tmp_path / "moe_cpu.pt", expected=preset("cpu").moe)
    assert extra_again == extra and same_function(again, model)


def test_a_pt_checkpoint_in_the_earlier_format_loads(tmp_path, model):
    payload = {"format": "moe-lab-checkpoint-v1", "config": json.dumps(model.cfg.to_dict()),
               "extra": json.dumps({"v": 3}), "model": model.state_dict()}
    torch.save(payload, tmp_path / "old.pt")
    loaded, extra = load_checkpoint(tmp_path / "old.pt", expected=tiny_cfg())
    assert extra == {"v": 3} and same_function(loaded, model)


def test_find_checkpoint_prefers_safetensors(tmp_path, model):
    from moe_lab.training.checkpoint import find_checkpoint

    assert find_checkpoint(tmp_path / "moe_cpu") is None
    (tmp_path / "moe_cpu.pt").write_bytes(b"x")
    assert find_checkpoint(tmp_path / "moe_cpu") == tmp_path / "moe_cpu.pt"
    save_checkpoint(tmp_path / "moe_cpu.safetensors", model)
    assert find_checkpoint(tmp_path / "moe_cpu") == tmp_path / "moe_cpu.safetensors"


def test_the_shipped_checkpoint_is_found():
    from moe_lab.training.checkpoint import shipped_checkpoint

    found = shipped_checkpoint("moe_cpu")
    assert found is not None and found.parent == ROOT / "data" / "checkpoints" and found.stem == "moe_cpu"
    assert shipped_checkpoint("no_such_checkpoint") is None


def test_a_header_length_whose_low_byte_looks_like_a_pickle_is_still_safetensors(tmp_path, model):
    """safetensors starts with its header's length: 1152 = 0x480 begins with the byte 0x80, which is also
    how an old pickle begins. The loader must not mistake the one for the other."""
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, extra={"v": 1})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].rstrip(b" ")
    pad = (0x480 - len(header)) % 0x100 or 0x100  # grow the header (JSON allows trailing spaces) to ..80 bytes
    new_header = header + b" " * pad
    assert len(new_header) & 0xFF == 0x80
    path.write_bytes(len(new_header).to_bytes(8, "little") + new_header + raw[8 + n:])
    assert path.read_bytes()[:1] == b"\x80"
    loaded, extra = load_checkpoint(path)
    assert extra == {"v": 1}
