"""Apply a transform to each of many models whose parameters are stacked along a leading axis.

Training ``M`` independent models at once keeps every parameter as one tensor
of shape ``(model, *shape)``. :func:`per_model` turns any transform of one
model's gradients into the same transform of each model's own gradients:
model ``m``'s output and state are exactly those of the plain transform
applied to model ``m`` alone (its gradients, its reference, its extras, its
state). A ``scope="global"`` transform takes one coefficient per model (over
that model's parameters), a ``scope="layer"`` one per model and layer.

``vectorize=True`` (default) runs ``torch.func.vmap`` over the leading
``model`` axis: one batched computation, what a GPU wants. It serves the
aligned and per-example transforms and chains of them, not
:func:`~gradlens.transforms.remove_random` (a ``torch.Generator`` cannot be
batched), which raises a clear error there. ``vectorize=False`` loops over the
models in Python and stacks the results: it serves every transform, and on a
CPU it is also the faster of the two (vmap turns each per-model inner product
into a batched matrix product).

Tensor extras (``example_dots``: name -> ``(model, example)``) and ``params``
are split along the model axis too; other extras go to every model as they
are. The state gets a leading ``model`` axis on every field.

Random keys: ``init`` folds the model index into every state field named
``key`` (as in :func:`~gradlens.transforms.remove_random`), so each model
draws its own random directions, reproducibly from the one seed.

Example:
    >>> import torch
    >>> from gradlens.transforms import remove_aligned
    >>> g = {"w": torch.tensor([[1.0, 1.0], [2.0, -1.0]])}  # (model, 2)
    >>> r = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    >>> tx = per_model(remove_aligned())
    >>> new_g, state = tx.update(g, tx.init(g), reference=r)
    >>> new_g["w"]
    tensor([[0., 1.],
            [2., 0.]])
    >>> state.coef
    tensor([ 1., -1.])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from gradlens.errors import GradientMismatchError
from gradlens.transforms._random import mix_seed
from gradlens.transforms.base import (
    GradientTransform,
    State,
    mark_needs_example_dots,
    needs_example_dots,
)

__all__ = ["is_per_model", "per_model"]


def _is_batched_extra(value: object) -> bool:
    """A tensor, or a mapping of tensors, is split along the model axis."""
    if isinstance(value, Tensor):
        return True
    return isinstance(value, Mapping) and all(isinstance(v, Tensor) for v in value.values())


def _num_models(what: str, values: Mapping[str, Tensor]) -> int:
    """The common leading size of ``values``, or a clear error."""
    sizes = {name: (v.shape[0] if v.ndim > 0 else None) for name, v in values.items()}
    distinct = set(sizes.values())
    if not values or None in distinct or len(distinct) != 1:
        raise GradientMismatchError(
            f"per_model needs every {what} tensor stacked along a leading model axis of one "
            f"size; got leading sizes {sizes}. Stack the models' tensors (torch.stack, or "
            "torch.func.stack_module_state) before calling it."
        )
    return distinct.pop()


def model_key(key: int, model: int) -> int:
    """The random key ``per_model`` gives model ``model`` of a transform seeded with ``key``."""
    return mix_seed(key, model) >> 1  # < 2**62: an int64 that mix_seed can take again


def _fold_model_index(state: State, models: int) -> State:
    """Give each model its own random key: ``key[m] <- model_key(key[m], m)``."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        if "key" in state._fields:
            keys = [model_key(int(k), m) for m, k in enumerate(state.key.reshape(-1).tolist())]
            return state._replace(key=torch.tensor(keys, dtype=state.key.dtype))
        return state
    if isinstance(state, dict):
        return {name: _fold_model_index(inner, models) for name, inner in state.items()}
    if isinstance(state, tuple):
        return tuple(_fold_model_index(inner, models) for inner in state)
    return state


def per_model(
    transform: GradientTransform, *, vectorize: bool = True, chunk_size: int | None = None
) -> GradientTransform:
    """Return ``transform`` applied to each model of parameters stacked along a leading axis.

    Args:
        transform: Any transform of one model's gradient dict.
        vectorize: ``torch.func.vmap`` over the models (one batched
            computation; not for ``remove_random``), or a Python loop over them.
        chunk_size: ``torch.func.vmap``'s ``chunk_size``: models per vectorised
            chunk, to bound memory; ``None`` (default) does all at once.

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` whose ``init`` takes
        stacked parameters (name -> ``(model, *shape)``) and whose ``update``
        takes stacked ``grads`` and ``reference`` (and ``params`` and tensor
        extras, if any). Its state is the transform's, each field with a
        leading ``model`` axis.

    Raises:
        GradientMismatchError: From ``update`` or ``init``, if the tensors do
            not share one leading model size.
    """

    def init(params: Mapping[str, Tensor]) -> State:
        models = _num_models("parameter", params)
        if vectorize:
            state = torch.func.vmap(transform.init, chunk_size=chunk_size)(dict(params))
            state = pytree.tree_map_only(Tensor, torch.clone, state)
        else:
            state = _stack([transform.init(_model(params, m)) for m in range(models)])
        return _fold_model_index(state, models)

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: Any,
    ) -> tuple[dict[str, Tensor], State]:
        models = _num_models("gradient", grads)
        if _num_models("reference", reference) != models:
            raise GradientMismatchError(
                f"per_model: the gradients stack {models} models and the reference "
                f"{_num_models('reference', reference)}; pass one reference per model."
            )
        batched = {name: value for name, value in extra.items() if _is_batched_extra(value)}
        shared = {name: value for name, value in extra.items() if name not in batched}

        def one(
            g: dict[str, Tensor],
            s: State,
            p: dict[str, Tensor] | None,
            r: dict[str, Tensor],
            e: dict[str, Any],
        ) -> tuple[dict[str, Tensor], State]:
            return transform.update(g, s, p, reference=r, **e, **shared)

        if not vectorize:
            results = [
                one(
                    _model(grads, m),
                    pytree.tree_map_only(Tensor, lambda t, m=m: t[m], state),
                    None if params is None else _model(params, m),
                    _model(reference, m),
                    {k: _model_extra(v, m) for k, v in batched.items()},
                )
                for m in range(models)
            ]
            return _stack([out for out, _ in results]), _stack([s for _, s in results])
        in_dims = (0, 0, None if params is None else 0, 0, 0)
        vmapped = torch.func.vmap(one, in_dims=in_dims, chunk_size=chunk_size)
        p = None if params is None else dict(params)
        return vmapped(dict(grads), state, p, dict(reference), batched)

    update.__gradlens_per_model__ = True  # type: ignore[attr-defined]
    mark_needs_example_dots(update, needs_example_dots(transform))
    return GradientTransform(init, update)


def is_per_model(transform: GradientTransform) -> bool:
    """Whether ``transform`` was made by :func:`per_model` (it transforms each model alone)."""
    return bool(getattr(transform.update, "__gradlens_per_model__", False))


def _model(values: Mapping[str, Tensor], m: int) -> dict[str, Tensor]:
    """Model ``m``'s tensors of a stacked dict."""
    return {name: value[m] for name, value in values.items()}


def _model_extra(value: Tensor | Mapping[str, Tensor], m: int) -> Tensor | dict[str, Tensor]:
    """Model ``m``'s part of a tensor extra, or of a dict of tensors."""
    return value[m] if isinstance(value, Tensor) else _model(value, m)


def _stack(trees: list[Any]) -> Any:
    """Stack a list of same-structure pytrees (dicts, tuples, NamedTuples of tensors) leafwise."""
    leaves, spec = zip(*(pytree.tree_flatten(tree) for tree in trees), strict=True)
    stacked = [torch.stack(column) for column in zip(*leaves, strict=True)]
    return pytree.tree_unflatten(stacked, spec[0])
