"""Layers, the transformer, configs, runtime policy, checkpoints and the training loop.

Run: .venv/bin/python -m pytest tests/model/test_model.py -q
"""
import json
import math
import sys

import pytest
import torch

from moe_lab.core import runtime
from moe_lab.training.checkpoint import load_checkpoint, save_checkpoint
from moe_lab.core.config import ModelConfig, MoEConfig, TrainConfig, preset
from moe_lab.model.layers import CausalSelfAttention, RMSNorm, apply_rope, rope_tables
from moe_lab.model.transformer import Transformer
from moe_lab.training.loop import evaluate, lr_at, train


def tiny_cfg(**kw):
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared=1)
    base = dict(vocab_size=20, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=48, ffn="moe", moe=moe)
    base.update(kw)
    return ModelConfig(**base)


# --- layers ------------------------------------------------------------------------------------
def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.rand(8)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_preserves_norm_and_depends_on_relative_position():
    cos, sin = rope_tables(8, 64)
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)

    def rotated(v, pos):
        return apply_rope(v.view(1, 1, 1, 8).expand(1, 1, 64, 8), cos, sin)[0, 0, pos]

    torch.testing.assert_close(rotated(q, 5).norm(), q.norm())
    score_a = rotated(q, 10) @ rotated(k, 7)
    score_b = rotated(q, 33) @ rotated(k, 30)  # same distance 3
    torch.testing.assert_close(score_a, score_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score_a, rotated(q, 10) @ rotated(k, 2))  # another distance differs


def test_attention_is_causal():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4, 32)
    x = torch.randn(1, 10, 16)
    y = attn(x)
    x2 = x.clone()
    x2[0, 6:] += torch.randn(4, 16)  # change the future
    torch.testing.assert_close(attn(x2)[0, :6], y[0, :6])
    assert not torch.allclose(attn(x2)[0, 6:], y[0, 6:])


# --- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=9, n_experts=8), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(router="relu"), "router"),
    (dict(n_experts=0), "n_experts"),
    (dict(balance="magic"), "balance"),
])
def test_moe_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(n_dense_layers=5, n_layers=2), "n_dense_layers"),
    (dict(ffn="sparse"), "ffn"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_model_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        ModelConfig(**kwargs)


def test_train_config_validates():
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        TrainConfig(steps=0)


@pytest.mark.parametrize("name", ["ci", "cpu", "gpu"])
def test_presets_dense_twin_has_equal_active_parameters(name):
    p = preset(name)
    moe, dense = Transformer(p.moe), Transformer(p.dense)
    gates = sum(l.router.gate.weight.numel() for l in moe.moe_layers())
    assert moe.n_params(active=True) - gates == dense.n_params()
    assert moe.n_params() > dense.n_params()


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset name='tpu'"):
        preset("tpu")


# --- runtime -----------------------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({"MOE_LAB_MODE": "cpu", "CI": "true"}, "cpu"),
    ({"CI": "true"}, "ci"),
    ({"MOE_LAB_FAST": "1"}, "ci"),
    ({"MOE_LAB_FAST": "0"}, "gpu" if torch.cuda.is_available() else "cpu"),
    ({}, "gpu" if torch.cuda.is_available() else "cpu"),
])
def test_detect_mode(env, expected):
    assert runtime.detect_mode(env) == expected


def test_detect_mode_rejects_unknown():
    with pytest.raises(ValueError, match="MOE_LAB_MODE='fast'"):
        runtime.detect_mode({"MOE_LAB_MODE": "fast"})


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                               ((7, 5), torch.float16), ((7, 0), torch.float16)])
def test_dtype_policy_on_simulated_gpus(capability, dtype):
    assert runtime.pick_dtype(torch.device("cuda"), capability) == dtype


def test_setup_prints_summary_and_seeds(capsys):
    rt = runtime.setup(seed=3, mode="ci")
    out = capsys.readouterr().out
    assert "mode=ci" in out and "torch" in out
    a = torch.rand(3)
    runtime.setup(seed=3, mode="ci", verbose=False)
    assert torch.equal(a, torch.rand(3))
    if not torch.cuda.is_available():
        assert rt.dtype == torch.float32 and rt.triton_interpret


def test_gpu_mode_without_a_gpu_is_said_out_loud(monkeypatch):
    """MOE_LAB_MODE=gpu on a machine without a usable GPU: the GPU presets on the CPU, many times
    slower. setup() warns, naming the mode and what to do."""
    monkeypatch.setattr(runtime, "_cuda_usable", lambda env=None: False)
    with pytest.warns(UserWarning, match="mode 'gpu'.*CPU.*Unset MOE_LAB_MODE"):
        rt = runtime.setup(mode="gpu", verbose=False)
    assert rt.mode == "gpu" and rt.device.type == "cpu"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning in a mode that fits the machine
        runtime.setup(mode="cpu", verbose=False)


class _FakeColabOutput:
    def __init__(self):
        self.enabled = 0

    def enable_custom_widget_manager(self):
        self.enabled += 1


@pytest.mark.parametrize("version, enabled", [("8.1.5", 1), ("7.7.1", 0)])
def test_colab_gets_the_widget_manager_ipywidgets_8_needs(monkeypatch, version, enabled):
    """On Colab, ipywidgets 8 draws only through Colab's custom widget manager; 7 draws without it."""
    import types

    import ipywidgets

    output = _FakeColabOutput()
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    monkeypatch.setattr(ipywidgets, "__version__", version)
    runtime.setup(mode="ci", verbose=False)
    assert output.enabled == enabled


# --- transformer -------------------------------------------------------------------------------
def test_forward_shapes_loss_and_mask():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    x, y = torch.randint(0, 20, (2, 12)), torch.randint(0, 20, (2, 12))
    logits, loss = model(x, y)
    assert logits.shape == (2, 12, 20)
    assert abs(loss.item() - math.log(20)) < 0.5  # an untrained model is near uniform
    mask = torch.zeros(2, 12)
    mask[:, -1] = 1
    _, masked = model(x, y, mask)
    nll = torch.nn.functional.cross_entropy(logits[:, -1], y[:, -1])
    torch.testing.assert_close(masked, nll)
    assert model.balance_loss().item() > 0


def test_out_of_vocabulary_tokens_raise_clearly():
    model = Transformer(tiny_cfg())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=20\)"):
        model(torch.tensor([[1, 2, 25]]))
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 40, dtype=torch.long))


def test_first_layers_dense():
    model = Transformer(tiny_cfg(n_layers=3, n_dense_layers=1))
    assert len(model.moe_layers()) == 2
    assert not hasattr(model.blocks[0].ffn, "router")


def test_generate_greedy_is_deterministic_and_stops():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    prompt = torch.randint(0, 20, (3, 4))
    a = model.generate(prompt, 6, temperature=0)
    b = model.generate(prompt, 6, temperature=0)
    assert torch.equal(a, b) and a.shape == (3, 10)
    stop = int(a[0, 4])  # the first greedy token of row 0: it stops at once
    c = model.generate(prompt, 6, temperature=0, stop_token=stop)
    assert int(c[0, 4]) == stop and (c[0, 4:] == stop).all()
    g = torch.Generator().manual_seed(1)
    s = model.generate(prompt, 5, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(s, a[:, :9])  # top-1 sampling is greedy
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1)


def test_backend_switch_keeps_the_function():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).double()
    x = torch.randint(0, 20, (2, 8))
    ref = model(x)[0]
    model.set_backend("reference")
    torch.testing.assert_close(model(x)[0], ref)
    with pytest.raises(ValueError, match="set_backend"):
        model.set_backend("cuda")


# --- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_round_trip_with_config_in_its_metadata(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    path = save_checkpoint(tmp_path / "m.safetensors", model, extra={"val_loss": 1.5})
    with safe_open(str(path), "pt") as f:  # any safetensors reader sees the config and the figures
        meta = f.metadata()
    assert json.loads(meta["config"])["moe"]["n_experts"] == 4 and json.loads(meta["extra"])["val_loss"] == 1.5
    loaded, extra = load_checkpoint(path, expected=tiny_cfg())
    x = torch.randint(0, 20, (2, 8))
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    assert extra == {"val_loss": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # one file, nothing half-written beside it


def test_checkpoint_of_other_config_is_refused(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", Transformer(tiny_cfg()))
    with pytest.raises(ValueError, match=r"moe.n_experts: expected 8, checkpoint has 4"):
        load_checkpoint(tmp_path / "m.safetensors", expected=tiny_cfg(moe=MoEConfig(n_experts=8, top_k=2, d_expert=16, n_shared=1)))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")


# --- training ----------------------------------------------------------------------------------
def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_accuracy_snapshot_keeps_the_weights_of_the_first_check_at_the_target(monkeypatch):
    """Checks every 25 steps, every 5 once a check reached 30 %; copies the weights at the first check
    at or above the target and never checks again; the copy is independent of later training."""
    import moe_lab.training.recipe
    from moe_lab.training.recipe import AccuracySnapshot

    model = torch.nn.Linear(2, 2)
    scripted = iter([0.0, 0.1, 0.35, 0.5, 0.7, 0.99])
    seen = []

    def fake_exact_match(m, task, n, seed, split):
        seen.append((n, split))
        return next(scripted)

    monkeypatch.setattr(moe_lab.training.recipe, "exact_match", fake_exact_match)
    snap = AccuracySnapshot(model, task=None, target=0.65)
    for step in range(200):
        with torch.no_grad():
            model.weight.fill_(step)  # "training"
        snap(step, None)
    assert [s for s, _ in snap.checks] == [25, 50, 75, 80, 85]  # every 25, then every 5 from 0.35 on
    assert snap.step == 85 and seen == [(200, "train")] * 5
    copy = snap.model_copy()
    assert copy.weight[0, 0].item() == 84 and model.weight[0, 0].item() == 199
    never = AccuracySnapshot(model, task=None, target=0.99)
    monkeypatch.setattr(moe_lab.training.recipe, "exact_match", lambda *a, **k: 0.1)
    for step in range(100):
        never(step, None)
    with pytest.raises(RuntimeError, match="never reached 99%"):
        never.model_copy()
    with pytest.raises(ValueError, match="target=1.5"):
        AccuracySnapshot(model, task=None, target=1.5)


def test_int_lists_of_the_spread_command():
    from moe_lab.core.arguments import int_list as _int_list

    assert _int_list("0-4") == [0, 1, 2, 3, 4] and _int_list("1,2") == [1, 2] and _int_list("0-1,5") == [0, 1, 5]


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_training_learns_a_repeating_pattern(ffn):
    """A model must learn to continue 0 1 2 ... 9 0 1 2 ...: the loss falls far below chance."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(ffn=ffn, moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, balance="aux_free")))
    g = torch.Generator().manual_seed(0)

    def batches(split):
        start = torch.randint(0, 10, (8, 1), generator=g)
        seq = (start + torch.arange(17)) % 10
        return seq[:, :-1], seq[:, 1:], torch.ones(8, 16)

    cfg = TrainConfig(steps=60, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=5, eval_every=30, eval_batches=2)
    before = evaluate(model, batches, 2)
    hist = train(model, batches, cfg, progress=False)
    assert hist.final_val_loss < 0.3 * before
    assert len(hist.train_loss) == 60 and hist.eval_step == [30, 60]
    if ffn == "moe":
        assert len(hist.load) == 60 and hist.load[0].shape == (2, 4)
        assert any(float(l.router.expert_bias.abs().sum()) > 0 for l in model.moe_layers())
