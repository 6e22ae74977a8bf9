"""Checkpoints load whole or not at all: one open of the file per read (a concurrent save never mixes
one save's config with another's tensors), a config that lacks a field the model needs, a tensor that
is not floating and metadata of any malformed shape are CheckpointErrors naming the path and the
cause (also from `python -m moe_lab checkpoint`), and the temporary file of a killed save is removed
by the next save to the same path.

Run: .venv/bin/python -m pytest tests/training/test_checkpoint_whole.py -q
"""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moe_lab.core.config import ModelConfig, MoEConfig
from moe_lab.model.transformer import Transformer
from moe_lab.training import checkpoint as ckpt
from moe_lab.training.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(**kw):
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared=1)
    return ModelConfig(**{**dict(vocab_size=20, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=48, ffn="moe",
                                 moe=moe), **kw})


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "m.safetensors", Transformer(tiny_cfg()), extra={"val_loss": 1.5})


def split(path: Path):
    """(header dict, the tensor bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite(path: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_config(path: Path, change) -> None:
    header, data = split(path)
    config = json.loads(header["__metadata__"]["config"])
    change(config)
    header["__metadata__"]["config"] = json.dumps(config)
    rewrite(path, header, data)


def first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


# --- a config must hold every field the model needs ----------------------------------------------------
@pytest.mark.parametrize("field", ["rope_theta", "d_model", "norm_eps", "tie_embeddings", "moe.router",
                                   "moe.routed_scaling", "moe"])
def test_a_config_lacking_a_field_is_an_error_naming_it(saved, field):
    def drop(config):
        if "." in field:
            outer, inner = field.split(".")
            del config[outer][inner]
        else:
            del config[field]

    edit_config(saved, drop)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    msg = str(info.value)
    assert str(saved) in msg and f"lacks {field}" in msg, msg  # never the defaults, nor a tensor size mismatch


def test_an_old_pt_checkpoint_lacking_a_field_is_refused_too(tmp_path):
    model = Transformer(tiny_cfg())
    config = model.cfg.to_dict()
    del config["moe"]["routed_scaling"]
    torch.save({"format": "moe-lab-checkpoint-v1", "config": json.dumps(config), "extra": "{}",
                "model": model.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="lacks moe.routed_scaling"):
        load_checkpoint(tmp_path / "old.pt")


def test_fields_added_with_latent_attention_default_to_the_attention_saved_before_them(saved):
    """attention, kv_rank, q_rank and rope_dim came after the first checkpoints (the shipped one lacks
    them): without them the model is the multi-head attention it was saved with. With attention 'mla'
    the latent widths are needed."""
    model, _ = load_checkpoint(saved)

    def pre_mla(config):
        for k in ("attention", "kv_rank", "q_rank", "rope_dim"):
            del config[k]

    edit_config(saved, pre_mla)
    again, _ = load_checkpoint(saved)
    assert again.cfg == model.cfg

    def mla_without_rank(config):
        config["attention"] = "mla"

    edit_config(saved, mla_without_rank)
    with pytest.raises(CheckpointError, match="lacks kv_rank"):
        read_checkpoint(saved)


def test_the_shipped_checkpoint_and_its_config_load_in_full():
    cfg, extra, state = read_checkpoint(ROOT / "data/checkpoints/moe_cpu.safetensors")
    assert cfg.attention == "mha" and cfg.ffn == "moe" and all(t.is_floating_point() for t in state.values())


# --- tensors must be floating ----------------------------------------------------------------------------
def test_an_int32_tensor_is_refused_naming_it(saved, tmp_path):
    from safetensors.torch import save

    header, _ = split(saved)
    cfg, extra, state = read_checkpoint(saved)
    name = first_tensor(header)
    state[name] = state[name].to(torch.int32)
    del state["head.weight"]  # stored once, as embed.weight
    saved.write_bytes(save(state, metadata=header["__metadata__"]))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    assert str(saved) in str(info.value) and name in str(info.value) and "I32" in str(info.value), str(info.value)

    model = Transformer(tiny_cfg())
    sd = model.state_dict()
    sd["embed.weight"] = sd["embed.weight"].to(torch.int32)
    torch.save({"format": "moe-lab-checkpoint-v1", "config": json.dumps(model.cfg.to_dict()), "extra": "{}",
                "model": sd}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"embed\.weight.*int32"):
        load_checkpoint(tmp_path / "old.pt")


# --- malformed metadata of any shape ---------------------------------------------------------------------
def _meta(key, value):
    def change(header):
        header["__metadata__"][key] = value
    return change


def _tensor(field, value):
    def change(header):
        header[first_tensor(header)][field] = value
    return change


MALFORMED = {
    "aliases a list": (_meta("aliases", json.dumps([1])), "aliases"),
    "aliases to a number": (_meta("aliases", json.dumps({"head.weight": 1})), "aliases"),
    "aliases to no tensor": (_meta("aliases", json.dumps({"head.weight": "nowhere"})), "nowhere"),
    "aliases not JSON": (_meta("aliases", "{"), "aliases"),
    "metadata a string": (lambda h: h.update(__metadata__="format"), "__metadata__"),
    "metadata a list": (lambda h: h.update(__metadata__=["format"]), "__metadata__"),
    "metadata value a number": (_meta("extra", 3), "extra"),
    "config a list": (_meta("config", json.dumps([1, 2])), "config"),
    "config not JSON": (_meta("config", "{'d_model': 3"), "config"),
    "extra a list": (_meta("extra", json.dumps([1])), "extra"),
    "data_offsets words": (_tensor("data_offsets", ["a", "b"]), "data_offsets"),
    "data_offsets one number": (_tensor("data_offsets", [0]), "data_offsets"),
    "data_offsets floats": (_tensor("data_offsets", [0.0, 4.5]), "data_offsets"),
    "data_offsets backwards": (_tensor("data_offsets", [64, 0]), "data_offsets"),
    "data_offsets a dict": (_tensor("data_offsets", {"a": 1}), "data_offsets"),
    "data_offsets past the end": (_tensor("data_offsets", [10 ** 9, 10 ** 9 + 32 * 32 * 4]), "truncated"),
    "shape a string": (_tensor("shape", "3x4"), "shape"),
    "shape negative": (_tensor("shape", [-1, 4]), "shape"),
    "shape not the bytes": (_tensor("shape", [1]), "shape"),
    "dtype unknown": (_tensor("dtype", "Q7"), "dtype"),
    "dtype a list": (_tensor("dtype", ["F32"]), "dtype"),
    "tensor entry a string": (lambda h: h.update({first_tensor(h): "F32"}), "entry"),
    "tensor entry lacks its dtype": (lambda h: h[first_tensor(h)].pop("dtype"), "dtype"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_an_error_naming_the_path_and_the_cause(saved, case, capsys):
    change, cause = MALFORMED[case]
    header, data = split(saved)
    change(header)
    rewrite(saved, header, data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    msg = str(info.value)
    assert str(saved) in msg and cause in msg, msg
    assert ckpt.main([str(saved)]) == 1  # the command says the same, without a traceback
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {saved}: ") and cause in err and "Traceback" not in err, err


def test_the_checkpoint_command_names_malformed_metadata(saved):
    header, data = split(saved)
    header["__metadata__"]["aliases"] = "[1]"
    rewrite(saved, header, data)
    out = subprocess.run([sys.executable, "-m", "moe_lab", "checkpoint", str(saved)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"checkpoint {saved}: " in out.stderr and "aliases" in out.stderr, out.stderr


# --- one open per read: a concurrent save never mixes two files ------------------------------------------
SAVER = textwrap.dedent("""
    import sys, torch
    from moe_lab.core.config import ModelConfig
    from moe_lab.model.transformer import Transformer
    from moe_lab.training.checkpoint import save_checkpoint
    path = sys.argv[1]
    cfg = ModelConfig(vocab_size=20, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, d_ff=32)
    models = []
    for k in (1, 2):
        m = Transformer(cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float(k))
        models.append(m)
    # the two saves differ in the size of their figures too, so a size taken from one file and a
    # header from the other shows; a long header widens the gap between two opens of a reader
    extra = {1: {"id": 1, "pad": "x" * 400_000}, 2: {"id": 2, "pad": "y" * 900_000}}
    i = 0
    while True:
        k = 1 + i % 2
        save_checkpoint(path, models[k - 1], extra=extra[k])
        i += 1
""")


def test_reads_during_concurrent_saves_are_each_one_whole_save(tmp_path):
    path = tmp_path / "m.safetensors"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert saver.poll() is None, saver.stderr.read().decode()
            assert time.monotonic() < deadline, "the saver never wrote"
            time.sleep(0.05)
        reads, bad, ids = 0, [], set()
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            try:
                _, extra, state = read_checkpoint(path)
            except (CheckpointError, FileNotFoundError) as exc:  # every file on the path is whole
                bad.append(repr(exc)[:200])
                continue
            reads += 1
            ids.add(extra["id"])
            values = {float(t.flatten()[0]) for t in state.values()}
            if values != {float(extra["id"])}:
                bad.append(f"figures of save {extra['id']} with tensors {sorted(values)}")
        assert saver.poll() is None, saver.stderr.read().decode()
    finally:
        saver.kill()
        saver.wait()
    assert ids == {1, 2}, f"the saves did not alternate during the reads ({reads} reads)"
    assert not bad, f"{len(bad)} of {reads + len(bad)} reads mixed two saves or failed: {bad[:3]}"


# --- the temporary file of a killed save ------------------------------------------------------------------
BIG_SAVER = textwrap.dedent("""
    import sys, torch
    from moe_lab.core.config import ModelConfig
    from moe_lab.model.transformer import Transformer
    from moe_lab.training.checkpoint import save_checkpoint
    torch.manual_seed(0)
    # about 55 million parameters: 220 MB to write, long enough to be killed in the middle
    model = Transformer(ModelConfig(vocab_size=20, d_model=512, n_layers=4, n_heads=8, max_seq_len=16, d_ff=8192))
    print("built", flush=True)
    while True:
        save_checkpoint(sys.argv[1], model)
""")


def temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_the_temporary_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "m.safetensors"
    saver = subprocess.Popen([sys.executable, "-c", BIG_SAVER, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert saver.stdout.readline().strip() == b"built"
        deadline = time.monotonic() + 120
        while not temporaries(tmp_path):  # kill it while it writes
            assert saver.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait()
    left = temporaries(tmp_path)
    assert left == [f".m.safetensors.{saver.pid}.{left[0].split('.')[-2]}.tmp"], left  # the killed save's, hidden

    # a temporary file of a live process (a save still going on elsewhere) is not the next save's to remove
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        other = tmp_path / f".m.safetensors.{alive.pid}.0123abcd.tmp"
        other.write_bytes(b"half a save")
        mine = tmp_path / f".m.safetensors.{os.getpid()}.89abcdef.tmp"  # another thread of this process
        mine.write_bytes(b"half a save")
        unrelated = tmp_path / f".n.safetensors.{saver.pid}.0123abcd.tmp"  # another file's, of a dead process
        unrelated.write_bytes(b"x")
        save_checkpoint(path, Transformer(tiny_cfg()))
        assert temporaries(tmp_path) == sorted([other.name, mine.name, unrelated.name])
        load_checkpoint(path)
    finally:
        alive.kill()
        alive.wait()
