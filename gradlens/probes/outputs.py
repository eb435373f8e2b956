"""What a probe differentiates when the model returns more than one tensor (private).

gradlens calls ``loss_fn(outputs, *targets)`` with ``outputs`` a tensor whose
first axis is the example axis: per-example losses are read off it row by
row. Many models return something else: a Hugging Face ``ModelOutput``
(``out.logits``, ``out.past_key_values``), a dict, or a tuple. Every function
that calls the model takes an ``output=`` selector that says which tensor the
loss sees:

- ``None`` (the default): the model returns a tensor; anything else raises
  :class:`~gradlens.errors.UnsupportedModelError` showing the fix;
- a string: a key of a dict or ``ModelOutput``, else an attribute
  (``"logits"``);
- an int: an index into a tuple or list (a ``ModelOutput`` counts too);
- a callable ``output(model_output) -> Tensor`` for anything else
  (``lambda out: out.logits[:, -1]``).

Key-value caches are not part of any loss and, under ``vmap``, are either
wasted memory or an error. While a probe runs, :func:`no_kv_cache` switches
``config.use_cache`` off on every submodule's config that has it on
(Hugging Face models keep it on by default) and restores it after, so the
model's own setting is unchanged when the call returns.

Example:
    >>> import torch
    >>> out = {"logits": torch.zeros(2, 3), "hidden": torch.zeros(2, 5)}
    >>> tuple(select_output(out, "logits").shape)
    (2, 3)
    >>> tuple(select_output((torch.ones(2), out), 0).shape)
    (2,)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from gradlens.errors import UnsupportedModelError
from gradlens.probes.masks import vmap_safe_masks

__all__ = ["OutputSelector", "no_kv_cache", "plain_forward", "select_output", "selector_key"]

OutputSelector: TypeAlias = str | int | Callable[[Any], Tensor]
"""A key or attribute name, a tuple index, or ``output(model_output) -> Tensor``."""

_FIX = (
    "pass output= to say which tensor the loss sees: a key or attribute name "
    "(output='logits' for a Hugging Face model), a tuple index (output=0), or a callable "
    "(output=lambda out: out.logits)"
)


def _describe(outputs: object) -> str:
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with keys {list(outputs)}"
    if isinstance(outputs, Sequence) and not isinstance(outputs, str):
        kinds = [type(o).__name__ for o in outputs]
        return f"a {type(outputs).__name__} of {kinds}"
    return f"a {type(outputs).__name__}"


def select_output(outputs: object, output: OutputSelector | None) -> Tensor:
    """The tensor the loss sees, picked from what the model returned.

    Args:
        outputs: What the model returned.
        output: The selector (see the module docstring); ``None`` expects a tensor.

    Returns:
        The selected tensor, shape ``(example, ...)``.

    Raises:
        UnsupportedModelError: If the model returned a non-tensor and
            ``output`` is ``None``, or the selector names nothing there, or it
            does not give a tensor. The message shows what the model returned.
    """
    if output is None:
        if isinstance(outputs, Tensor):
            return outputs
        raise UnsupportedModelError(
            f"the model returned {_describe(outputs)}, not a tensor: {_FIX}."
        )
    if isinstance(output, bool) or (not isinstance(output, (str, int)) and not callable(output)):
        raise TypeError(
            f"output must be a key or attribute name, a tuple index or a callable, not {output!r}."
        )
    if isinstance(output, str):
        if isinstance(outputs, Mapping) and output in outputs:
            picked = outputs[output]
        elif not isinstance(outputs, Mapping) and hasattr(outputs, output):
            picked = getattr(outputs, output)
        else:
            raise UnsupportedModelError(
                f"output={output!r} names nothing in what the model returned, "
                f"{_describe(outputs)}; pass one of its keys or attributes."
            )
    elif isinstance(output, int):
        try:
            picked = outputs[output]  # type: ignore[index]
        except (TypeError, IndexError, KeyError):
            raise UnsupportedModelError(
                f"output={output} is no index of what the model returned, "
                f"{_describe(outputs)}; pass a valid index, a key or a callable."
            ) from None
    else:
        picked = output(outputs)
    if not isinstance(picked, Tensor):
        raise UnsupportedModelError(
            f"output={output!r} gave a {type(picked).__name__}, not a tensor; the model "
            f"returned {_describe(outputs)}. Select a tensor with shape (example, ...)."
        )
    return picked


def selector_key(output: OutputSelector | None) -> object:
    """A hashable stand-in for ``output`` in a cache key (callables count as one)."""
    return output if output is None or isinstance(output, (str, int)) else "callable"


@contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Switch ``config.use_cache`` off on ``model``'s submodules while the block runs.

    Every distinct ``config`` object found on a submodule with ``use_cache``
    set to ``True`` (a Hugging Face ``PretrainedConfig``, shared by its
    submodules) is set to ``False`` and restored on exit, even on error.
    """
    switched: list[object] = []
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        if getattr(config, "use_cache", None) is True:
            config.use_cache = False
            switched.append(config)
    try:
        yield
    finally:
        for config in switched:
            config.use_cache = True


@contextmanager
def plain_forward(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s forward as written while the block runs: eagerly, without a KV cache.

    Code compiled with ``torch.compile`` (a compiled model, ``model.compile()``,
    a compiled submodule or function) runs eagerly (``torch.compiler.set_stance
    ("force_eager")``): the probes see every operation through their
    ``TorchFunctionMode``, hooks and ``vmap``, which a compiled graph hides, so
    they are exact on a compiled model instead of silently wrong, and they
    leave no compiled state behind. The parameters are the compiled model's own.
    Also :func:`no_kv_cache`, and Hugging Face attention masks built without
    value-dependent shortcuts inside ``torch.func`` transforms
    (:func:`~gradlens.probes.masks.vmap_safe_masks`), so a 2-D ``attention_mask``
    is exact under ``vmap``.
    """
    with torch.compiler.set_stance("force_eager"), no_kv_cache(model), vmap_safe_masks():
        yield
