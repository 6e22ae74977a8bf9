"""Checkers for notebook 02 (the transformer's pieces): RMSNorm, RoPE, SwiGLU."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from moe_lab.course.checks.common import CheckFailed, _compare, _ok, checker
from moe_lab.model import layers


def _same_as(got, candidates: list, atol: float = 1e-5) -> str | None:
    """The message of the first (tensor, message) candidate that got equals, else None."""
    if not isinstance(got, torch.Tensor):
        return None
    for candidate, message in candidates:
        if candidate is not None and got.shape == candidate.shape and torch.allclose(got.float(), candidate, atol=atol):
            return message
    return None


def _rms(x: torch.Tensor, dim) -> torch.Tensor:
    return torch.sqrt(x.pow(2).mean(dim, keepdim=True))


@checker
def check_rmsnorm(rmsnorm: Callable) -> None:
    """rmsnorm(x, weight, eps) -> x / sqrt(mean(x^2, last dim) + eps) * weight.

    Called twice: with eps = 1e-5 on large inputs, then with eps = 0.5 on small ones, where it
    matters whether eps sits inside the square root."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 8, generator=g) * 3, torch.rand(8, generator=g) + 0.5
    eps = 1e-5
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    got = rmsnorm(x, w, eps)
    centred = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w
    mistake = _same_as(got, [
        (centred, "this is LayerNorm (it subtracts the mean); RMSNorm only divides by the root mean square"),
        (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps), "the output is not multiplied by `weight` (the learned gain)"),
        (x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w, "that divides by the root of the SUM of squares: take their mean"),
        *[(x / torch.sqrt(_rms(x, dim).pow(2) + eps) * w,
           f"the mean of squares is taken over dimension {dim} of x {tuple(x.shape)}: normalise each vector over its "
           f"last dimension (its features), mean(x**2, dim=-1, keepdim=True)") for dim in (0, 1, (0, 1, 2))],
    ])
    if mistake:
        raise CheckFailed(f"check_rmsnorm: {mistake}")
    _compare("check_rmsnorm", got, expected)
    # eps where it matters: small inputs, a large eps
    small, big_eps = torch.randn(4, 8, generator=g) * 0.3, 0.5
    expected = small / torch.sqrt(small.pow(2).mean(-1, keepdim=True) + big_eps) * w
    got = rmsnorm(small, w, big_eps)
    mistake = _same_as(got, [
        (small / (_rms(small, -1) + big_eps) * w, "eps is added outside the square root: it belongs inside, "
                                                  "x / sqrt(mean(x**2) + eps), as in the RMSNorm paper and Llama"),
        (small / _rms(small, -1) * w, "the `eps` argument is ignored (with eps=0.5 the output did not change)"),
    ])
    if mistake:
        raise CheckFailed(f"check_rmsnorm: {mistake}")
    _compare("check_rmsnorm", got, expected, what="output with eps=0.5 on small inputs")
    _ok("check_rmsnorm")


def _rotate(x1: torch.Tensor, x2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0):
    return x1 * cos - sign * x2 * sin, sign * x1 * sin + x2 * cos


@checker
def check_rope(apply_rope: Callable) -> None:
    """apply_rope(x (B, H, T, hd), cos (T, hd/2), sin (T, hd/2)) rotates interleaved pairs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 8, generator=g)
    cos, sin = layers.rope_tables(8, 10)
    got = apply_rope(x, cos, sin)
    expected = layers.apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    even, odd = x[..., 0::2], x[..., 1::2]
    first, second = x[..., :half], x[..., half:]
    interleave = lambda a, b: torch.stack((a, b), dim=-1).flatten(-2)  # noqa: E731
    mistake = _same_as(got, [
        (torch.cat(_rotate(first, second, cos, sin), -1),
         "that is the rotate-half pairing (x[i] with x[i + hd/2], as in GPT-NeoX and Hugging Face's Llama); this course "
         "rotates neighbouring pairs (x[2i], x[2i+1]): x1, x2 = x[..., 0::2], x[..., 1::2]"),
        (interleave(*_rotate(first, second, cos, sin)),
         "the pairs are (x[i], x[i + hd/2]) (the first and second halves): rotate neighbouring pairs "
         "(x[2i], x[2i+1]), x1, x2 = x[..., 0::2], x[..., 1::2]"),
        (torch.cat(_rotate(even, odd, cos, sin), -1),
         "the rotated pairs are right but concatenated ([all x1', all x2']): put them back where they came from, "
         "interleaved, torch.stack((x1', x2'), dim=-1).flatten(-2)"),
        (interleave(*_rotate(even, odd, cos, sin, sign=-1.0)),
         "it rotates by minus the angle: the pair becomes (x1*cos - x2*sin, x1*sin + x2*cos)"),
    ])
    if mistake:
        raise CheckFailed(f"check_rope: {mistake}")
    if isinstance(got, torch.Tensor) and got.shape == x.shape:
        if not torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-4):
            raise CheckFailed("check_rope: a rotation keeps every vector's length, yours changes it: check the signs "
                              "(x1*cos - x2*sin, x1*sin + x2*cos)")
    _compare("check_rope", got, expected)
    _ok("check_rope")


@checker
def check_swiglu(swiglu: Callable) -> None:
    """swiglu(x, w1, w3, w2) -> (silu(x @ w1) * (x @ w3)) @ w2, with gradients."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    w1, w3, w2 = (torch.randn(*s, generator=g) for s in [(8, 12), (8, 12), (12, 8)])
    expected = (F.silu(x @ w1) * (x @ w3)) @ w2
    got = swiglu(x, w1, w3, w2)
    if isinstance(got, torch.Tensor) and got.shape == expected.shape:
        if torch.allclose(got, (F.silu(x @ w3) * (x @ w1)) @ w2, atol=1e-5):
            raise CheckFailed("check_swiglu: w1 and w3 are swapped: the gate silu(.) applies to x @ w1")
        if torch.allclose(got, (torch.relu(x @ w1) * (x @ w3)) @ w2, atol=1e-5):
            raise CheckFailed("check_swiglu: that is ReGLU: use silu(z) = z * sigmoid(z), not relu")
    _compare("check_swiglu", got, expected)
    if not got.requires_grad:
        raise CheckFailed("check_swiglu: the output carries no gradient: did you detach or use .data / numpy?")
    _ok("check_swiglu")
