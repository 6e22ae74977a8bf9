"""The course's character tokenizer as a Hugging Face `tokenizers` tokenizer (tokenizer.json).

`moe_lab.data.tokenizer.TOKENIZER` gives one id per character from a fixed vocabulary of 99
(<pad> <bos> <eos>, "\\n", then " " .. "~"). The same vocabulary becomes a `tokenizers` WordLevel
model whose pre-tokenizer splits the text into single characters, with a decoder that fuses the
pieces back without separators. `AutoTokenizer.from_pretrained(DIR)` then loads it as a fast
tokenizer that encodes and decodes every course string exactly as moe_lab does:

    * no <bos> is added (moe_lab's prompts start with a newline, never with <bos>);
    * <pad>, <bos>, <eos> are special tokens (dropped by decode(skip_special_tokens=True));
    * a character outside the vocabulary is an error, as in moe_lab (the WordLevel model's unknown
      token, "<unk>", is deliberately not in the vocabulary, so `tokenizers` refuses the text).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from moe_lab.data.tokenizer import SPECIALS, TOKENIZER

UNKNOWN = "<unk>"  # named as the WordLevel model's unknown token but absent from the vocabulary: unknown text fails


def course_vocab() -> dict[str, int]:
    """{token: id} of the course's tokenizer: the specials, then one entry per character."""
    return {s: i for i, s in enumerate(TOKENIZER.itos)}


def build_tokenizer():
    """The course's tokenizer as a `tokenizers.Tokenizer` (needs the `tokenizers` package)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=course_vocab(), unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # join the characters back with nothing between them
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def hf_tokenizer():
    """The course's tokenizer as a transformers fast tokenizer (pad, bos and eos named)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], clean_up_tokenization_spaces=False)


def save_tokenizer(directory: Union[str, Path]) -> list[str]:
    """Write tokenizer.json (and transformers' tokenizer_config.json) into directory; returns the files written."""
    return [Path(p).name for p in hf_tokenizer().save_pretrained(str(directory))]
