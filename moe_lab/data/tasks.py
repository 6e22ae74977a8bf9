"""Verifiable arithmetic tasks: a generator of problems and a verifier of answers (notebooks 01, 04, 08).

A problem is a line such as `347+85=234\n`: the prompt `347+85=`, then the answer. With
`reverse_answer` (the default) the answer's digits are written least-significant first (432 is
written "234"): the model then produces digits in the order the carries are computed, the way one
adds on paper, which small transformers learn far more easily (Lee et al. 2023, "Teaching
arithmetic to small transformers"). The newline ends the answer and is the stop token.

Operand pairs are split once and for all into train and held-out sets by a fixed hash, so a model
is always evaluated on problems it never saw. Verifiers never raise: any string gets a verdict,
which is what a reinforcement-learning reward (notebook 08) needs.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Literal, Optional

OPS = {"add": "+", "mul": "*"}


@dataclass(frozen=True)
class Problem:
    a: int  # first operand
    b: int  # second operand
    prompt: str  # what the model sees, e.g. "347+85="
    answer: str  # what it must write (digits, reversed if the task says so), without the newline
    value: int  # the true result


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems `a op b` with operands uniform in [0, 10**n_digits)."""

    op: Literal["add", "mul"] = "add"  # which operation
    n_digits: int = 3  # digits of each operand (difficulty knob)
    reverse_answer: bool = True  # write the answer least-significant digit first
    heldout_fraction: float = 0.1  # share of operand pairs never used for training

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"ArithmeticTask.op={self.op!r}: expected one of {tuple(OPS)}")
        if not isinstance(self.n_digits, int) or not 1 <= self.n_digits <= 6:
            raise ValueError(f"ArithmeticTask.n_digits={self.n_digits!r}: expected an integer in [1, 6]")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"ArithmeticTask.heldout_fraction={self.heldout_fraction!r}: expected a number in (0, 1)")

    # --- generating ----------------------------------------------------------------------------
    @property
    def max_answer_len(self) -> int:
        return self.n_digits + 1 if self.op == "add" else 2 * self.n_digits

    def is_heldout(self, a: int, b: int) -> bool:
        """Fixed split by a CRC32 hash of the pair (stable across machines and Python runs)."""
        h = zlib.crc32(f"{a},{b}".encode()) % 10_000
        return h < self.heldout_fraction * 10_000

    def make(self, a: int, b: int) -> Problem:
        value = a + b if self.op == "add" else a * b
        digits = str(value)
        return Problem(a, b, f"{a}{OPS[self.op]}{b}=", digits[::-1] if self.reverse_answer else digits, value)

    def sample(self, rng: random.Random, split: str = "train") -> Problem:
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
        hi = 10**self.n_digits
        while True:
            a, b = rng.randrange(hi), rng.randrange(hi)
            if self.is_heldout(a, b) == (split == "heldout"):
                return self.make(a, b)

    def problems(self, n: int, split: str = "heldout", seed: int = 0) -> list[Problem]:
        """n problems of a split, the same for the same seed (evaluation sets)."""
        rng = random.Random(seed)
        return [self.sample(rng, split) for _ in range(n)]

    def line(self, problem: Problem) -> str:
        """The training text of a problem: prompt, answer, newline."""
        return problem.prompt + problem.answer + "\n"

    # --- verifying (never raises) --------------------------------------------------------------
    def parse_answer(self, completion: str) -> Optional[int]:
        """The integer a completion denotes (text up to the first newline), or None if malformed."""
        if not isinstance(completion, str):
            return None
        text = completion.split("\n", 1)[0]
        if not text or len(text) > self.max_answer_len or not all("0" <= c <= "9" for c in text):
            return None
        return int(text[::-1] if self.reverse_answer else text)

    def verify(self, completion: str, problem: Problem) -> bool:
        return self.parse_answer(completion) == problem.value

    def reward(self, completion: str, problem: Problem) -> float:
        """1.0 for the exact answer, else 0.0."""
        return 1.0 if self.verify(completion, problem) else 0.0

    def format_ok(self, completion: str) -> bool:
        """Digits only, at most max_answer_len of them, ended by a newline."""
        if not isinstance(completion, str) or "\n" not in completion:
            return False
        return self.parse_answer(completion) is not None
