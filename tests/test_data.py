"""Tokenizer, tasks and verifiers, corpus and batches.

Run: .venv/bin/python -m pytest tests/test_data.py -q
"""
import random

import pytest
import torch

from moe_lab.data import TOKENIZER, ArithmeticTask, Mixture, TaskSource, TextSource, batch_fn, load_corpus
from moe_lab.data.corpus import clean


def test_tokenizer_round_trip_and_layout():
    text = "def f(x):\n    return x ** 2  # ~!\n"
    ids = TOKENIZER.encode(text, bos=True, eos=True)
    assert ids[0] == TOKENIZER.bos_id and ids[-1] == TOKENIZER.eos_id
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.vocab_size == 99 and TOKENIZER.encode("\n") == [3] and TOKENIZER.encode(" ~") == [4, 98]
    assert TOKENIZER.decode(torch.tensor(ids)) == text


def test_tokenizer_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"character '\\t' at position 3"):
        TOKENIZER.encode("abc\tdef")
    with pytest.raises(ValueError, match="token id 99 is outside"):
        TOKENIZER.decode([5, 99])
    with pytest.raises(ValueError, match="token id -1"):
        TOKENIZER.decode([-1])


@pytest.mark.parametrize("op, a, b, prompt, answer", [("add", 47, 85, "47+85=", "231"), ("mul", 12, 34, "12*34=", "804")])
def test_problem_format(op, a, b, prompt, answer):
    task = ArithmeticTask(op=op, n_digits=2)
    p = task.make(a, b)
    assert (p.prompt, p.answer) == (prompt, answer)
    assert task.line(p) == prompt + answer + "\n"
    assert ArithmeticTask(op=op, n_digits=2, reverse_answer=False).make(a, b).answer == answer[::-1]


@pytest.mark.parametrize("completion, expected", [
    ("231\n", 132), ("231", 132), ("231\nextra", 132), ("", None), ("\n", None), ("23a\n", None), ("-12\n", None),
    ("9" * 50, None), ("١٢٣\n", None), ("🙂", None), (" 231\n", None),
])
def test_parse_answer_never_raises(completion, expected):
    task = ArithmeticTask(op="add", n_digits=2)
    assert task.parse_answer(completion) == expected


def test_verify_reward_and_format():
    task = ArithmeticTask(op="add", n_digits=2)
    p = task.make(47, 85)
    assert task.verify("231\n", p) and task.reward("231\n", p) == 1.0
    assert task.reward("132\n", p) == 0.0  # not reversed: wrong
    assert task.reward(None, p) == 0.0
    assert task.format_ok("999\n") and not task.format_ok("999") and not task.format_ok("12345\n")


def test_task_config_is_validated():
    with pytest.raises(ValueError, match="ArithmeticTask.op='div'"):
        ArithmeticTask(op="div")
    with pytest.raises(ValueError, match="ArithmeticTask.n_digits=0"):
        ArithmeticTask(n_digits=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ArithmeticTask(heldout_fraction=1.0)


def test_heldout_split_is_disjoint_and_sized():
    task = ArithmeticTask(op="add", n_digits=2)
    rng = random.Random(0)
    train = {(p.a, p.b) for p in (task.sample(rng) for _ in range(5000))}
    held = {(p.a, p.b) for p in task.problems(500, "heldout")}
    assert not train & held
    share = sum(task.is_heldout(a, b) for a in range(100) for b in range(100)) / 10_000
    assert abs(share - 0.1) < 0.02
    assert task.problems(5, seed=3) == task.problems(5, seed=3)


def test_corpus_is_ascii_and_sizeable():
    text = load_corpus()
    assert len(text) > 500_000
    assert all(c == "\n" or 32 <= ord(c) < 127 for c in set(text))
    assert clean("a\tb\u00e9\r\n") == "a   b\n"
    with pytest.raises(ValueError, match="expected one of"):
        load_corpus("wikipedia")


def test_text_batches_shift_and_split():
    src = TextSource("abcdefghij" * 50)
    g = torch.Generator().manual_seed(0)
    x, y, mask = src.sample("train", 4, 16, g)
    assert x.shape == y.shape == mask.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and mask.all()
    with pytest.raises(ValueError, match="too short"):
        TextSource("abc").sample("val", 1, 16, g)
    with pytest.raises(ValueError, match="split="):
        src.sample("test", 1, 4, g)


def test_task_batches_mask_exactly_the_answers():
    task = ArithmeticTask(op="add", n_digits=2)
    x, y, mask = TaskSource(task).sample("train", 6, 40, torch.Generator().manual_seed(1))
    for row in range(6):
        text = TOKENIZER.decode(y[row], skip_special=False)
        masked = "".join(c for c, m in zip(text, mask[row]) if m)
        lines = [l for l in TOKENIZER.decode(x[row]).split("\n") if l]
        # every whole problem's answer (and its newline) is masked in, nothing else
        answers = "".join(l.split("=")[1] + "\n" for l in (TOKENIZER.decode(y[row]).split("\n")[:-1]) if "=" in l)
        assert masked == answers
        assert all(task.parse_answer(l.split("=")[1]) == eval(l.split("=")[0]) for l in lines if l.count("=") and not l.endswith("="))


def test_mixture_proportions_and_determinism():
    mix = Mixture({"code": TextSource("x = 1\n" * 200), "arith": TaskSource(ArithmeticTask())}, {"code": 1, "arith": 3})
    b = mix.sample("train", 2000, 16, torch.Generator().manual_seed(0))
    assert abs((b.source == 1).float().mean().item() - 0.75) < 0.04
    f1, f2 = batch_fn(mix, 8, 16, seed=5), batch_fn(mix, 8, 16, seed=5)
    assert all(torch.equal(a, c) for a, c in zip(f1("train"), f2("train")))
    with pytest.raises(ValueError, match="Mixture weights"):
        Mixture({"a": TextSource("x" * 100)}, {"b": 1.0})
