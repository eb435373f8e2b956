"""The experiment's MLP and its reference initialisation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["init_mlp"]


def init_mlp(sizes: Sequence[int], *, seed: int) -> nn.Sequential:
    """Build a ReLU MLP with weights from N(0, 1/d_in) and zero biases.

    The same ``seed`` always gives the same parameters, so a teacher and a
    student built from one seed share their initialisation.

    Args:
        sizes: Layer widths, input first, e.g. ``(784, 256, 256, 13)``.
        seed: Seed of the initialisation.

    Returns:
        ``Linear, ReLU, ..., Linear`` with parameter names ``"0.weight"``, ``"0.bias"``, ...

    Example:
        >>> net = init_mlp((784, 256, 13), seed=0)
        >>> [tuple(p.shape) for p in net.parameters()]
        [(256, 784), (256,), (13, 256), (13,)]
        >>> bool(torch.equal(net[0].weight, init_mlp((784, 256, 13), seed=0)[0].weight))
        True
    """
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {tuple(sizes)}.")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(sizes):
        linear = nn.Linear(d_in, d_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
            linear.bias.zero_()
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])
