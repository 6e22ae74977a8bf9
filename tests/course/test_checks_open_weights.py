"""Cases for the checkers of notebook 11 (moe_lab.course.checks.open_weights), run by tests/test_checks.py's generic
tests: the right answer passes, each plausible wrong answer fails with a message naming the mistake, a stub is
"not implemented yet"."""
import re

import torch

from moe_lab.open_weights.architectures import ERNIE
from moe_lab.open_weights.mapping import hf_name
from moe_lab.open_weights.rope import to_half, to_interleaved


def names_right(name):
    return hf_name(name, ERNIE)


def names_with(wrong):
    return lambda name: wrong(name, hf_name(name, ERNIE))


def rows(hd_of_w, H, order):
    n = hd_of_w.shape[0] // H
    return hd_of_w.view(H, n, -1)[:, order(n)].reshape(hd_of_w.shape)


CASES = {
    "check_weight_names": (names_right, [
        (names_with(lambda n, w: w.removeprefix("model.")), "under 'model.'"),
        (names_with(lambda n, w: w.replace("input_layernorm", "X").replace("post_attention_layernorm", "input_layernorm")
                    .replace("X", "post_attention_layernorm")), "norm1 runs before attention"),
        (names_with(lambda n, w: w.replace("gate_proj", "up_proj") if "shared" in n else w), "w1 is the gate"),
        (names_with(lambda n, w: w.replace("moe_statics.", "gate.")), "selection bias"),
        (names_with(lambda n, w: "model.lm_head.weight" if n == "head.weight" else w), "lm_head"),
        (names_with(lambda n, w: re.sub(r"layers\.(\d+)", "blocks.\\1", w)), "model.layers.i"),
        (lambda n: None, "returned a NoneType"),
    ]),
    "check_half_rows": (lambda w, H: to_half(w, H, w.shape[0] // H), [
        (lambda w, H: w, "unchanged"),
        (lambda w, H: to_interleaved(w, H, w.shape[0] // H), "inverse permutation"),
        (lambda w, H: to_half(w, 1, w.shape[0]), "within each head"),
        (lambda w, H: rows(w, H, lambda n: torch.cat([torch.arange(1, n, 2), torch.arange(0, n, 2)])), "odd rows"),
        (lambda w, H: w[:-1], "keep every one"),
        (lambda w, H: rows(w, H, lambda n: torch.arange(n).flip(0)), "wrong row order"),
    ]),
}
