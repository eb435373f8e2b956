"""An amortised trait gradient: ``g_t`` taken every ``k`` steps and reused in between.

The trait gradient costs one forward and backward of the trait batch per step.
:func:`reuse_trait` makes a :class:`TraitCache`, the explicit state of that
reuse: hand it to a step (``trait_cache=``) and take the new one from
:attr:`StepResult.trait_cache <gradlens.training.StepResult>`, as a transform's
state. The step then takes ``g_t`` (and the trait loss) at its own parameters
every ``every`` steps, and in between measures every record against the
``g_t`` it took last, ``trait_age`` steps earlier (recorded). A cache
belongs to one model (or stack) and one trait objective.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from gradlens.training import Objective, probed_step
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trait = Objective(F.cross_entropy, torch.randn(16, 4), (torch.randint(0, 3, (16,)),))
    >>> train = Objective(F.mse_loss, torch.randn(8, 4), (torch.randn(8, 3),))
    >>> cache, ages = reuse_trait(every=3), []
    >>> for step in range(5):
    ...     out = probed_step(model, opt, train, trait, trait_cache=cache, step=step)
    ...     cache = out.trait_cache
    ...     ages.append(int(out.records["trait_age"]))
    >>> ages
    [0, 1, 2, 0, 1]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

from gradlens.training.mode import StepMode
from gradlens.training.objective import Objective

__all__ = ["TraitCache", "reuse_trait", "trait_gradient"]


class TraitCache(NamedTuple):
    """The state of an amortised trait gradient (see the module docstring).

    Attributes:
        every: Steps between two trait gradients (1: every step).
        age: Steps since ``g_t`` was taken, at the step that made this state
            (``-1`` before the first step).
        trait_loss: The trait loss where ``g_t`` was taken, ``(*model)``, or ``None``.
        g_t: The trait gradient, name -> the parameter's shape (with the
            mode's leading dims), or ``None`` before the first step.
    """

    every: int
    age: int = -1
    trait_loss: Tensor | None = None
    g_t: dict[str, Tensor] | None = None

    @property
    def due(self) -> bool:
        """Whether the next step takes a fresh ``g_t``."""
        return self.g_t is None or self.age + 1 >= self.every


def reuse_trait(every: int) -> TraitCache:
    """A :class:`TraitCache` that takes the trait gradient every ``every`` steps.

    Args:
        every: Steps between trait gradients; ``1`` takes it at every step
            (the step is then the one without a cache, with ``trait_age`` 0).

    Raises:
        ValueError: If ``every`` is not a positive integer.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"reuse_trait(every={every!r}): every must be an integer >= 1.")
    return TraitCache(every)


def _check_cache(cache: TraitCache, params: Mapping[str, Tensor]) -> None:
    if not isinstance(cache, TraitCache):
        raise TypeError(
            f"trait_cache is a {type(cache).__name__}; pass reuse_trait(every=k) on the first "
            "step and the last step's result.trait_cache after it."
        )
    if cache.g_t is not None and (
        list(cache.g_t) != list(params)
        or any(cache.g_t[n].shape != p.shape for n, p in params.items())
    ):
        raise ValueError(
            "trait_cache holds a trait gradient of other parameters than this step trains: a "
            "cache belongs to one model (or stack); start it with reuse_trait(every=k) for each."
        )


def trait_gradient(
    mode: StepMode, trait: Objective, cache: TraitCache | None
) -> tuple[Tensor, dict[str, Tensor], TraitCache | None]:
    """The trait loss and ``g_t`` of this step, fresh or reused, and the cache's new state.

    Args:
        mode: Where the gradients come from.
        trait: The trait objective.
        cache: The amortisation state, or ``None`` (``g_t`` at every step, no state).

    Returns:
        ``(trait_loss, g_t, cache)``: the loss ``(*model)`` and gradient where
        ``g_t`` was taken, and the new state (``age`` 0 when taken now).
    """
    if cache is None:
        return (*mode.gradient(trait), None)
    _check_cache(cache, mode.params)
    if cache.due:
        trait_loss, g_t = mode.gradient(trait)
        return trait_loss, g_t, cache._replace(age=0, trait_loss=trait_loss, g_t=g_t)
    assert cache.trait_loss is not None and cache.g_t is not None
    return cache.trait_loss, cache.g_t, cache._replace(age=cache.age + 1)
