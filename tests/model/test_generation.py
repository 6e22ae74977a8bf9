"""The KV cache and multi-head latent attention (notebook 10): cached generation computes the same
function as re-running the prefix, MLA's absorbed form equals its plain form, the cache holds what
each attention says it holds, and the capacity limit of MoE layers does not act at inference.

Run: .venv/bin/python -m pytest tests/model/test_generation.py -q
"""
import pytest
import torch

from moe_lab.training.checkpoint import shipped_checkpoint
from moe_lab.core.config import ModelConfig, MoEConfig, preset
from moe_lab.data import course_task
from moe_lab.data.tokenizer import TOKENIZER
from moe_lab.model import Transformer
from moe_lab.model.kv_cache import (DEEPSEEK_V3, KVCache, LayerCache, cache_bytes_per_token, cache_table,
                                    sizes_of)
from moe_lab.model.layers import CausalSelfAttention, causal_mask
from moe_lab.model.mla import MultiHeadLatentAttention

CHECKPOINT = shipped_checkpoint("moe_cpu")  # data/checkpoints/moe_cpu.safetensors; None where absent
TOL = dict(atol=1e-5, rtol=1e-5)  # float32: cached and uncached logits agree to this


def small_cfg(attention="mha", ffn="moe", **kw):
    moe = kw.pop("moe", MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared=1))
    base = dict(vocab_size=30, d_model=32, n_layers=2, n_heads=4, max_seq_len=24, d_ff=48, ffn=ffn, moe=moe,
                attention=attention)
    if attention == "mla":
        base.update(kv_rank=12, rope_dim=4)
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg, seed=0, std=0.3):
    """A random model with weights large enough that its greedy tokens vary (std 0.02 would be near uniform)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model


VARIANTS = [("mha", "dense", None), ("mha", "moe", None), ("mla", "dense", None), ("mla", "moe", None),
            ("mla", "moe", 10)]
variant_ids = [f"{a}-{f}" + (f"-q{q}" if q else "") for a, f, q in VARIANTS]


# --- the cache computes the same function -------------------------------------------------------
@pytest.mark.parametrize("attention, ffn, q_rank", VARIANTS, ids=variant_ids)
def test_cached_greedy_generation_equals_uncached(attention, ffn, q_rank):
    model = random_model(small_cfg(attention, ffn, q_rank=q_rank))
    prompt = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(1))
    a, la = model.generate(prompt, 12, temperature=0, use_cache=False, return_logits=True)
    b, lb = model.generate(prompt, 12, temperature=0, use_cache=True, return_logits=True)
    assert torch.equal(a, b)
    assert la.shape == (3, 12, 30)
    torch.testing.assert_close(lb, la, **TOL)
    assert len(set(a[:, 5:].flatten().tolist())) > 3  # the test means something: the tokens vary


@pytest.mark.parametrize("attention, ffn, q_rank", VARIANTS, ids=variant_ids)
def test_prefill_then_one_token_at_a_time_equals_one_forward(attention, ffn, q_rank):
    """Logits of every position, fed in chunks of 7, 1, 1, 4, 1 tokens through the cache, equal one full forward."""
    model = random_model(small_cfg(attention, ffn, q_rank=q_rank), seed=2)
    x = torch.randint(0, 30, (2, 14), generator=torch.Generator().manual_seed(3))
    full, _ = model(x)
    cache = model.new_cache()
    chunks, start = [], 0
    for n in (7, 1, 1, 4, 1):  # a prefill, decode steps, and a chunk after a cache (offset causal mask)
        chunks.append(model(x[:, start:start + n], cache=cache)[0])
        start += n
        assert cache.length == start
    torch.testing.assert_close(torch.cat(chunks, 1), full, **TOL)


def test_sampled_generation_with_repeats_equals_uncached():
    """G samples per prompt sharing one prefill draw the same tokens as the uncached path from the same generator."""
    model = random_model(small_cfg(), seed=4)
    prompt = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(5))
    runs = []
    for use_cache in (False, True):
        g = torch.Generator().manual_seed(9)
        runs.append(model.generate(prompt, 10, temperature=1.0, top_k=10, use_cache=use_cache, repeats=4, generator=g))
    assert runs[0].shape == (8, 14) and torch.equal(runs[0], runs[1])
    assert torch.equal(runs[1][:4, :4], prompt[0].expand(4, 4))  # rows i*repeats + j continue prompt i
    assert len({tuple(r) for r in runs[1][:4].tolist()}) > 1  # the samples of one prompt differ


def test_generation_past_max_seq_len_continues_without_the_cache():
    model = random_model(small_cfg(max_seq_len=16), seed=6)
    prompt = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(7))
    a, la = model.generate(prompt, 20, temperature=0, use_cache=False, return_logits=True)
    b, lb = model.generate(prompt, 20, temperature=0, use_cache=True, return_logits=True)
    assert a.shape == (2, 30) and torch.equal(a, b)
    torch.testing.assert_close(lb, la, **TOL)


def test_stop_token_and_mode_are_kept():
    model = random_model(small_cfg(), seed=8)
    model.train()
    prompt = torch.randint(0, 30, (3, 4), generator=torch.Generator().manual_seed(1))
    a = model.generate(prompt, 8, temperature=0, use_cache=False)
    stop = int(a[0, 4])
    b = model.generate(prompt, 8, temperature=0, stop_token=stop)
    c = model.generate(prompt, 8, temperature=0, stop_token=stop, use_cache=False)
    assert torch.equal(b, c) and (b[0, 4:] == stop).all()
    assert model.training  # generate ran in eval mode and restored the training mode
    with pytest.raises(ValueError, match="repeats=0"):
        model.generate(prompt, 2, repeats=0)


def test_shipped_checkpoint_generates_the_same_with_and_without_cache():
    """The course model on the task notebook 08 trains on, grouped by prompt length as evaluation does."""
    if CHECKPOINT is None:
        pytest.skip("no shipped checkpoint in data/checkpoints/")
    from moe_lab.training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(CHECKPOINT)
    task = course_task()
    problems = [p for p in task.problems(64, "heldout", seed=3) if len(p.prompt) == 8][:24]
    prompts = torch.tensor([[TOKENIZER.newline_id] + TOKENIZER.encode(p.prompt) for p in problems])
    a, la = model.generate(prompts, 6, temperature=0, use_cache=False, return_logits=True)
    b, lb = model.generate(prompts, 6, temperature=0, use_cache=True, return_logits=True)
    assert torch.equal(a, b)
    # float32: equal up to rounding. The matmuls of a decode step have other shapes than the full
    # forward's, so their sums round differently; this trained model amplifies that to a few 1e-5 on
    # logits of size ~15, as large as float32's own error (each path differs from float64 by ~3e-5).
    # So the float32 bound is 1e-5 of the logits' scale, and the exact comparison is made in float64.
    assert (lb - la).abs().max() <= 1e-5 * la.abs().max()
    model64 = model.double()
    c, lc = model64.generate(prompts, 6, temperature=0, use_cache=False, return_logits=True)
    d, ld = model64.generate(prompts, 6, temperature=0, use_cache=True, return_logits=True)
    assert torch.equal(c, a) and torch.equal(d, a)
    torch.testing.assert_close(ld, lc, atol=1e-12, rtol=1e-12)
    assert (lb.double() - lc).abs().max() <= 2 * (la.double() - lc).abs().max()  # the cache adds no error of its own
    model.float()
    from moe_lab.training.evaluation import generate_completions

    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    mixed = task.problems(40, "train", seed=11)  # several prompt lengths: several groups
    assert len({len(p.prompt) for p in mixed}) > 1
    assert generate_completions(model, mixed, 4, 0.7, generator=g1, use_cache=False) == \
        generate_completions(model, mixed, 4, 0.7, generator=g2, use_cache=True)


# --- RoPE offsets and the mask --------------------------------------------------------------------
def test_decode_step_caches_keys_rotated_at_their_own_position():
    """The RoPE offset: a token decoded after 8 cached ones is rotated as position 8, not 0."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, 32)
    x = torch.randn(1, 9, 16)
    all_at_once = LayerCache(32)
    attn(x, all_at_once)
    stepwise = LayerCache(32)
    attn(x[:, :8], stepwise)
    y = attn(x[:, 8:], stepwise)
    torch.testing.assert_close(stepwise.buffers["k"][..., :9, :], all_at_once.buffers["k"][..., :9, :])
    torch.testing.assert_close(y, attn(x)[:, 8:], **TOL)
    at_zero = LayerCache(32)
    attn(x[:, 8:], at_zero)  # the same token as if it came first
    assert not torch.allclose(at_zero.buffers["k"][..., 0, :], all_at_once.buffers["k"][..., 8, :], atol=1e-3)


def test_causal_mask_offset():
    m = causal_mask(3, 2)
    assert m.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]


def test_cache_refuses_overflow_and_wrong_shapes():
    c = LayerCache(4)
    c.append(k=torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="exceed its capacity 4"):
        c.append(k=torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="shape"):
        c.append(k=torch.zeros(1, 3, 1, 8))
    model = random_model(small_cfg(max_seq_len=8))
    cache = model.new_cache()
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# --- what the cache holds ----------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_cache_holds_what_the_attention_says(attention):
    cfg = small_cfg(attention)
    model = random_model(cfg)
    cache = model.new_cache()
    model(torch.randint(0, 30, (3, 10)), cache=cache)
    layer = cache.layers[0]
    hd = cfg.d_model // cfg.n_heads
    if attention == "mha":
        assert set(layer.buffers) == {"k", "v"}
        assert layer.buffers["k"][..., :10, :].shape == (3, cfg.n_heads, 10, hd)
    else:  # only the latent and the shared RoPE key: no per-head keys or values
        assert set(layer.buffers) == {"c_kv", "k_rope"}
        assert layer.buffers["c_kv"][:, :10].shape == (3, 10, cfg.kv_rank)
        assert layer.buffers["k_rope"][:, :10].shape == (3, 10, cfg.rope_dim)
    measured = cache.bytes_per_token()
    expected = cache_bytes_per_token(attention, cfg.n_layers, cfg.n_heads, hd, 4, kv_rank=cfg.kv_rank,
                                     rope_dim=cfg.rope_dim)
    assert measured == expected


def test_cache_bytes_by_hand_and_deepseek_v3():
    assert cache_bytes_per_token("mha", 2, 4, 16, 4) == 2 * 4 * 2 * 4 * 16  # layers * bytes * (k + v) * heads * hd
    assert cache_bytes_per_token("gqa", 2, 4, 16, 4, n_kv_heads=2) == 2 * 4 * 2 * 2 * 16
    assert cache_bytes_per_token("mqa", 2, 4, 16, 4) == 2 * 4 * 2 * 16
    assert cache_bytes_per_token("mla", 2, 4, 16, 4, kv_rank=32, rope_dim=8) == 2 * 4 * (32 + 8)
    rows = {r["kind"]: r for r in cache_table(DEEPSEEK_V3)}
    assert rows["mla"]["bytes_per_token"] == 61 * 2 * 576  # 70,272 bytes: about 69 KiB per token
    assert rows["mha"]["bytes_per_token"] == 61 * 2 * 2 * 128 * 128  # 4 MB per token
    assert rows["mla"]["vs_mha"] == pytest.approx(576 / 32768)
    course = cache_table(sizes_of(preset("cpu").moe))
    assert [r["kind"] for r in course] == ["mha", "gqa", "mqa", "mla"]
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        cache_bytes_per_token("gqa", 2, 4, 16, n_kv_heads=3)
    with pytest.raises(ValueError, match="kind='xla'"):
        cache_bytes_per_token("xla", 2, 4, 16)


# --- MLA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_rank", [None, 6])
def test_mla_absorbed_form_equals_plain_form(q_rank):
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(32, 4, 24, kv_rank=10, rope_dim=4, q_rank=q_rank).double()
    for p in mla.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 11, 32, dtype=torch.double)
    plain = mla(x)
    mla.absorb = True
    absorbed = mla(x)
    torch.testing.assert_close(absorbed, plain, atol=1e-10, rtol=1e-10)
    cache = LayerCache(24)  # and through the cache, chunk by chunk
    got = torch.cat([mla(x[:, :6], cache), mla(x[:, 6:7], cache), mla(x[:, 7:], cache)], 1)
    torch.testing.assert_close(got, plain, atol=1e-10, rtol=1e-10)


def mla_by_the_formulas(mla, x):
    """MLA written head by head from DeepSeek-V2's equations (9)-(19), without the module's code paths."""
    B, T, _ = x.shape
    H, hd, dr = mla.n_heads, mla.head_dim, mla.rope_dim
    cos, sin = mla.cos[:T], mla.sin[:T]
    from moe_lab.model.layers import apply_rope

    c_kv = mla.kv_norm(x @ mla.w_dkv.weight.T)  # (B, T, d_c)
    k_r = apply_rope((x @ mla.w_kr.weight.T)[:, None], cos, sin)[:, 0]  # (B, T, d_r), shared
    q_in = mla.q_norm(x @ mla.w_dq.weight.T) if mla.q_rank else x
    q_all = q_in @ mla.q_proj.weight.T  # (B, T, H * (hd + dr))
    outs = []
    for h in range(H):
        qh = q_all[..., h * (hd + dr):(h + 1) * (hd + dr)]
        q_c, q_r = qh[..., :hd], apply_rope(qh[..., hd:][:, None], cos, sin)[:, 0]
        k_c = c_kv @ mla.w_uk.weight[h * hd:(h + 1) * hd].T  # (B, T, hd)
        v = c_kv @ mla.w_uv.weight[h * hd:(h + 1) * hd].T
        scores = (q_c @ k_c.transpose(1, 2) + q_r @ k_r.transpose(1, 2)) / (hd + dr) ** 0.5
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        outs.append(scores.softmax(-1) @ v)
    return torch.cat(outs, -1) @ mla.w_o.weight.T


@pytest.mark.parametrize("q_rank", [None, 6])
def test_mla_matches_the_papers_equations(q_rank):
    """Per-head scores (q_C.k_C + q_R.k_R) / sqrt(hd + d_r), keys and values from the normalised latent."""
    torch.manual_seed(1)
    mla = MultiHeadLatentAttention(32, 4, 24, kv_rank=10, rope_dim=4, q_rank=q_rank).double()
    for p in mla.parameters():
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 else 0.0, 0.3)  # norm gains away from 1 too
    x = torch.randn(2, 9, 32, dtype=torch.double)
    torch.testing.assert_close(mla(x), mla_by_the_formulas(mla, x), atol=1e-10, rtol=1e-10)
    assert mla.scale == pytest.approx((8 + 4) ** -0.5)


def test_mla_depends_on_relative_positions_only():
    torch.manual_seed(2)
    mla = MultiHeadLatentAttention(32, 4, 24, kv_rank=10, rope_dim=4)
    x = torch.randn(1, 6, 32)
    shifted = MultiHeadLatentAttention(32, 4, 24, kv_rank=10, rope_dim=4)
    shifted.load_state_dict(mla.state_dict())
    shifted.cos, shifted.sin = mla.cos[3:].clone(), mla.sin[3:].clone()  # every token 3 positions later
    torch.testing.assert_close(shifted(x), mla(x), **TOL)
    reversed_pos = MultiHeadLatentAttention(32, 4, 24, kv_rank=10, rope_dim=4)
    reversed_pos.load_state_dict(mla.state_dict())
    reversed_pos.cos, reversed_pos.sin = mla.cos.flip(0)[-6:].clone(), mla.sin.flip(0)[-6:].clone()
    assert not torch.allclose(reversed_pos(x), mla(x), atol=1e-4)  # position does reach the scores


def test_mla_config_fields_validate_and_old_configs_load():
    with pytest.raises(ValueError, match=r"ModelConfig\.attention="):
        ModelConfig(attention="gqa")
    with pytest.raises(ValueError, match=r"ModelConfig\.rope_dim="):
        ModelConfig(attention="mla", rope_dim=5)
    with pytest.raises(ValueError, match=r"ModelConfig\.kv_rank="):
        ModelConfig(attention="mla", kv_rank=0)
    with pytest.raises(ValueError, match=r"ModelConfig\.q_rank="):
        ModelConfig(attention="mla", q_rank=-2)
    old = small_cfg().to_dict()
    for name in ("attention", "kv_rank", "q_rank", "rope_dim"):  # a checkpoint saved before MLA existed
        old.pop(name)
    cfg = ModelConfig.from_dict(old)
    assert cfg.attention == "mha" and cfg == small_cfg()


def test_old_checkpoint_loads(tmp_path):
    """A checkpoint whose saved config predates the attention fields (the .pt format of the time) loads
    as MHA with the same weights; so does the shipped one, saved before notebook 10 existed."""
    import json

    from moe_lab.training.checkpoint import LEGACY_FORMAT, load_checkpoint

    model = random_model(small_cfg())
    cfg = model.cfg.to_dict()
    for name in ("attention", "kv_rank", "q_rank", "rope_dim"):
        cfg.pop(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"format": LEGACY_FORMAT, "config": json.dumps(cfg), "extra": "{}", "model": state}, tmp_path / "m.pt")
    loaded, _ = load_checkpoint(tmp_path / "m.pt", expected=small_cfg())
    x = torch.randint(0, 30, (2, 6))
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    if CHECKPOINT is not None:
        from moe_lab.training.checkpoint import read_checkpoint

        assert read_checkpoint(CHECKPOINT)[0].attention == "mha"


# --- MoE capacity at inference --------------------------------------------------------------------
def test_capacity_limit_acts_in_training_only():
    """With a capacity factor, training drops assignments; eval (and so generation) drops none, so the
    cached and uncached paths agree and a row's output does not depend on the rest of its batch."""
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=16, capacity_factor=0.5)
    model = random_model(small_cfg(moe=moe), seed=3)
    x = torch.randint(0, 30, (4, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    train_logits = model(x)[0]
    assert sum(s.dropped for s in model.routing_stats()) > 0  # the limit acts in training
    model.eval()
    eval_logits = model(x)[0]
    assert sum(s.dropped for s in model.routing_stats()) == 0  # and not at inference
    assert not torch.allclose(train_logits, eval_logits, atol=1e-4)
    dropless = random_model(small_cfg(moe=MoEConfig(n_experts=4, top_k=2, d_expert=16)), seed=3).eval()
    torch.testing.assert_close(eval_logits, dropless(x)[0])  # eval = the dropless model
    torch.testing.assert_close(model(x[:1])[0], eval_logits[:1])  # row 0 alone = row 0 in its batch
    prompt = x[:, :4]
    a, la = model.generate(prompt, 8, temperature=0, use_cache=False, return_logits=True)
    b, lb = model.generate(prompt, 8, temperature=0, use_cache=True, return_logits=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(lb, la, **TOL)
