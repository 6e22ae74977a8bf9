"""Verifiable arithmetic tasks: a generator of problems and a verifier of answers (notebooks 01, 04, 08).

A problem is one line of text, for instance with `op="mul"`:

    23*47=1801\\n        prompt "23*47=", answer "1801", then the newline that ends it

23 * 47 = 1081, yet the answer reads "1801": with `reverse_answer=True` (the default) the digits
are written least-significant first. A model writes its answer left to right, one digit per step,
and each digit may depend on a carry from the digits to its right. Written the usual way, the
first digit the model must emit depends on every carry of the whole computation; written reversed,
each digit needs only the operands and the carries already written, the order in which one adds or
multiplies on paper. Small transformers learn reversed answers far more easily (Lee et al. 2023,
"Teaching Arithmetic to Small Transformers"). The newline is the stop token: generation ends there.

Train / held-out split. Every operand pair (a, b) belongs once and for all to the training set or
the held-out set, decided by a fixed hash of the pair (CRC32 of the text "a,b", the same on every
machine and in every run; Python's built-in `hash` of a string changes with each process). A model
is evaluated on held-out pairs only, so its accuracy measures arithmetic, not memory.

Verifying. `parse_answer`, `verify`, `reward` and `format_ok` return a verdict for ANY input and
never raise: in reinforcement learning (GRPO, notebook 08) the reward is computed on whatever the
model wrote, including garbage.
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from typing import Literal, Optional

OPS = {"add": "+", "mul": "*"}  # op name -> the symbol in the prompt
SPLITS = ("train", "heldout")
HASH_BUCKETS = 10_000  # pairs are hashed into this many buckets; a split is a range of buckets


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem and its solution."""

    a: int  # first operand
    b: int  # second operand
    prompt: str  # what the model is given, e.g. "23*47="
    answer: str  # what it must write, without the newline: decimal digits, reversed if the task says so
    value: int  # the true result, e.g. 1081


def pair_bucket(a: int, b: int) -> int:
    """A bucket in [0, HASH_BUCKETS) fixed for the pair (a, b): the same on every machine and run."""
    return zlib.crc32(f"{a},{b}".encode("ascii")) % HASH_BUCKETS


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems `a op b` with operands drawn uniformly from [0, 10**n_digits).

    Attributes:
        op: "add" (a+b) or "mul" (a*b).
        n_digits: the most digits of each operand, 1..6: the difficulty knob.
        reverse_answer: write the answer least-significant digit first (see the module docstring).
        heldout_fraction: the share of operand pairs kept out of training, in (0, 1).
        mixed_lengths: draw each operand's number of digits uniformly from 1..n_digits first, so
            short and long problems are equally common (with False, almost all operands are long).
    """

    op: Literal["add", "mul"] = "mul"  # which operation
    n_digits: int = 2  # digits of each operand: 2 gives 23*47 (10,000 pairs)
    reverse_answer: bool = True  # answer digits least-significant first (carry order)
    heldout_fraction: float = 0.1  # share of operand pairs never used for training
    mixed_lengths: bool = False  # operand lengths uniform in 1..n_digits: a spread of difficulties

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"ArithmeticTask.op={self.op!r}: expected one of {tuple(OPS)}")
        if isinstance(self.n_digits, bool) or not isinstance(self.n_digits, int) or not 1 <= self.n_digits <= 6:
            raise ValueError(f"ArithmeticTask.n_digits={self.n_digits!r}: expected an integer in [1, 6]")
        if not isinstance(self.reverse_answer, bool):
            raise ValueError(f"ArithmeticTask.reverse_answer={self.reverse_answer!r}: expected True or False")
        f = self.heldout_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ValueError(f"ArithmeticTask.heldout_fraction={f!r}: expected a number strictly between 0 and 1")

    # --- generating ----------------------------------------------------------------------------
    @property
    def max_answer_len(self) -> int:
        """The most digits an answer can have: n+1 for a sum of n-digit numbers, 2n for a product."""
        return self.n_digits + 1 if self.op == "add" else 2 * self.n_digits

    @property
    def max_line_len(self) -> int:
        """The most characters of a training line: both operands, the op, "=", the answer, "\\n"."""
        return 2 * self.n_digits + 2 + self.max_answer_len + 1

    def is_heldout(self, a: int, b: int) -> bool:
        """Whether the pair (a, b) belongs to the held-out split: its bucket is in the first heldout_fraction."""
        return pair_bucket(a, b) < self.heldout_fraction * HASH_BUCKETS

    def make(self, a: int, b: int) -> Problem:
        """The problem for the operands a and b (each in [0, 10**n_digits))."""
        for name, x in (("a", a), ("b", b)):
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 10**self.n_digits:
                raise ValueError(f"make({name}={x!r}): expected an integer in [0, {10**self.n_digits})")
        value = a + b if self.op == "add" else a * b
        digits = str(value)
        answer = digits[::-1] if self.reverse_answer else digits
        return Problem(a, b, f"{a}{OPS[self.op]}{b}=", answer, value)

    def sample(self, rng: random.Random, split: str = "train") -> Problem:
        """A random problem of a split, drawn uniformly from its operand pairs.

        Rejection sampling: draw a pair uniformly, keep it if it is in the split. A split holds a
        share p of the pairs, so this takes 1/p draws on average; after 50/p draws (a chance of
        about e^-50 if the split is not empty) the split is taken to be empty.
        """
        if split not in SPLITS:
            raise ValueError(f"sample(split={split!r}): expected one of {SPLITS}")
        want_heldout = split == "heldout"
        share = self.heldout_fraction if want_heldout else 1 - self.heldout_fraction
        hi = 10**self.n_digits
        for _ in range(math.ceil(50 / share)):
            a, b = (self._operand(rng), self._operand(rng)) if self.mixed_lengths else (rng.randrange(hi), rng.randrange(hi))
            if self.is_heldout(a, b) == want_heldout:
                return self.make(a, b)
        raise RuntimeError(f"no {split} pair found for {self}: its {hi}x{hi} operand pairs hold too few "
                           f"{split} pairs (change heldout_fraction or n_digits)")

    def _operand(self, rng: random.Random) -> int:
        """An operand whose number of digits is uniform in 1..n_digits (0-9 count as one digit)."""
        length = rng.randint(1, self.n_digits)
        return rng.randrange(0 if length == 1 else 10 ** (length - 1), 10**length)

    def problems(self, n: int, split: str = "heldout", seed: int = 0) -> list[Problem]:
        """n problems of a split, the same for the same seed: an evaluation set."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"problems(n={n!r}): expected a non-negative integer")
        rng = random.Random(seed)
        return [self.sample(rng, split) for _ in range(n)]

    def line(self, problem: Problem) -> str:
        """The training text of a problem: prompt, answer, newline."""
        return problem.prompt + problem.answer + "\n"

    # --- verifying (never raises) --------------------------------------------------------------
    def parse_answer(self, completion: str) -> Optional[int]:
        """The integer a completion denotes, or None if it is not a well-formed answer.

        Reads the text up to the first newline (or all of it). None if that text is empty, has a
        character other than 0-9, or is longer than `max_answer_len`. With `reverse_answer` the
        digits are read least-significant first ("1801" -> 1081). Leading zeros are allowed: the
        value is what counts ("07" denotes 7, or 70 reversed).
        """
        if not isinstance(completion, str):
            return None
        text = completion.split("\n", 1)[0]
        if not text or len(text) > self.max_answer_len or any(c not in "0123456789" for c in text):
            return None  # note: str.isdigit() would accept "³" or "٣"; int() would accept " 12" and "1_2"
        return int(text[::-1] if self.reverse_answer else text)

    def verify(self, completion: str, problem: Problem) -> bool:
        """Whether the completion's answer (up to the first newline) equals the problem's value."""
        value = self.parse_answer(completion)
        return value is not None and value == getattr(problem, "value", None)

    def reward(self, completion: str, problem: Problem) -> float:
        """The verifiable reward of GRPO: 1.0 for a correct answer, else 0.0."""
        return 1.0 if self.verify(completion, problem) else 0.0

    def format_ok(self, completion: str) -> bool:
        """Whether the completion has the answer's shape: 1..max_answer_len digits, then "\\n", nothing after."""
        if not isinstance(completion, str) or not completion.endswith("\n") or completion.count("\n") != 1:
            return False
        return self.parse_answer(completion) is not None
