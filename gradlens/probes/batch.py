"""A batch of model inputs: one tensor, or keyword tensors (a Hugging Face batch dict).

Every probe calls the model through here, so a model called as
``model(input_ids=..., attention_mask=...)`` is probed as one called as
``model(x)``: every tensor of a dict batch carries the ``example`` axis first,
an example is the same row of each, and ``vmap`` maps over all of them.

Example:
    >>> import torch
    >>> ids = torch.zeros(4, 7, dtype=torch.long)
    >>> batch = {"input_ids": ids, "attention_mask": torch.ones(4, 7)}
    >>> examples(batch), describe(take(batch, slice(0, 2)))
    (4, "{'input_ids': (2, 7), 'attention_mask': (2, 7)}")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["Inputs", "call", "describe", "examples", "forward", "signature", "take", "unsqueeze"]

Inputs: TypeAlias = Tensor | Mapping[str, Tensor]
"""``(example, ...)``, or name -> ``(example, ...)`` passed to the model as keywords."""


def _check(inputs: Inputs) -> None:
    if isinstance(inputs, Tensor):
        return
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(
            f"inputs must be a tensor or a non-empty dict of tensors, not {type(inputs).__name__}."
        )
    sizes = {
        k: (tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__)
        for k, v in inputs.items()
    }
    firsts = {v[0] if isinstance(v, tuple) and v else None for v in sizes.values()}
    if len(firsts) != 1 or None in firsts:
        raise ValueError(
            f"every tensor of a dict batch needs the example axis first, of one size; got "
            f"{sizes}. Pass only per-example tensors as inputs (labels go in targets, "
            "see Objective.from_batch)."
        )


def examples(inputs: Inputs) -> int:
    """The number of examples of a batch."""
    _check(inputs)
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def take(inputs: Inputs, index: Any) -> Inputs:
    """Rows ``index`` of every tensor of the batch."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def unsqueeze(inputs: Inputs) -> Inputs:
    """One example as a batch of one."""
    if isinstance(inputs, Tensor):
        return inputs.unsqueeze(0)
    return {k: v.unsqueeze(0) for k, v in inputs.items()}


def call(model: nn.Module, state: Any, inputs: Inputs) -> Any:
    """``functional_call`` of ``model`` with ``state`` on the batch (keywords for a dict)."""
    if isinstance(inputs, Tensor):
        return functional_call(model, state, (inputs,))
    return functional_call(model, state, (), dict(inputs))


def forward(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)``, or ``model(**inputs)`` for a dict batch."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    return model(**inputs)


def signature(inputs: Inputs) -> tuple:
    """What a plan's cache keys on: names, shapes, dtypes and devices."""
    if isinstance(inputs, Tensor):
        return (tuple(inputs.shape), inputs.dtype, inputs.device)
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items())


def describe(inputs: Inputs) -> str:
    """The batch's shape(s), for messages."""
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    return str({k: tuple(v.shape) for k, v in inputs.items()})
