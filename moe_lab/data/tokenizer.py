"""A character-level tokenizer with a fixed vocabulary (notebook 01).

Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 newline, then printable ASCII ' ' (32) .. '~' (126) as 4..98:
99 tokens in all. Characters are the simplest tokens: every number, operator and identifier is
visible to the learner, and arithmetic digits stay one token each (BPE would merge them).
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>")


class CharTokenizer:
    """encode(text) -> list of ids; decode(ids) -> text. Unknown characters raise a clear error."""

    def __init__(self):
        self.itos = list(SPECIALS) + ["\n"] + [chr(c) for c in range(32, 127)]
        self.stoi = {s: i for i, s in enumerate(self.itos) if i >= len(SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.newline_id = self.stoi["\n"]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for pos, ch in enumerate(text):
            i = self.stoi.get(ch)
            if i is None:
                raise ValueError(f"encode: character {ch!r} at position {pos} is not in the vocabulary: expected "
                                 f"printable ASCII or a newline (clean the text first, e.g. expandtabs())")
            ids.append(i)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Union[Iterable[int], torch.Tensor], skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i < len(SPECIALS) and skip_special:
                continue
            out.append(self.itos[i])
        return "".join(out)


TOKENIZER = CharTokenizer()
