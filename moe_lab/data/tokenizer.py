"""A character-level tokenizer with a fixed vocabulary (notebook 01).

A tokenizer turns text into integer ids, the model's only input, and back. The course uses the
simplest one there is: one id per character, from a vocabulary fixed in advance.

    id  0      <pad>    fills the unused tail of a row (the loss ignores it)
    id  1      <bos>    "beginning of sequence" (optional)
    id  2      <eos>    "end of sequence" (optional)
    id  3      "\\n"     newline: ends every line of code and every arithmetic answer
    ids 4..98  " " (chr 32) .. "~" (chr 126): printable ASCII, in code-point order

99 ids in all. Characters keep everything visible to the learner: every digit of an arithmetic
problem is one token (a BPE tokenizer, as in GPT-2, would merge "347" into one or two tokens of
arbitrary shape, which makes arithmetic harder to learn), and any id can be read back by eye.
Text with other characters (tabs, accents, emoji) is refused with an error saying where.
"""
from __future__ import annotations

import numbers
from typing import Sequence, Union

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2: tokens that are not characters
FIRST_PRINTABLE, LAST_PRINTABLE = 32, 126  # " " and "~": the printable ASCII range


class CharTokenizer:
    """encode(text) -> list of ids; decode(ids) -> text.

    Attributes:
        vocab_size: number of ids (99); the model's embedding table has this many rows.
        pad_id, bos_id, eos_id: the special ids 0, 1, 2.
        newline_id: the id of "\\n" (3), the stop token of arithmetic answers.
        itos: id -> string ("id to string"), the special names for ids 0..2.
        stoi: character -> id ("string to id"), characters only (no specials).
    """

    def __init__(self):
        self.itos = list(SPECIALS) + ["\n"] + [chr(c) for c in range(FIRST_PRINTABLE, LAST_PRINTABLE + 1)]
        self.stoi = {ch: i for i, ch in enumerate(self.itos) if i >= len(SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.newline_id = self.stoi["\n"]
        self.vocab_size = len(self.itos)  # 3 specials + newline + 95 printable characters = 99

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The ids of the characters of `text`, with <bos> first / <eos> last if asked.

        Raises ValueError naming the first character outside the vocabulary and its position.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode(text=...): expected a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for pos, ch in enumerate(text):
            i = self.stoi.get(ch)
            if i is None:
                raise ValueError(f"encode: character {ch!r} at position {pos} is not in the vocabulary: expected "
                                 f"printable ASCII (chr(32)..chr(126)) or '\\n' (clean the text first: expand tabs, "
                                 f"drop other characters)")
            ids.append(i)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special: bool = True) -> str:
        """The text of a list (or 1-D tensor) of ids. Specials are dropped, or shown as "<pad>" etc.

        Raises ValueError for an id outside [0, vocab_size), naming it and its position.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode(ids=tensor of shape {tuple(ids.shape)}): expected a 1-D tensor "
                                 f"(decode one row at a time: ids[i])")
            ids = ids.tolist()
        out = []
        for pos, i in enumerate(ids):
            if not isinstance(i, numbers.Integral) or not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: token id {i!r} is outside the vocabulary (at position {pos}): "
                                 f"expected an integer in [0, {self.vocab_size})")
            if i < len(SPECIALS) and skip_special:
                continue
            out.append(self.itos[int(i)])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


TOKENIZER = CharTokenizer()  # the course's one tokenizer: import this rather than building another
