"""The data layer: tokenizer, arithmetic tasks and their verifiers, the shipped corpus, batches.

Run: .venv/bin/python -m pytest tests/data/test_data.py -q      (about 3 s on 2 CPU cores)
"""
import random
import re
import string

import pytest
import torch

from moe_lab.data import (TOKENIZER, ArithmeticTask, CharTokenizer, Mixture, Problem, TaskSource, TextSource,
                          batch_fn, load_corpus)
from moe_lab.data import corpus as corpus_mod
from moe_lab.data.tasks import pair_bucket

PRINTABLE = "".join(chr(c) for c in range(32, 127))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- tokenizer ---------------------------------------------------------------------------------
def test_vocabulary_layout():
    tok = CharTokenizer()
    assert tok.vocab_size == 99
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.newline_id) == (0, 1, 2, 3)
    assert tok.encode(" ~\n") == [4, 98, 3]
    assert tok.encode(PRINTABLE) == list(range(4, 99))


@pytest.mark.parametrize("text", ["", "def f(x):\n    return x ** 2  # ~!\n", PRINTABLE + "\n" + PRINTABLE[::-1],
                                  "23*47=1801\n"])
def test_encode_decode_round_trip(text):
    ids = TOKENIZER.encode(text)
    assert len(ids) == len(text)
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_bos_eos_and_skip_special():
    ids = TOKENIZER.encode("ab", bos=True, eos=True)
    assert ids == [1, 4 + ord("a") - 32, 4 + ord("b") - 32, 2]
    assert TOKENIZER.decode(ids) == "ab"
    assert TOKENIZER.decode(ids + [0, 0], skip_special=False) == "<bos>ab<eos><pad><pad>"


@pytest.mark.parametrize("text, bad, pos", [
    ("ab\tc", "\t", 2), ("naïve", "ï", 2), ("🙂", "🙂", 0), ("x\r\n", "\r", 1),
])
def test_encode_names_the_bad_character_and_its_position(text, bad, pos):
    with pytest.raises(ValueError) as err:
        TOKENIZER.encode(text)
    msg = str(err.value)
    assert repr(bad) in msg and f"position {pos}" in msg and "printable ASCII" in msg


@pytest.mark.parametrize("ids, bad, pos", [([5, 99], "99", 1), ([-1], "-1", 0), ([4, 1000, 5], "1000", 1)])
def test_decode_names_the_bad_id(ids, bad, pos):
    with pytest.raises(ValueError, match=rf"token id {bad} is outside .*position {pos}.*\[0, 99\)"):
        TOKENIZER.decode(ids)
    with pytest.raises(ValueError, match=rf"token id {bad} is outside"):
        TOKENIZER.decode(torch.tensor(ids))


def test_decode_refuses_a_2d_tensor():
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*1-D"):
        TOKENIZER.decode(torch.full((2, 3), 5))


# --- arithmetic tasks --------------------------------------------------------------------------
@pytest.mark.parametrize("op, reverse, prompt, answer, value", [
    ("mul", True, "23*47=", "1801", 1081),
    ("mul", False, "23*47=", "1081", 1081),
    ("add", True, "23+47=", "07", 70),
    ("add", False, "23+47=", "70", 70),
])
def test_make_writes_prompt_and_answer(op, reverse, prompt, answer, value):
    task = ArithmeticTask(op=op, n_digits=2, reverse_answer=reverse)
    p = task.make(23, 47)
    assert p == Problem(23, 47, prompt, answer, value)
    assert task.line(p) == prompt + answer + "\n"
    assert task.parse_answer(answer) == value and task.verify(answer + "\n", p)


@pytest.mark.parametrize("kwargs, field", [
    ({"op": "div"}, "op"), ({"n_digits": 0}, "n_digits"), ({"n_digits": 7}, "n_digits"),
    ({"n_digits": 2.0}, "n_digits"), ({"heldout_fraction": 0.0}, "heldout_fraction"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"), ({"heldout_fraction": "0.1"}, "heldout_fraction"),
    ({"reverse_answer": "yes"}, "reverse_answer"),
])
def test_task_validates_its_fields(kwargs, field):
    with pytest.raises(ValueError, match=rf"ArithmeticTask\.{field}=.*expected"):
        ArithmeticTask(**kwargs)


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("n_digits", [1, 2])
def test_max_answer_len_is_the_longest_answer(op, n_digits):
    task = ArithmeticTask(op=op, n_digits=n_digits)
    hi = 10**n_digits
    problems = [task.make(a, b) for a in (0, hi - 1) for b in range(hi)]
    assert task.max_answer_len == max(len(p.answer) for p in problems)
    assert task.max_line_len == max(len(task.line(p)) for p in problems)


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("reverse", [True, False])
def test_sampled_problems_are_right_and_in_range(op, reverse):
    task = ArithmeticTask(op=op, n_digits=3, reverse_answer=reverse)
    rng = random.Random(0)
    for _ in range(200):
        p = task.sample(rng)
        assert 0 <= p.a < 1000 and 0 <= p.b < 1000
        assert p.value == (p.a + p.b if op == "add" else p.a * p.b)
        assert p.prompt == f"{p.a}{'+' if op == 'add' else '*'}{p.b}="
        assert p.answer == (str(p.value)[::-1] if reverse else str(p.value))
        assert task.reward(p.answer + "\n", p) == 1.0


def test_problems_are_deterministic_for_a_seed():
    task = ArithmeticTask()
    assert task.problems(20, "heldout", seed=3) == task.problems(20, "heldout", seed=3)
    assert task.problems(20, "heldout", seed=3) != task.problems(20, "heldout", seed=4)
    assert task.problems(0) == []


def test_heldout_split_is_disjoint_and_of_the_right_size():
    task = ArithmeticTask(op="mul", n_digits=2, heldout_fraction=0.1)
    heldout = {(a, b) for a in range(100) for b in range(100) if task.is_heldout(a, b)}
    assert abs(len(heldout) / 100**2 - 0.1) < 0.015
    rng = random.Random(0)
    train_pairs = {(p.a, p.b) for p in (task.sample(rng, "train") for _ in range(3000))}
    eval_pairs = {(p.a, p.b) for p in task.problems(500, "heldout", seed=0)}
    assert not train_pairs & heldout
    assert eval_pairs <= heldout and len(eval_pairs) > 300  # many distinct held-out pairs


def test_split_is_a_fixed_hash_of_the_pair():
    """The same pairs are held out on every machine and in every run (not Python's salted hash).

    The shipped checkpoint was trained on this split: changing it would leak training problems
    into held-out evaluation.
    """
    assert pair_bucket(23, 47) == pair_bucket(23, 47) and 0 <= pair_bucket(23, 47) < 10_000
    task = ArithmeticTask(n_digits=2)
    assert [b for b in range(100) if task.is_heldout(0, b)][:7] == [7, 17, 19, 23, 35, 44, 45]
    # the split does not depend on the operation or the answer format
    other = ArithmeticTask(op="add", n_digits=3, reverse_answer=False)
    assert all(task.is_heldout(a, b) == other.is_heldout(a, b) for a in range(20) for b in range(100))


def test_sample_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"split='val'.*heldout"):
        ArithmeticTask().sample(random.Random(0), "val")


def test_make_rejects_operands_out_of_range():
    with pytest.raises(ValueError, match=r"make\(b=100\).*\[0, 100\)"):
        ArithmeticTask(n_digits=2).make(3, 100)


MUL2 = ArithmeticTask(op="mul", n_digits=2)  # 23*47 = 1081, written "1801"
P = MUL2.make(23, 47)


@pytest.mark.parametrize("completion, parsed, correct, well_formed", [
    ("1801\n", 1081, True, True),  # the right answer, reversed
    ("1801", 1081, True, False),  # right, but no stop token
    ("1801\n\n", 1081, True, False),  # right, something after the stop token
    ("1801\nxyz", 1081, True, False),
    ("1081\n", 1801, False, True),  # not reversed: a different number
    ("18010\n", None, False, False),  # longer than any product of 2-digit numbers
    ("9" * 500, None, False, False),
    ("", None, False, False),
    ("\n", None, False, False),
    ("18a1\n", None, False, False),
    (" 1801\n", None, False, False),  # int() would accept these three
    ("18_01\n", None, False, False),
    ("-1801\n", None, False, False),
    ("١٨٠١\n", None, False, False),  # Arabic-Indic digits: str.isdigit() is True
    ("¹\n", None, False, False),
    ("🙂\n", None, False, False),
    ("\x00\n", None, False, False),
    ("1801\r\n", None, False, False),
    ("0\n", 0, False, True),
])
def test_verifiers_on_any_string(completion, parsed, correct, well_formed):
    assert MUL2.parse_answer(completion) == parsed
    assert MUL2.verify(completion, P) is correct
    assert MUL2.reward(completion, P) == (1.0 if correct else 0.0)
    assert MUL2.format_ok(completion) is well_formed


@pytest.mark.parametrize("junk", [None, 1081, b"1801\n", ["1801"], 3.5])
def test_verifiers_never_raise_on_non_strings(junk):
    assert MUL2.parse_answer(junk) is None
    assert MUL2.verify(junk, P) is False and MUL2.reward(junk, P) == 0.0 and MUL2.format_ok(junk) is False


def test_verifiers_never_raise_on_random_strings():
    rng = random.Random(0)
    alphabet = string.printable + "١٢³🙂\x00é"
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        value = MUL2.parse_answer(s)
        assert value is None or 0 <= value < 10**MUL2.max_answer_len
        assert MUL2.reward(s, P) in (0.0, 1.0) and MUL2.format_ok(s) in (True, False)


def test_leading_zeros_denote_the_same_number():
    task = ArithmeticTask(op="add", n_digits=2, reverse_answer=False)
    p = task.make(3, 4)
    assert task.verify("7\n", p) and task.verify("07\n", p)
    assert MUL2.parse_answer("70") == 7  # reversed: "70" is 07


# --- corpus ------------------------------------------------------------------------------------
def test_shipped_corpus_loads_and_is_clean_ascii():
    text = load_corpus()
    assert 700_000 <= len(text) <= 1_000_000
    assert set(text) <= set(PRINTABLE + "\n")
    TOKENIZER.encode(text[:10_000])  # the tokenizer accepts it
    names = re.findall(r"^# ==== (\S+) ====$", text, flags=re.M)
    assert names == corpus_mod.STDLIB_FILES == sorted(names)  # every file, in the fixed order
    assert text.endswith("\n")


def test_load_corpus_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"name='shakespeare'.*python_stdlib"):
        load_corpus("shakespeare")


def test_clean_keeps_what_the_tokenizer_knows():
    assert corpus_mod.clean("a\tb\r\nc\x0cé~\n") == "a   b\nc~\n"


def test_build_is_cut_at_a_line_end(tmp_path):
    out = corpus_mod.build_stdlib_corpus(tmp_path / "small.txt", target_chars=5_000)
    text = out.read_text(encoding="ascii")
    assert 4_000 < len(text) <= 5_000 and text.endswith("\n")
    assert text.startswith("# ==== abc.py ====\n")


def test_missing_corpus_is_built_into_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus_mod.paths, "data_dir", lambda: tmp_path / "no_repo")
    monkeypatch.setattr(corpus_mod, "CACHE_DIR", tmp_path / "cache")
    text = load_corpus()
    assert "not found" in capsys.readouterr().out
    assert (tmp_path / "cache" / "python_stdlib.txt").read_text(encoding="ascii") == text
    assert 700_000 <= len(text) <= 1_000_000 and set(text) <= set(PRINTABLE + "\n")
    load_corpus()
    assert capsys.readouterr().out == ""  # the second time it is read from the cache


# --- batches -----------------------------------------------------------------------------------
def test_text_source_windows_and_split_by_position():
    text = "a" * 900 + "b" * 100  # the last 10% is the validation part
    src = TextSource(text)
    for split, ch in (("train", "a"), ("val", "b")):
        x, y, mask = src.sample(split, 16, 12, gen(0))
        assert x.shape == y.shape == mask.shape == (16, 12)
        assert x.dtype == y.dtype == torch.int64 and mask.dtype == torch.float32
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert all(TOKENIZER.decode(row) == ch * 12 for row in x)
        assert torch.equal(mask, torch.ones(16, 12))


def test_text_source_windows_are_consecutive_text():
    text = "".join(random.Random(0).choice(string.ascii_letters) for _ in range(2000))
    x, y, _ = TextSource(text).sample("train", 8, 32, gen(1))
    for xr, yr in zip(x, y):
        window = TOKENIZER.decode(xr) + TOKENIZER.decode(yr[-1:])
        assert window in text[:1800]


def test_text_source_refuses_text_too_short():
    src = TextSource("0123456789", val_fraction=0.5)  # train part "01234"
    x, y, _ = src.sample("train", 3, 3, gen(0))
    assert {TOKENIZER.decode(r) for r in x} <= {"012", "123"}
    with pytest.raises(ValueError, match=r"seq_len=4: the train part .* too short, 5 tokens"):
        src.sample("train", 1, 4, gen(0))


def expected_answer_mask(y_row: torch.Tensor) -> list[float]:
    """1 on answer characters and the newline ending them, found by reading the target text."""
    mask, in_answer = [], False
    for i in y_row.tolist():
        mask.append(1.0 if in_answer else 0.0)
        if i == TOKENIZER.encode("=")[0]:
            in_answer = True
        elif i == TOKENIZER.newline_id:
            in_answer = False
    return mask


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_task_rows_are_whole_problems_with_answer_only_mask(op, split):
    task = ArithmeticTask(op=op, n_digits=2)
    x, y, mask = TaskSource(task).sample(split, 6, 40, gen(0))
    assert x.shape == y.shape == mask.shape == (6, 40) and mask.dtype == torch.float32
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert (x[:, 0] == TOKENIZER.newline_id).all()  # each row starts at a problem boundary
    sym = "+" if op == "add" else "*"
    for yr, mr in zip(y, mask):
        assert mr.tolist() == expected_answer_mask(yr)
        pad = (yr == TOKENIZER.pad_id).nonzero().flatten()
        n_text = int(pad[0]) if len(pad) else len(yr)
        assert (yr[n_text:] == TOKENIZER.pad_id).all()  # padding only at the tail, after whole problems
        assert n_text + task.max_line_len > 40  # no further problem of the longest kind could have fitted
        lines = TOKENIZER.decode(yr[:n_text]).split("\n")
        assert lines[-1] == ""  # the text ends with a whole problem
        for line in lines[:-1]:
            a, b, ans = re.fullmatch(rf"(\d+)\{sym}(\d+)=(\d+)", line).groups()
            p = task.make(int(a), int(b))
            assert ans == p.answer
            assert task.is_heldout(p.a, p.b) == (split == "val")


def test_task_rows_are_deterministic_for_a_seed():
    src = TaskSource(ArithmeticTask())
    a, b, c = (src.sample("train", 4, 30, gen(seed)) for seed in (7, 7, 8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_task_source_full_loss_counts_everything_but_padding():
    x, y, mask = TaskSource(ArithmeticTask(), answer_only_loss=False).sample("train", 4, 30, gen(0))
    assert torch.equal(mask, (y != TOKENIZER.pad_id).float())
    assert (mask == 0).any()  # 30 is not a multiple of the line lengths: some padding


def test_task_source_refuses_rows_too_short_for_a_problem():
    task = ArithmeticTask(op="mul", n_digits=2)  # longest line "99*99=1089\n": 11 characters
    TaskSource(task).sample("train", 2, 11, gen(0))
    with pytest.raises(ValueError, match=r"seq_len=10: too short.*at least 11"):
        TaskSource(task).sample("train", 2, 10, gen(0))


def small_mixture() -> Mixture:
    return Mixture({"text": TextSource("x" * 500), "arith": TaskSource(ArithmeticTask())}, {"text": 1.0, "arith": 1.0})


def test_mixture_batches_are_deterministic_for_a_seed():
    a = small_mixture().sample("train", 8, 24, gen(5))
    b = small_mixture().sample("train", 8, 24, gen(5))
    c = small_mixture().sample("train", 8, 24, gen(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_mixture_rows_come_from_their_source():
    m = small_mixture()
    batch = m.sample("train", 32, 24, gen(0))
    assert m.names == ["text", "arith"] and batch.source.dtype == torch.int64 and batch.source.shape == (32,)
    x_id = TOKENIZER.encode("x")[0]
    for xr, mr, s in zip(batch.x, batch.mask, batch.source.tolist()):
        if m.names[s] == "text":
            assert (xr == x_id).all() and (mr == 1).all()
        else:
            assert xr[0] == TOKENIZER.newline_id and (mr == 0).any()


def test_mixture_proportions_follow_the_weights():
    m = Mixture({"a": TextSource("a" * 200), "b": TextSource("b" * 200), "c": TextSource("c" * 200)},
                {"a": 1.0, "b": 3.0, "c": 0.0})
    batch = m.sample("train", 4000, 4, gen(0))
    share_b = (batch.source == 1).float().mean().item()
    assert abs(share_b - 0.75) < 0.03
    assert not (batch.source == 2).any()  # weight 0: never drawn
    assert ((batch.x == TOKENIZER.encode("b")[0]).all(1) == (batch.source == 1)).all()


@pytest.mark.parametrize("weights, match", [
    ({"a": 1.0}, "one weight for each source"), ({"a": 1.0, "b": -1.0}, r"weights\['b'\]=-1.0"),
    ({"a": 0.0, "b": 0.0}, "at least one positive"),
])
def test_mixture_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        Mixture({"a": TextSource("a" * 50), "b": TextSource("b" * 50)}, weights)


@pytest.mark.parametrize("split, batch_size, seq_len, match", [
    ("test", 2, 8, "split='test'"), ("train", 0, 8, "batch_size=0"), ("train", 2, -1, "seq_len=-1"),
])
def test_sources_reject_bad_requests(split, batch_size, seq_len, match):
    with pytest.raises(ValueError, match=match):
        small_mixture().sample(split, batch_size, seq_len, gen(0))


def test_batch_fn_val_batches_do_not_disturb_training_batches():
    plain, interleaved = batch_fn(small_mixture(), 4, 24, seed=1), batch_fn(small_mixture(), 4, 24, seed=1)
    a1, a2 = plain("train"), plain("train")
    b1, _, b2 = interleaved("train"), interleaved("val"), interleaved("train")
    assert torch.equal(a1.x, b1.x) and torch.equal(a2.x, b2.x)


def test_mixed_lengths_draws_each_operand_length_equally_and_keeps_the_split():
    mixed = ArithmeticTask(op="add", n_digits=3, mixed_lengths=True)
    plain = ArithmeticTask(op="add", n_digits=3)
    rng = random.Random(0)
    problems = [mixed.sample(rng) for _ in range(3000)]
    lengths = [len(str(p.a)) for p in problems]
    for L in (1, 2, 3):
        assert abs(lengths.count(L) / len(lengths) - 1 / 3) < 0.04
    short = sum(len(str(p.a)) == 1 for p in (plain.sample(rng) for _ in range(3000)))
    assert short / 3000 < 0.03  # without mixing, one-digit operands are rare (1 %)
    for p in problems:  # the held-out split is a property of the pair, shared by both tasks
        assert not plain.is_heldout(p.a, p.b)
    held = mixed.problems(200, "heldout", seed=1)
    assert all(plain.is_heldout(p.a, p.b) for p in held)
