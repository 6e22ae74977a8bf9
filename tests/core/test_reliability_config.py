"""Every field of every config refuses a wrong type, NaN, inf and an out-of-range value, naming the field.

The table BAD below gives, for each field of each config, one value of a wrong type and one out of
its range; NaN and inf are tried on every field. `test_the_table_covers_every_field` fails when a
config gains a field the table does not list, so a new field cannot go unchecked.

Run: .venv/bin/python -m pytest tests/core/test_reliability_config.py -q
"""
import math
from dataclasses import dataclass, fields, replace

import numpy as np
import pytest

from moe_lab.core.config import ModelConfig, MoEConfig, Preset, TrainConfig, preset
from moe_lab.training.grpo import GRPOConfig

CONFIGS = (MoEConfig, ModelConfig, TrainConfig, Preset, GRPOConfig)


def base(cls):
    """A valid instance of each config."""
    return preset("ci") if cls is Preset else cls()


# (config, field): (a value of the wrong type, a value of the right type out of range)
BAD = {
    (MoEConfig, "n_experts"): ("8", 0),
    (MoEConfig, "top_k"): (2.0, 0),
    (MoEConfig, "d_expert"): ("32", 0),
    (MoEConfig, "n_shared"): (1.5, -1),
    (MoEConfig, "d_shared"): ("16", 0),
    (MoEConfig, "router"): (3, "relu"),
    (MoEConfig, "routed_scaling"): ("1.0", 0.0),
    (MoEConfig, "balance"): (1, "magic"),
    (MoEConfig, "aux_loss_coef"): ("0.01", -0.01),
    (MoEConfig, "z_loss_coef"): ([0.0], -1.0),
    (MoEConfig, "bias_update_rate"): ("1e-3", -1e-3),
    (MoEConfig, "capacity_factor"): ("1.0", 0.0),
    (MoEConfig, "backend"): (None, "cuda"),
    (ModelConfig, "vocab_size"): ("99", 0),
    (ModelConfig, "d_model"): (64.0, 0),
    (ModelConfig, "n_layers"): (True, 0),
    (ModelConfig, "n_heads"): ("4", 0),
    (ModelConfig, "max_seq_len"): (1.5, 0),
    (ModelConfig, "d_ff"): ("96", 0),
    (ModelConfig, "ffn"): (1, "sparse"),
    (ModelConfig, "n_dense_layers"): ("0", -1),
    (ModelConfig, "moe"): (3, {"top_kk": 1}),
    (ModelConfig, "rope_theta"): ("1e4", 0.0),
    (ModelConfig, "norm_eps"): ("1e-5", -1e-5),
    (ModelConfig, "tie_embeddings"): ("no", 1),
    (ModelConfig, "attention"): (1, "gqa"),
    (ModelConfig, "kv_rank"): ("32", 0),
    (ModelConfig, "q_rank"): (16.5, 0),
    (ModelConfig, "rope_dim"): ("8", 0),
    (TrainConfig, "steps"): ("600", 0),
    (TrainConfig, "batch_size"): (32.0, 0),
    (TrainConfig, "seq_len"): ("64", 0),
    (TrainConfig, "lr"): ("3e-3", 0.0),
    (TrainConfig, "min_lr_ratio"): ("0.1", 1.5),
    (TrainConfig, "warmup_steps"): (1.5, -1),
    (TrainConfig, "weight_decay"): ("0.1", -0.1),
    (TrainConfig, "betas"): ("ab", (0.9, 1.0)),
    (TrainConfig, "grad_clip"): ("1", -1.0),
    (TrainConfig, "eval_every"): (1.0, 0),
    (TrainConfig, "eval_batches"): ("4", 0),
    (TrainConfig, "seed"): ("a", -1),
    (Preset, "name"): (3, "tpu"),
    (Preset, "moe"): ("x", ModelConfig(ffn="dense")),
    (Preset, "train"): ("x", TrainConfig(seq_len=128)),  # longer than the model's max_seq_len=64
    (GRPOConfig, "steps"): ("100", 0),
    (GRPOConfig, "prompts_per_step"): (32.0, 0),
    (GRPOConfig, "group_size"): ("8", 1),
    (GRPOConfig, "temperature"): ("0.7", 0.0),
    (GRPOConfig, "lr"): ("1e-4", 0.0),
    (GRPOConfig, "warmup_steps"): (1.5, -1),
    (GRPOConfig, "clip_eps"): ("0.2", 1.0),
    (GRPOConfig, "beta"): ("0.04", -0.1),
    (GRPOConfig, "inner_updates"): (1.0, 0),
    (GRPOConfig, "aggregation"): (1, "mean"),
    (GRPOConfig, "advantage"): (1, "x"),
    (GRPOConfig, "format_weight"): ("0.1", -1.0),
    (GRPOConfig, "balance_coef"): ("0", -1.0),
    (GRPOConfig, "update_router_biases"): ("no", 1),
    (GRPOConfig, "grad_clip"): ("1", -1.0),
    (GRPOConfig, "eval_every"): (50.0, 0),
    (GRPOConfig, "eval_problems"): ("500", 0),
    (GRPOConfig, "seed"): ("a", -1),
}

CASES = [(cls, name, kind, value)
         for (cls, name), (wrong_type, out_of_range) in BAD.items()
         for kind, value in (("wrong type", wrong_type), ("nan", math.nan), ("inf", math.inf),
                             ("-inf", -math.inf), ("out of range", out_of_range))]


def test_the_table_covers_every_field():
    listed = {(cls, name) for cls, name in BAD}
    every = {(cls, f.name) for cls in CONFIGS for f in fields(cls)}
    assert every - listed == set(), "add these fields to BAD"
    assert listed - every == set()


@pytest.mark.parametrize("cls, name, kind, value", CASES,
                         ids=[f"{c.__name__}.{n}-{k}" for c, n, k, _ in CASES])
def test_a_bad_value_is_refused_naming_the_field(cls, name, kind, value):
    with pytest.raises(ValueError) as info:
        replace(base(cls), **{name: value})
    assert f"{cls.__name__}.{name}" in str(info.value), str(info.value)
    assert "expected" in str(info.value) or "known keys" in str(info.value)


@pytest.mark.parametrize("cls", CONFIGS)
def test_the_defaults_and_presets_still_validate(cls):
    b = base(cls)
    assert replace(b) == b


def test_numbers_are_stored_in_their_field_type():
    """An int in a float field becomes a float; a numpy integer in an int field becomes an int."""
    cfg = TrainConfig(lr=1, steps=np.int64(5), betas=[0.9, 0.99])
    assert type(cfg.lr) is float and type(cfg.steps) is int and cfg.betas == (0.9, 0.99)


@pytest.mark.parametrize("build, bad, right, known", [
    (lambda d: ModelConfig.from_dict(d), "d_modle", "d_model", "vocab_size"),
    (lambda d: TrainConfig.from_dict(d), "learning_rate", None, "warmup_steps"),
    (lambda d: GRPOConfig.from_dict(d), "groupsize", "group_size", "clip_eps"),
    (lambda d: ModelConfig(moe=d), "top_kk", "top_k", "n_experts"),
])
def test_an_unknown_key_is_named_with_the_known_ones(build, bad, right, known):
    with pytest.raises(ValueError) as info:
        build({bad: 1})
    msg = str(info.value)
    assert repr(bad) in msg and known in msg, msg
    if right:
        assert f"did you mean {right!r}" in msg


def test_a_checkpoint_config_round_trips_through_a_dict():
    cfg = preset("cpu").moe
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert GRPOConfig.from_dict(GRPOConfig().to_dict()) == GRPOConfig()


def test_a_new_field_without_a_check_is_an_error_at_import():
    from moe_lab.core.config import integer, validated

    with pytest.raises(TypeError, match=r"fields without a spec \['b'\]"):
        @validated(a=integer(1))
        @dataclass
        class Two:
            a: int = 1
            b: int = 2
