"""moe_lab.open_weights: export to and import from Hugging Face transformers, offline.

Tiny models of every supported architecture are built by transformers itself from a config (random
weights, saved with save_pretrained into a temporary folder): nothing downloads. Round trips both
ways must give logits within 1e-5 (float32) and the same greedy tokens; every refusal names its
field or feature. Skipped, with the reason, where transformers is not installed (the `hub` extra),
except under CI=true, where it must be.

    .venv/bin/python -m pytest tests/test_open_weights.py -q
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from moe_lab.training.checkpoint import load_checkpoint, shipped_checkpoint
from moe_lab.core.config import ModelConfig, MoEConfig
from moe_lab.data import course_task
from moe_lab.data.tokenizer import TOKENIZER
from moe_lab.model.transformer import Transformer

try:
    import tokenizers  # noqa: F401
    import transformers
except ImportError as exc:  # the hub extra is optional for the course, required in CI
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip(f"transformers/tokenizers not installed ({exc}); pip install -e '.[hub]'", allow_module_level=True)

from moe_lab.open_weights import NoCounterpart, OutputDirError, choose_architecture, export, from_transformers
from moe_lab.open_weights.architectures import model_config
from moe_lab.open_weights.export import main
from moe_lab.open_weights.mapping import hf_name
from moe_lab.open_weights.rope import to_half, to_interleaved

TOL = 1e-5
X = torch.randint(0, 99, (2, 24), generator=torch.Generator().manual_seed(0))
COMMON = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MLA = dict(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
MOE = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2)


def hf_case(name: str):
    """(transformers class, config) of a tiny model of each supported architecture."""
    T = transformers
    return {
        # grouped-query attention (2 key-value heads for 4 heads): imported as multi-head attention
        "Ernie4_5_Moe": (T.Ernie4_5_MoeForCausalLM, T.Ernie4_5_MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, moe_k=2, moe_num_experts=4,
            moe_num_shared_experts=1, moe_layer_start_index=1)),
        "Mixtral": (T.MixtralForCausalLM, T.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4,
                                                         num_experts_per_tok=2)),
        "Glm4Moe": (T.Glm4MoeForCausalLM, T.Glm4MoeConfig(
            **{**COMMON, "rope_parameters": {**COMMON["rope_parameters"], "partial_rotary_factor": 1.0}}, **MOE,
            n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5)),
        "DeepseekV3": (T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
            **{**COMMON, **MLA}, **MOE, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, n_group=1,
            topk_group=1, routed_scaling_factor=2.5)),
        # low-rank queries, two shared experts, no dense layer, RoPE in the half layout
        "DeepseekV3-lowrank-q-half-rope": (T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
            **{**COMMON, **MLA}, **MOE, n_shared_experts=2, first_k_dense_replace=0, q_lora_rank=12, n_group=1,
            topk_group=1, rope_interleave=False)),
        "DeepseekV2": (T.DeepseekV2ForCausalLM, T.DeepseekV2Config(
            **{**COMMON, **MLA}, **{**MOE, "num_experts_per_tok": 1}, n_shared_experts=1, first_k_dense_replace=1,
            q_lora_rank=None, routed_scaling_factor=2.0)),
    }[name]


HF_CASES = ["Ernie4_5_Moe", "Mixtral", "Glm4Moe", "DeepseekV3", "DeepseekV3-lowrank-q-half-rope", "DeepseekV2"]


def build_hf(name: str, seed: int = 0):
    """A transformers model with weights large enough that routing and RoPE matter, and a random selection bias."""
    cls, config = hf_case(name)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in n else p.normal_(0.0, 0.2)
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    """{case: folder} of every tiny model, saved by transformers (random weights)."""
    out = {}
    for name in HF_CASES:
        d = tmp_path_factory.mktemp(name.lower())
        build_hf(name).save_pretrained(d)
        out[name] = d
    return out


def greedy_hf(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0)


def assert_same_function(hf_model, ours, x=X, n_new=8):
    """Logits within TOL and the same greedy tokens."""
    with torch.no_grad():
        theirs, mine = hf_model(x).logits, ours(x)[0]
    assert mine.shape == theirs.shape
    err = float((mine - theirs).abs().max())
    assert err < TOL, f"logits differ by {err:.2e} (tolerance {TOL})"
    prompt = x[:, :6]
    assert torch.equal(greedy_hf(hf_model, prompt, n_new), ours.generate(prompt, n_new, temperature=0.0))


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------
def course_strings() -> list[str]:
    from moe_lab.data.corpus import load_corpus

    task = course_task()
    problems = task.problems(50, "heldout", 0)
    corpus = load_corpus()
    return ([p.prompt + p.answer + "\n" for p in problems] + ["\n" + p.prompt for p in problems]
            + [corpus[i:i + 300] for i in range(0, 30_000, 3_000)] + ["", " ", "\n\n", "".join(TOKENIZER.itos[3:])])


def test_the_tokenizer_encodes_and_decodes_every_course_string_as_moe_lab(tmp_path):
    from transformers import AutoTokenizer

    from moe_lab.open_weights.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == TOKENIZER.vocab_size == 99
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for s in course_strings():
        ids = tok(s)["input_ids"]
        assert ids == TOKENIZER.encode(s), s
        assert tok.decode(ids) == s == TOKENIZER.decode(ids)
    specials = [1, 40, 2, 0, 3]
    assert tok.decode(specials, skip_special_tokens=True) == TOKENIZER.decode(specials)
    assert tok.decode(specials) == TOKENIZER.decode(specials, skip_special=False)


def test_the_tokenizer_refuses_characters_outside_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    from moe_lab.open_weights.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(Exception, match="UNK|unk"):
        tok("tab\there")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TOKENIZER.encode("tab\there")


# --------------------------------------------------------------------------------------------------
# RoPE layouts
# --------------------------------------------------------------------------------------------------
def test_the_half_layout_permutation_keeps_rotated_dot_products():
    """Rotating interleaved pairs then permuting = permuting then rotating halves (transformers' rotate_half)."""
    from moe_lab.model.layers import apply_rope, rope_tables

    hd, T = 8, 5
    cos, sin = rope_tables(hd, T)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2 * hd, 16, generator=g)  # two heads
    x = torch.randn(T, 16, generator=g)
    ours = apply_rope((x @ w.t()).view(T, 2, hd).transpose(0, 1)[None], cos, sin)  # (1, 2, T, hd)
    half = (x @ to_half(w, 2, hd).t()).view(T, 2, hd).transpose(0, 1)[None]
    c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotated = half * c + torch.cat([-half[..., hd // 2:], half[..., :hd // 2]], -1) * s
    assert torch.allclose(rotated, ours[..., torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])], atol=1e-6)
    assert torch.equal(to_interleaved(to_half(w, 2, hd), 2, hd), w)


# --------------------------------------------------------------------------------------------------
# import: transformers -> moe_lab, and back
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HF_CASES)
def test_an_imported_model_computes_what_transformers_computes(name, saved_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(saved_hf[name], dtype=torch.float32).eval()
    ours = from_transformers(saved_hf[name])
    assert isinstance(ours, Transformer) and ours.cfg.n_dense_layers == (0 if name in ("Mixtral", "DeepseekV3-lowrank-q-half-rope") else 1)
    assert_same_function(hf_model, ours)
    # and out again: the export of the imported model loads in transformers with the same function
    export(ours, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(again).__name__.startswith(name.split("-")[0])
    assert_same_function(again, ours)


def test_a_loaded_model_imports_as_well_as_a_folder():
    hf_model = build_hf("DeepseekV3")
    assert_same_function(hf_model, from_transformers(hf_model))


def test_every_expert_backend_agrees_on_an_imported_model(saved_hf):
    """reference, sorted, grouped_mm and triton (Triton's interpreter on the CPU), float32, on DeepseekV3's experts."""
    from moe_lab.model import expert_backends as B

    ours = from_transformers(saved_hf["DeepseekV3"])
    runnable = [n for n in B.names() if B.status(n, "cpu", torch.float32) is None]
    assert {"reference", "sorted", "triton"} <= set(runnable)
    outs = {}
    for backend in runnable:
        ours.set_backend(backend)
        with torch.no_grad():
            outs[backend] = ours(X)[0]
    for backend, logits in outs.items():
        assert float((logits - outs["reference"]).abs().max()) < TOL, backend
    layer = ours.moe_layers()[0]  # and per layer, on the same routed tokens
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        r = layer.router(x)
        ref = B.run_experts("reference", x, r.expert_idx, r.weights, layer.w1, layer.w3, layer.w2)
    for backend in runnable:
        with torch.no_grad():
            y = B.run_experts(backend, x, r.expert_idx, r.weights, layer.w1, layer.w3, layer.w2)
        assert float((y - ref).abs().max()) < TOL, backend


# --------------------------------------------------------------------------------------------------
# export: moe_lab -> transformers
# --------------------------------------------------------------------------------------------------
def moe_cfg(**kw) -> ModelConfig:
    moe = dict(n_experts=4, top_k=2, d_expert=16, n_shared=1, router="softmax", balance="aux_free")
    moe.update(kw.pop("moe", {}))
    base = dict(d_model=32, n_layers=3, n_heads=4, max_seq_len=64, d_ff=48, ffn="moe", n_dense_layers=1)
    base.update(kw)
    return ModelConfig(moe=MoEConfig(**moe), **base)


EXPORT_CASES = {  # moe_lab config -> the architecture that must hold it
    "Ernie4_5_MoeForCausalLM": moe_cfg(),
    "MixtralForCausalLM": moe_cfg(n_dense_layers=0, tie_embeddings=False, moe=dict(n_shared=0, balance="aux_loss")),
    "Glm4MoeForCausalLM": moe_cfg(moe=dict(router="sigmoid", routed_scaling=2.0)),
    "DeepseekV3ForCausalLM": moe_cfg(attention="mla", kv_rank=8, rope_dim=4, q_rank=12, norm_eps=1e-6,
                                     moe=dict(router="sigmoid", n_shared=2)),
    "DeepseekV2ForCausalLM": moe_cfg(attention="mla", kv_rank=8, rope_dim=4, norm_eps=1e-6,
                                     moe=dict(top_k=1, balance="aux_loss", routed_scaling=1.5)),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in n else p.normal_(0.0, 0.2)
        for layer in model.moe_layers():
            layer.router.expert_bias.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("arch", list(EXPORT_CASES))
def test_an_export_loads_in_transformers_with_the_same_function(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = random_model(EXPORT_CASES[arch])
    assert choose_architecture(ours.cfg).name == arch
    export(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [arch]
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf_model).__name__ == arch
    assert_same_function(hf_model, ours)
    back = from_transformers(tmp_path / "out")
    with torch.no_grad():
        assert float((back(X)[0] - ours(X)[0]).abs().max()) < TOL


def test_engine_fields_and_per_expert_names_are_written(tmp_path):
    from safetensors import safe_open

    export(random_model(EXPORT_CASES["DeepseekV3ForCausalLM"]), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["scoring_func"] == "sigmoid" and config["topk_method"] == "noaux_tc"
    assert config["n_group"] == config["topk_group"] == 1 and config["rope_interleave"] is True
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert hf_name("blocks.1.ffn.router.gate.weight", choose_architecture(EXPORT_CASES["DeepseekV3ForCausalLM"])) \
        == "model.layers.1.mlp.gate.weight"


# --------------------------------------------------------------------------------------------------
# the shipped checkpoint
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory):
    path = shipped_checkpoint()
    if path is None:
        pytest.skip("no shipped checkpoint in data/checkpoints/")
    out = tmp_path_factory.mktemp("shipped") / "moe-lab-moe"
    assert main([str(path), str(out)]) == 0
    return path, out


def test_the_shipped_checkpoint_exports_to_ernie_with_the_same_answers(shipped_export):
    from transformers import AutoModelForCausalLM, pipeline

    from moe_lab.training.evaluation import solve

    path, out = shipped_export
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                    "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    ours, extra = load_checkpoint(path)
    ours.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "Ernie4_5_MoeForCausalLM"
    x = torch.randint(0, 99, (2, 64), generator=torch.Generator().manual_seed(5))
    assert_same_function(hf_model, ours, x)
    problems = course_task().problems(12, "heldout", 7)
    pipe = pipeline("text-generation", model=str(out), dtype=torch.float32)
    answers = [r[0]["generated_text"] for r in pipe(["\n" + p.prompt for p in problems], max_new_tokens=6,
                                                    return_full_text=False)]
    assert answers == solve(ours, problems)
    card = (out / "README.md").read_text()
    assert "license: mit" in card and f"{extra['heldout_exact_match']:.1%}" in card and extra["command"] in card


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
REFUSED_EXPORTS = [  # (config, the field the refusal must name, a word of its reason)
    (moe_cfg(attention="mla", kv_rank=8, rope_dim=4, norm_eps=1e-6), "moe.balance", "selection bias"),
    (moe_cfg(attention="mla", kv_rank=8, rope_dim=4, norm_eps=1e-6, moe=dict(balance="aux_loss")), "moe.top_k",
     "renormalises"),
    (moe_cfg(attention="mla", kv_rank=8, rope_dim=4, moe=dict(router="sigmoid")), "norm_eps", "1e-06"),
    (moe_cfg(moe=dict(top_k=1)), "moe.top_k", "raw probability"),
    (moe_cfg(moe=dict(routed_scaling=2.0)), "moe.routed_scaling", "scaling"),
    (moe_cfg(moe=dict(n_shared=1, d_shared=24)), "moe.d_shared", "multiple"),
    (ModelConfig(d_model=32, n_heads=4, ffn="dense"), "ffn", "dense"),
]


@pytest.mark.parametrize("cfg,field,why", REFUSED_EXPORTS, ids=[f for _, f, _ in REFUSED_EXPORTS])
def test_a_config_without_exact_counterpart_is_refused_before_writing(cfg, field, why, tmp_path):
    with pytest.raises(NoCounterpart, match=f"ModelConfig.{field}=") as err:
        export(Transformer(cfg), tmp_path / "out")
    assert why in str(err.value)
    assert not (tmp_path / "out").exists()


def refused_import_configs():
    T = transformers
    glm = dict(**MOE, n_shared_experts=1, first_k_dense_replace=1)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    return [
        (T.Glm4MoeConfig(**{**COMMON, "rope_parameters": rope}, **glm, use_qk_norm=True), "QK-norm"),
        (T.Glm4MoeConfig(**{**COMMON, "rope_parameters": {**rope, "partial_rotary_factor": 0.5}}, **glm), "partial rotary"),
        (T.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, sliding_window=16), "sliding window"),
        (T.DeepseekV3Config(**{**COMMON, **MLA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                                                    "factor": 4.0, "original_max_position_embeddings": 16}},
                            **MOE, n_group=2, topk_group=2), "RoPE scaling"),
        (T.DeepseekV3Config(**{**COMMON, **MLA}, **MOE, n_group=2, topk_group=1), "group-limited routing"),
        (T.Glm4MoeConfig(**{**COMMON, "rope_parameters": rope}, **glm, attention_bias=True), "attention_bias"),
        (T.DeepseekV2Config(**{**COMMON, **MLA}, **MOE), "num_experts_per_tok=2"),
        (T.Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=16),
         "qwen2_moe"),  # a gated shared expert (and a QKV bias): not one of the supported architectures
    ]


@pytest.mark.parametrize("i", range(8))
def test_a_feature_moe_lab_lacks_is_refused_naming_it(i, tmp_path):
    config, feature = refused_import_configs()[i]
    with pytest.raises(NoCounterpart, match=feature):
        model_config(config)
    config.save_pretrained(tmp_path)  # a folder with a config and no weights: refused before any weight is read
    with pytest.raises(NoCounterpart, match=feature):
        from_transformers(tmp_path)


def test_the_output_folder_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    ckpt = shipped_checkpoint()
    model = random_model(EXPORT_CASES["MixtralForCausalLM"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    (tmp_path / "file").write_text("")
    for target, said in ((tmp_path / "full", "not empty"), (tmp_path / "file", "is a file"),
                         (tmp_path / "file" / "sub", "is a file")):
        with pytest.raises(OutputDirError, match=said):
            export(model, target)
        with pytest.raises(SystemExit) as exit_:
            main([str(ckpt or "missing.safetensors"), str(target)])
        assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    import sys

    E = sys.modules["moe_lab.open_weights.export"]  # the module (the package's `export` is the function)
    monkeypatch.setattr(E.os, "access", lambda *a, **k: False)  # root may write anywhere: pretend it may not
    with pytest.raises(OutputDirError, match="read-only"):
        export(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_core_course_imports_without_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['tokenizers'] = None\n"
            "import moe_lab, moe_lab.model, moe_lab.training.recipe, moe_lab.open_weights\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
