"""What a probed step records: one definition, used by every writer.

:data:`STEP_RECORDS` declares each value :func:`~gradlens.training.probed_step`
returns (name, dims, long name, units). :func:`step_variables` and
:func:`step_coords` turn it into a :class:`~gradlens.Recorder` declaration, and
:func:`step_values` turns a :class:`~gradlens.training.StepResult` into the row
to log. The transforms' states are laid out along dims, not in names:

- ``placement``: ``"before"`` (on the gradient, before the optimizer) or
  ``"after"`` (on the optimizer's update);
- ``transform``: the names given with :func:`~gradlens.transforms.named_chain`
  (see :func:`~gradlens.transforms.transform_records`);
- ``stage``: ``"before"`` or ``"after"`` the transform, for fields that come in
  such pairs (``cosine_before``/``cosine_after`` become ``transform_cosine``);
- ``group``: ``"all"`` for ``scope="global"`` values, else the layer names.

A field becomes the variable ``transform_<field>``; combinations a run does not
have (an ``after`` transform that does not exist) are NaN.

Example:
    >>> import torch
    >>> from gradlens.transforms import named_chain, remove_aligned
    >>> params = {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}
    >>> layout = transform_layout(params, before=named_chain(("remove", remove_aligned())))
    >>> layout.names, layout.fields, layout.staged, layout.groups
    (('remove',), ('acted', 'coef'), ('cosine',), ('all', '0'))
    >>> step_variables(layout)["transform_cosine"].dims
    ('step', 'placement', 'transform', 'stage', 'group')
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from gradlens.alignment.layerstats import GLOBAL, groups_for
from gradlens.alignment.measures import QUANTILES
from gradlens.probes.plan import PlanEntry
from gradlens.records.schema import Variable
from gradlens.training.body import StepResult
from gradlens.transforms.base import GradientTransform, State
from gradlens.transforms.records import transform_records

__all__ = [
    "OPTIONAL_RECORDS",
    "PLACEMENTS",
    "STAGES",
    "STEP_RECORDS",
    "TransformLayout",
    "plan_attr",
    "step_coords",
    "step_values",
    "step_variables",
    "transform_layout",
]

_S, _L, _Q = ("step",), ("step", "layer"), ("step", "quantile")

STEP_RECORDS: dict[str, Variable] = {
    "train_loss": Variable(_S, "training loss on the step's batch, before the step", "nat"),
    "trait_loss": Variable(
        _S, "trait loss on the trait batch where g_t was taken (before the step)", "nat"
    ),
    "cosine": Variable(_S, "cos(g_t, g): trait and training gradients"),
    "trait_norm": Variable(_S, "||g_t||, trait gradient norm"),
    "train_norm": Variable(_S, "||g||, training gradient norm"),
    "projection": Variable(_S, "<g, g_t> / ||g_t||^2"),
    "layer_cosine": Variable(_L, "cos(g_t, g) per layer"),
    "layer_trait_norm": Variable(_L, "||g_t|| per layer"),
    "layer_train_norm": Variable(_L, "||g|| per layer"),
    "applied_cosine": Variable(
        _S, "cos(g_t, gradient handed to the optimizer), after any before transform"
    ),
    "update_cosine": Variable(_S, "cos(g_t, applied parameter update); < 0 teaches the trait"),
    "predicted_change": Variable(_S, "first-order predicted trait-loss change g_t . update", "nat"),
    "layer_predicted_change": Variable(
        _L, "first-order predicted trait-loss change per layer, g_t . update (drive)", "nat"
    ),
    "measured_change": Variable(
        _S, "measured trait-loss change over the step (NaN where g_t is reused)", "nat"
    ),
    "example_cosine_mean": Variable(_S, "mean over examples of cos(g_i, g_t)"),
    "example_cosine_quantile": Variable(_Q, "quantiles over examples of cos(g_i, g_t)"),
    "example_cosine_frac_positive": Variable(_S, "fraction of examples with cos(g_i, g_t) > 0"),
}
"""Each value in :attr:`StepResult.records <gradlens.training.StepResult>`, declared once."""

OPTIONAL_RECORDS: dict[str, Variable] = {
    "train_loss_part": Variable(
        ("step", "part"), "named part of the training loss on the step's batch", "nat"
    ),
    "train_part_cosine": Variable(
        ("step", "part"), "cos(g_t, gradient of a named part of the training loss)"
    ),
    "train_part_norm": Variable(
        ("step", "part"), "norm of the gradient of a named part of the training loss"
    ),
    "momentum_cosine": Variable(_S, "cos(g_t, optimizer first moment after the step)"),
    "heldout_trait_loss": Variable(_S, "trait loss on the held-out trait batch", "nat"),
    "heldout_cosine": Variable(_S, "cos(g_h, g): held-out trait and training gradients"),
    "heldout_update_cosine": Variable(
        _S, "cos(g_h, applied update); < 0 teaches the held-out trait"
    ),
    "token_dot": Variable(
        ("step", "example", "token"),
        "<grad l_it, g_t>: each training token's loss term against the trait gradient",
        "nat^2",
    ),
    "trait_age": Variable(
        _S, "steps since g_t (and trait_loss) was taken; 0: at this step's parameters", "step"
    ),
}
"""The records a step gives when asked (``train.parts``, ``part_gradients=``, ``momentum=``,
``heldout=``, ``token_loss=``, ``trait_cache=``)."""

EXAMPLE_COSINE = Variable(("example_step", "example"), "cos(g_i, g_t) of each training example")
"""The per-example cosines, stored on their own record dim (every few steps)."""

PLACEMENTS = ("before", "after")
"""Where a transform acts: on the gradient before the optimizer, or on its update."""

STAGES = ("before", "after")
"""Whether a transform's value is measured on its input or on its output."""


class TransformLayout(NamedTuple):
    """The coords of a run's transform records.

    Attributes:
        names: Transform names (the ``transform`` dim).
        fields: State fields without a before/after pair (``transform_<field>``).
        staged: Fields with a ``<field>_before``/``<field>_after`` pair.
        groups: ``"all"`` then the layer names (the ``group`` dim).
    """

    names: tuple[str, ...]
    fields: tuple[str, ...]
    staged: tuple[str, ...]
    groups: tuple[str, ...]


def _split(field: str) -> tuple[str, str | None]:
    for stage in STAGES:
        if field.endswith(f"_{stage}"):
            return field.removesuffix(f"_{stage}"), stage
    return field, None


def transform_layout(
    params: Mapping[str, Tensor],
    before: GradientTransform | None = None,
    after: GradientTransform | None = None,
) -> TransformLayout | None:
    """The transform coords of a run with these transforms; ``None`` without any.

    Args:
        params: The model's trained parameters (names and shapes).
        before: The transform applied before the optimizer, if any.
        after: The transform applied to the optimizer's update, if any.
    """
    records = {}
    for transform in (before, after):
        if transform is not None:
            for name, fields in transform_records(transform.init(params)).items():
                records.setdefault(name, {}).update(fields)
    if not records:
        return None
    split = [_split(f) for fields in records.values() for f in fields]
    staged = tuple(dict.fromkeys(base for base, stage in split if stage))
    plain = tuple(dict.fromkeys(base for base, stage in split if not stage and base not in staged))
    groups = (GLOBAL, *groups_for(list(params), "layer"))
    return TransformLayout(tuple(records), tuple(sorted(plain)), tuple(sorted(staged)), groups)


def _with_model(var: Variable) -> Variable:
    """``var`` with a ``model`` dim after its record dim."""
    dims = (var.dims[0], "model", *var.dims[1:])
    return Variable(dims, var.long_name, var.units, var.dtype, var.coord)


def step_variables(
    transforms: TransformLayout | None = None,
    *,
    optional: Collection[str] = (),
    models: bool = False,
) -> dict[str, Variable]:
    """The Recorder variables of a probed step.

    :data:`STEP_RECORDS`, the per-example cosines (``example_cosine``) and,
    with a layout, the transform records.

    Args:
        transforms: The run's transform layout, from :func:`transform_layout`.
        optional: Names from :data:`OPTIONAL_RECORDS` that the run records.
        models: A stacked run: every variable gets a ``model`` dim after its
            record dim (``example_cosine`` an ``example_model`` dim).

    Raises:
        ValueError: For a name that is not an optional record.
    """
    unknown = sorted(set(optional) - set(OPTIONAL_RECORDS))
    if unknown:
        raise ValueError(
            f"{unknown} are not optional step records; choose from {sorted(OPTIONAL_RECORDS)}."
        )
    variables = {**STEP_RECORDS, **{name: OPTIONAL_RECORDS[name] for name in optional}}
    if transforms is not None:
        dims = ("step", "placement", "transform")
        for field in transforms.fields:
            variables[f"transform_{field}"] = Variable(
                (*dims, "group"), f"transform state field {field!r}"
            )
        for field in transforms.staged:
            variables[f"transform_{field}"] = Variable(
                (*dims, "stage", "group"),
                f"transform state field {field!r}, input and output",
            )
    if not models:
        return {**variables, "example_cosine": EXAMPLE_COSINE}
    variables = {name: _with_model(var) for name, var in variables.items()}
    dims = ("example_step", "example_model", "example")
    return {**variables, "example_cosine": Variable(dims, EXAMPLE_COSINE.long_name)}


def step_coords(
    layers: Sequence[str],
    transforms: TransformLayout | None = None,
    quantiles: Sequence[float] = QUANTILES,
    *,
    parts: Sequence[str] = (),
    models: Sequence[int] | None = None,
    example_models: Sequence[int] | None = None,
) -> dict[str, list]:
    """The Recorder coords for :func:`step_variables`.

    Args:
        layers: The layer names (module prefixes), in parameter order.
        transforms: The run's transform layout.
        quantiles: The levels of the per-example cosine quantiles.
        parts: The names of ``train.parts`` (the ``part`` dim of ``train_loss_part``).
        models: A stacked run's model labels (the ``model`` dim).
        example_models: The models whose per-example cosines are logged
            (the ``example_model`` dim); default all.
    """
    coords: dict[str, list] = {"layer": list(layers), "quantile": list(quantiles)}
    if parts:
        coords["part"] = list(parts)
    if models is not None:
        coords["model"] = list(models)
        coords["example_model"] = list(models if example_models is None else example_models)
    if transforms is not None:
        coords |= {
            "placement": list(PLACEMENTS),
            "transform": list(transforms.names),
            "stage": list(STAGES),
            "group": list(transforms.groups),
        }
    return coords


def _transform_values(states: Mapping[str, State], layout: TransformLayout) -> dict[str, Tensor]:
    """Arrays ``(placement, transform, [stage,] group)`` of the transform fields, NaN-filled."""
    shape = (len(PLACEMENTS), len(layout.names))
    out = {f: torch.full((*shape, len(layout.groups)), float("nan")) for f in layout.fields}
    for f in layout.staged:
        out[f] = torch.full((*shape, len(STAGES), len(layout.groups)), float("nan"))
    for p, placement in enumerate(PLACEMENTS):
        state = states.get(placement)
        if state is None:
            continue
        for name, fields in transform_records(state).items():
            t = layout.names.index(name)
            for field, value in fields.items():
                base, stage = _split(field)
                target = out[base][p, t] if stage is None else out[base][p, t, STAGES.index(stage)]
                value = value.detach().to("cpu", torch.float32)
                if value.ndim == 0:
                    target[0] = value
                else:
                    target[1:] = value
    return {f"transform_{f}": v for f, v in out.items()}


def step_values(result: StepResult, transforms: TransformLayout | None = None) -> dict[str, Tensor]:
    """The row to log for one step: its records and, with a layout, its transform fields.

    The per-example cosines are not included (log ``example_cosine`` every few
    steps, as they are large). For a stacked step (records with a leading
    ``model`` dim) the transform fields get the ``model`` dim too.
    """
    values = dict(result.records)
    if transforms is None:
        return values
    states = {"before": result.before_state, "after": result.after_state}
    if result.example_cosine.ndim < 2:
        return values | _transform_values(states, transforms)
    rows = [
        _transform_values(
            {k: pytree.tree_map_only(Tensor, lambda t, m=m: t[m], v) for k, v in states.items()},
            transforms,
        )
        for m in range(result.example_cosine.shape[0])
    ]
    return values | {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


def plan_attr(plan: Mapping[str, PlanEntry]) -> str:
    """The plan of a step as a netCDF-safe attr: JSON, parameter -> path, reason, form.

    Example:
        >>> from gradlens.probes import PlanEntry
        >>> plan_attr({"0.weight": PlanEntry("ghost", "F.linear, read once", 0, "F.linear")})
        '{"0.weight": {"path": "ghost", "reason": "F.linear, read once", "form": "F.linear"}}'
    """
    return json.dumps(
        {
            name: {"path": e.path, "reason": e.reason, **({"form": e.form} if e.form else {})}
            for name, e in plan.items()
        }
    )
