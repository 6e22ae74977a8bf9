"""Generation checks its own arguments (type, NaN, sign), each error naming the function, the argument,
the value and what was expected; a failing call leaves the model in the mode it had; configs changed
after construction are checked again when a model (or a trainer, or a training run) is built.

Run: .venv/bin/python -m pytest tests/model/test_reliability_generation.py -q
"""
import math
from dataclasses import replace

import pytest
import torch

from moe_lab.core.config import ConfigError, ModelConfig, MoEConfig, TrainConfig
from moe_lab.data import ArithmeticTask
from moe_lab.model import Transformer
from moe_lab.model.moe import MoELayer
from moe_lab.model.transformer import GenerationArgumentError
from moe_lab.training.evaluation import generate_completions, solve
from moe_lab.training.grpo import GRPOConfig, GRPOTrainer
from moe_lab.training.loop import train

TASK = ArithmeticTask(op="add", n_digits=2)
CFG = ModelConfig(vocab_size=99, d_model=32, n_layers=1, n_heads=4, max_seq_len=32, d_ff=48, ffn="moe",
                  moe=MoEConfig(n_experts=4, top_k=2, d_expert=16))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG)


PROMPT = torch.tensor([[1, 5, 7]])


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=-1), "generate(max_new_tokens=-1): expected an integer >= 0"),  # returned the prompt
    (dict(max_new_tokens=-10), "generate(max_new_tokens=-10)"),  # new_cache(capacity=-5)
    (dict(max_new_tokens=2.5), "generate(max_new_tokens=2.5)"),
    (dict(max_new_tokens=None), "generate(max_new_tokens=None)"),
    (dict(max_new_tokens="3"), "generate(max_new_tokens='3')"),
    (dict(max_new_tokens=True), "generate(max_new_tokens=True)"),
    (dict(max_new_tokens=3, temperature=math.nan), "generate(temperature=nan): expected a finite number > 0, or 0"),
    (dict(max_new_tokens=3, temperature=math.inf), "generate(temperature=inf)"),
    (dict(max_new_tokens=3, temperature=-1.0), "generate(temperature=-1.0)"),
    (dict(max_new_tokens=3, temperature="1"), "generate(temperature='1')"),
    (dict(max_new_tokens=3, temperature=None), "generate(temperature=None)"),
    (dict(max_new_tokens=3, top_k=2.5), "generate(top_k=2.5): expected None or an integer in [1, 99]"),
    (dict(max_new_tokens=3, top_k=0), "generate(top_k=0)"),
    (dict(max_new_tokens=3, top_k=100), "generate(top_k=100)"),
    (dict(max_new_tokens=3, top_k="5"), "generate(top_k='5')"),
    (dict(max_new_tokens=3, repeats=0), "generate(repeats=0)"),
    (dict(max_new_tokens=3, stop_token=99), "generate(stop_token=99)"),
    (dict(max_new_tokens=3, stop_token=1.0), "generate(stop_token=1.0)"),
])
def test_generate_names_a_bad_argument(model, kwargs, words):
    with pytest.raises(GenerationArgumentError) as info:
        model.generate(PROMPT, **kwargs)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_generate_names_float_token_ids(model):
    with pytest.raises(GenerationArgumentError, match="idx has dtype torch.float32: expected integer token ids"):
        model.generate(PROMPT.float(), 2)


def test_generate_0_new_tokens_returns_the_prompts_and_keeps_working(model):
    assert torch.equal(model.generate(PROMPT, 0), PROMPT)
    out, logits = model.generate(PROMPT, 0, return_logits=True)
    assert torch.equal(out, PROMPT) and logits.shape == (1, 0, CFG.vocab_size)
    assert model.generate(PROMPT, 2, temperature=0.5, top_k=3).shape == (1, 5)
    assert model.generate(PROMPT, 2, temperature=1, top_k=torch.tensor(3).item()).shape == (1, 5)


PROBLEMS = TASK.problems(3, "heldout", 0)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), "generate_completions(max_new_tokens=0): expected an integer >= 1"),  # gave 5 tokens
    (dict(max_new_tokens=-3), "generate_completions(max_new_tokens=-3)"),  # gave empty completions
    (dict(max_new_tokens=2.5), "generate_completions(max_new_tokens=2.5): expected None"),
    (dict(max_new_tokens="4"), "generate_completions(max_new_tokens='4')"),
    (dict(temperature=math.nan), "generate_completions(temperature=nan)"),
    (dict(temperature="1"), "generate_completions(temperature='1')"),
    (dict(temperature=0.7, top_k=2.5), "generate_completions(top_k=2.5)"),
    (dict(repeats=0), "generate_completions(repeats=0)"),
    (dict(repeats=1.5), "generate_completions(repeats=1.5)"),
])
def test_generate_completions_names_a_bad_argument(model, kwargs, words):
    with pytest.raises(GenerationArgumentError) as info:
        generate_completions(model, PROBLEMS, **kwargs)
    assert words in str(info.value)


def test_a_failing_call_leaves_a_training_model_in_training_mode(model, monkeypatch):
    model.train()
    try:
        with pytest.raises(GenerationArgumentError):
            generate_completions(model, PROBLEMS, max_new_tokens=-3)
        assert model.training
        with pytest.raises(GenerationArgumentError):
            model.generate(PROMPT, 2, temperature=math.nan)
        assert model.training

        def fail(*a, **k):  # a failure inside generation itself, after the switch to eval mode
            raise RuntimeError("out of memory")

        monkeypatch.setattr(model, "_generate", fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            generate_completions(model, PROBLEMS, max_new_tokens=4)
        assert model.training
    finally:
        model.eval()


def test_good_arguments_still_generate(model):
    rows = generate_completions(model, PROBLEMS, repeats=2, temperature=0.7, top_k=5, max_new_tokens=4,
                                generator=torch.Generator().manual_seed(0))
    assert len(rows) == 6 and all(1 <= len(c) <= 4 for _, c in rows)
    assert len(solve(model, PROBLEMS)) == 3


# --- configs changed after construction are checked again where they are used -------------------------------
def test_a_model_config_changed_after_construction_is_named_when_a_model_is_built():
    c = replace(CFG)
    c.norm_eps = float("nan")  # the model's outputs were NaN
    with pytest.raises(ConfigError, match=r"ModelConfig\.norm_eps=nan"):
        Transformer(c)
    c = replace(CFG)
    c.n_heads = 5
    with pytest.raises(ConfigError, match=r"ModelConfig\.n_heads=5: expected a divisor of d_model=32"):
        Transformer(c)


def test_a_moe_config_changed_after_construction_is_named_when_a_model_or_layer_is_built():
    m = MoEConfig(n_experts=4, top_k=2, d_expert=16)
    m.top_k = 50  # a RuntimeError inside the router
    with pytest.raises(ConfigError, match=r"MoEConfig\.top_k=50: expected at most n_experts=4"):
        MoELayer(32, m)
    c = replace(CFG, moe=MoEConfig(n_experts=4, top_k=2, d_expert=16))
    c.moe.router = "argmax"
    with pytest.raises(ConfigError, match=r"MoEConfig\.router='argmax'"):
        Transformer(c)


def test_check_returns_the_config_and_accepts_a_good_one():
    assert CFG.check() is CFG and GRPOConfig().check() is not None


def test_transformer_refuses_something_else_than_a_config():
    with pytest.raises(TypeError, match="expected a ModelConfig"):
        Transformer(CFG.to_dict())


def test_a_grpo_config_changed_after_construction_is_named_when_the_trainer_is_built(model):
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, eval_problems=2)
    cfg.clip_eps = float("nan")
    with pytest.raises(ConfigError, match=r"GRPOConfig\.clip_eps=nan"):
        GRPOTrainer(model, TASK, cfg)


def test_a_train_config_changed_after_construction_is_named_before_any_step(model):
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=8)
    cfg.lr = float("nan")

    def no_batches(split):
        raise AssertionError("a batch was drawn despite a bad config")

    with pytest.raises(ConfigError, match=r"TrainConfig\.lr=nan"):
        train(model, no_batches, cfg, progress=False)
