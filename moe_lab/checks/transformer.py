"""Checkers for notebook 02 (the transformer's pieces): RMSNorm, RoPE, SwiGLU."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from moe_lab.checks.common import CheckFailed, _compare, _ok, checker
from moe_lab.model import layers


@checker
def check_rmsnorm(rmsnorm: Callable) -> None:
    """rmsnorm(x, weight, eps) -> x / sqrt(mean(x^2, last dim) + eps) * weight."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 8, generator=g) * 3, torch.rand(8, generator=g) + 0.5
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    got = rmsnorm(x, w, 1e-5)
    if isinstance(got, torch.Tensor) and got.shape == x.shape:
        centred = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * w
        if torch.allclose(got, centred, atol=1e-5):
            raise CheckFailed("check_rmsnorm: this is LayerNorm (it subtracts the mean); RMSNorm only divides by the root mean square")
    _compare("check_rmsnorm", got, expected)
    _ok("check_rmsnorm")


@checker
def check_rope(apply_rope: Callable) -> None:
    """apply_rope(x (B, H, T, hd), cos (T, hd/2), sin (T, hd/2)) rotates interleaved pairs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 8, generator=g)
    cos, sin = layers.rope_tables(8, 10)
    got = apply_rope(x, cos, sin)
    expected = layers.apply_rope(x, cos, sin)
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
