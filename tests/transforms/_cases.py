"""Every transform under test, described once, and random float64 problems for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from hypothesis import strategies as st
from torch import Tensor

from gradlens.alignment.gradops import group_by_layer
from gradlens.transforms import (
    GradientTransform,
    Scope,
    chain,
    conditionally_transform,
    identity,
    remove_aligned,
    remove_aligned_per_example,
    remove_random,
    reverse_aligned,
    reverse_aligned_per_example,
    scale_aligned,
    scale_aligned_per_example,
    steps_between,
)


@dataclass(frozen=True)
class Case:
    """A transform and what it should do: scale the aligned part by ``alpha``.

    ``per_example`` transforms scale each example's own component (``mean_i f(c_i)``),
    the others the component of the mean gradient (``f(c)``). ``random`` transforms
    (the random-direction control) instead subtract, along a random direction, a
    vector of the norm that scaling by ``alpha`` would remove. ``on_support``
    transforms act along the reference restricted to the gradient's support
    (``r ⊙ 1[g != 0]``, :func:`along`); ``direction`` is the random transforms'
    kind of direction (``"gaussian"`` or ``"sign_permuted"``).
    """

    id: str
    make: Callable[[], GradientTransform]
    alpha: float
    scope: Scope
    only_positive: bool
    per_example: bool
    random: bool = False
    on_support: bool = False
    direction: str = "gaussian"

    @property
    def acts_on_mean(self) -> bool:
        """Whether the transform is the plain aligned one on the mean gradient (exactly)."""
        return not (self.per_example and self.only_positive) and not self.random


def _between_identities(make: Callable[[], GradientTransform]) -> GradientTransform:
    return chain(identity(), make(), identity())


def _after_identity(make: Callable[[], GradientTransform]) -> GradientTransform:
    return chain(identity(), make())


def _twice(make: Callable[[], GradientTransform]) -> GradientTransform:
    return chain(make(), make())


def _first_update_only(make: Callable[[], GradientTransform]) -> GradientTransform:
    """``make()`` at the first update only: the properties (one update) see ``make()``;
    the two-step per-model test also sees the update it leaves alone."""
    return conditionally_transform(make(), steps_between(0, 1))


RANDOM_SEED = 7
"""The seed of the random-direction cases."""


def _cases() -> list[Case]:
    cases = [Case("identity", identity, 1.0, "global", False, False)]
    for scope in ("global", "layer"):
        for pos in (False, True):
            tag = f"{scope}{'-pos' if pos else ''}"
            kw = {"scope": scope, "only_positive": pos}
            remove = partial(remove_aligned, **kw)
            remove_pe = partial(remove_aligned_per_example, **kw)
            plain = [
                ("scale0.5", partial(scale_aligned, 0.5, **kw), 0.5),
                ("remove", remove, 0.0),
                ("reverse", partial(reverse_aligned, **kw), -1.0),
                ("chain-id-remove-id", partial(_between_identities, remove), 0.0),
                ("chain-scale0.5-twice", partial(_twice, partial(scale_aligned, 0.5, **kw)), 0.25),
                ("conditional-remove", partial(_first_update_only, remove), 0.0),
                (
                    "conditional-scale0.5",
                    partial(_first_update_only, partial(scale_aligned, 0.5, **kw)),
                    0.5,
                ),
            ]
            per_example = [
                ("pe-scale0.5", partial(scale_aligned_per_example, 0.5, **kw), 0.5),
                ("pe-remove", remove_pe, 0.0),
                ("pe-reverse", partial(reverse_aligned_per_example, **kw), -1.0),
                ("chain-id-pe-remove", partial(_after_identity, remove_pe), 0.0),
                ("conditional-pe-remove", partial(_first_update_only, remove_pe), 0.0),
            ]
            random = [
                ("random", partial(remove_random, RANDOM_SEED, **kw)),
                (
                    "chain-id-random-id",
                    partial(_between_identities, partial(remove_random, RANDOM_SEED, **kw)),
                ),
                (
                    "conditional-random",
                    partial(_first_update_only, partial(remove_random, RANDOM_SEED, **kw)),
                ),
            ]
            support = [
                ("support-scale0.5", partial(scale_aligned, 0.5, **kw, on_support=True), 0.5),
                ("support-remove", partial(remove_aligned, **kw, on_support=True), 0.0),
                ("support-reverse", partial(reverse_aligned, **kw, on_support=True), -1.0),
            ]
            random_kinds = [
                ("support-random", "gaussian", True),
                ("sign-random", "sign_permuted", False),
                ("support-sign-random", "sign_permuted", True),
            ]
            cases += [Case(f"{n}-{tag}", m, a, scope, pos, False) for n, m, a in plain]
            cases += [
                Case(f"{n}-{tag}", m, a, scope, pos, False, on_support=True) for n, m, a in support
            ]
            cases += [
                Case(
                    f"{n}-{tag}",
                    partial(remove_random, RANDOM_SEED, **kw, direction=d, on_support=sup),
                    0.0,
                    scope,
                    pos,
                    False,
                    True,
                    on_support=sup,
                    direction=d,
                )
                for n, d, sup in random_kinds
            ]
            cases += [Case(f"{n}-{tag}", m, a, scope, pos, True) for n, m, a in per_example]
            cases += [Case(f"{n}-{tag}", m, 0.0, scope, pos, False, True) for n, m in random]
    return cases


CASES = _cases()


@dataclass(frozen=True)
class Problem:
    """Per-example gradients, their mean, a reference and the dots between them.

    Attributes:
        examples: name -> ``(example, *shape)``.
        grads: name -> ``shape``, the mean over examples.
        reference: name -> ``shape``.
        example_dots: name -> ``(example,)``, ``<g_i[name], r[name]>``.
    """

    examples: dict[str, Tensor]
    grads: dict[str, Tensor]
    reference: dict[str, Tensor]
    example_dots: dict[str, Tensor]

    @property
    def layers(self) -> list[list[str]]:
        return list(group_by_layer(self.grads).values())


def along(case: Case, problem: Problem) -> dict[str, Tensor]:
    """The reference ``case`` acts along: ``r``, or ``r ⊙ 1[g != 0]`` for ``on_support``."""
    if not case.on_support:
        return problem.reference
    return {
        name: torch.where(problem.grads[name] != 0, r, torch.zeros_like(r))
        for name, r in problem.reference.items()
    }


def example_dots(examples: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """``<g_i[p], r[p]>`` for every name, by einsum over the materialised examples."""
    return {
        name: torch.einsum("ep,p->e", g.flatten(1), reference[name].reshape(-1))
        for name, g in examples.items()
    }


def make_problem(examples: dict[str, Tensor], reference: dict[str, Tensor]) -> Problem:
    grads = {name: g.mean(0) for name, g in examples.items()}
    return Problem(examples, grads, reference, example_dots(examples, reference))


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    """Random float64 problems: 1 to 3 layers, 1 to 4 examples, zero reference layers.

    Each example is noise plus a random multiple (of either sign) of the
    reference, so coefficients of both signs occur. In some problems about
    40% of the entries are zero in every example (so exactly zero in the mean
    gradient, where the reference is not): the structural zeros that
    ``on_support`` transforms must leave alone.
    """
    n_layers = draw(st.integers(1, 3))
    sizes = st.integers(1, 3)
    layout: dict[str, tuple[int, ...]] = {}
    for k in range(n_layers):
        layout[f"net.{k}.weight"] = tuple(draw(st.lists(sizes, min_size=1, max_size=2)))
        if draw(st.booleans()):
            layout[f"net.{k}.bias"] = (draw(sizes),)
    n_examples = draw(st.integers(1, 4))
    zero_layers = draw(st.lists(st.booleans(), min_size=n_layers, max_size=n_layers))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    reference = {
        name: randn(*shape) * (0.0 if zero_layers[int(name.split(".")[1])] else magnitude)
        for name, shape in layout.items()
    }
    pull = randn(n_examples) * 2.0 / magnitude
    holes = draw(st.booleans())
    examples = {}
    for name, shape in layout.items():
        values = randn(n_examples, *shape) + pull.reshape(-1, *[1] * len(shape)) * reference[name]
        if holes:
            values = values * (torch.rand(shape, generator=gen) >= 0.4)
        examples[name] = values
    return make_problem(examples, reference)
