"""The methods the probe benchmark compares: one registry entry per method.

Each method is a context manager ``prepare(workload, options)`` that does the
one-off setup (wrapping or extending a copy of the model), yields a ``run()``
closure that does the measured work once, and undoes the setup on exit. The
original model is never changed: libraries that install hooks get a deep copy.
``run()`` leaves nothing behind on the model (``.grad``, ``grad_sample`` and
``grad_batch`` are moved into the :class:`Output`), so all the memory a call
allocates is freed when its output is dropped, and calls are independent.

Adding a case, for example the full probed student training step once it
lands in ``gradlens.training``, means writing one more ``prepare`` function
and one more :class:`Method` entry in :data:`METHODS`.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from benchmarks.models import Workload
from gradlens import per_example_grads

try:
    from gradlens.ghost import per_example_dots
except ImportError:  # pragma: no cover - lands in a parallel change
    per_example_dots = None

__all__ = ["METHODS", "Method", "Options", "Output", "missing_requirement", "quiet_hooks"]


@dataclass(frozen=True)
class Options:
    """Knobs shared by the methods."""

    chunk_size: int = 128


@dataclass(frozen=True)
class Output:
    """What one ``run()`` returns; the fields that apply to the method are set.

    ``mean`` is the batch gradient, ``grads`` the per-example gradients with a
    leading ``example`` axis, ``dots``/``sq_norms`` the per-example inner
    products with the reference and squared norms, all keyed by parameter name.
    """

    mean: dict[str, Tensor] | None = None
    grads: dict[str, Tensor] | None = None
    dots: dict[str, Tensor] | None = None
    sq_norms: dict[str, Tensor] | None = None


Run = Callable[[], Output]
Prepare = Callable[[Workload, Options], AbstractContextManager[Run]]


@dataclass(frozen=True)
class Method:
    """A benchmarked method.

    Attributes:
        name: Registry key, used in flags and result files.
        label: Human-readable name for tables and plots.
        kind: Which :class:`Output` field ``run()`` fills; ``"floor"`` marks a
            reference cost that computes no gradient and is not checked.
        prepare: Setup context manager yielding ``run``.
        requires: Module that must be importable (optional dependency), if any.
        max_batch: Largest batch worth timing (slow methods), if limited.
        materialises: Holds ``example x parameter`` gradient entries at once;
            used to skip batches that would not fit in memory.
    """

    name: str
    label: str
    kind: Literal["mean", "grads", "dots", "floor"]
    prepare: Prepare
    requires: str | None = None
    max_batch: int | None = None
    materialises: bool = True


@contextmanager
def quiet_hooks() -> Iterator[None]:
    """Silence torch's note that full backward hooks fire on module outputs.

    Opacus and BackPACK register full backward hooks on the first layer, whose
    input does not require grad; torch then warns once per call. Only that
    warning is filtered, and only inside this block.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        yield


def _named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextmanager
def _plain(w: Workload, _options: Options) -> Iterator[Run]:
    """(a) The floor: forward and backward of the mean loss, gradients into ``.grad``."""
    named = _named(w.model)

    def run() -> Output:
        w.loss_fn(w.model(w.inputs), w.targets).backward()
        mean = {n: p.grad for n, p in named}
        w.model.zero_grad(set_to_none=True)  # the result lives in the Output only
        return Output(mean=mean)

    yield run


@contextmanager
def _write_floor(w: Workload, _options: Options) -> Iterator[Run]:
    """Allocate and zero an ``example x parameter`` result: no gradient, just its memory.

    Any method that returns per-example gradients must at least do this, so it
    is the floor for (b), (d), (e) and (f) when the result dwarfs the model.
    """
    named = _named(w.model)

    def run() -> Output:
        return Output(grads={n: p.new_zeros((len(w.inputs), *p.shape)) for n, p in named})

    yield run


@contextmanager
def _vmap_grads(w: Workload, options: Options, chunked: bool) -> Iterator[Run]:
    """(b) ``gradlens.per_example_grads``, all at once or ``chunk_size`` at a time."""
    chunk_size = options.chunk_size if chunked else None

    def run() -> Output:
        grads = per_example_grads(w.model, w.loss_fn, w.inputs, w.targets, chunk_size=chunk_size)
        return Output(grads=grads)

    yield run


@contextmanager
def _dots(w: Workload, _options: Options, method: Literal["ghost", "vmap"]) -> Iterator[Run]:
    """(c) ``gradlens.per_example_dots`` with the reference gradient of the workload."""
    if per_example_dots is None:
        raise ImportError("gradlens.ghost.per_example_dots is not available in this checkout")

    def run() -> Output:
        dots, sq_norms = per_example_dots(
            w.model, w.loss_fn, w.inputs, w.targets, reference=w.reference, method=method
        )
        return Output(dots=dots, sq_norms=sq_norms)

    yield run


@contextmanager
def _loop(w: Workload, _options: Options) -> Iterator[Run]:
    """(d) One forward and ``autograd.grad`` per example: slow, obviously right."""
    named = _named(w.model)
    params = [p for _, p in named]

    def run() -> Output:
        grads = {n: p.new_empty((len(w.inputs), *p.shape)) for n, p in named}
        for i, (x, y) in enumerate(zip(w.inputs, w.targets, strict=True)):
            found = torch.autograd.grad(w.loss_fn(w.model(x[None]), y[None]), params)
            for g, one in zip(grads.values(), found, strict=True):
                g[i] = one
        return Output(grads=grads)

    yield run


@contextmanager
def _opacus(w: Workload, _options: Options) -> Iterator[Run]:
    """(e) Opacus ``GradSampleModule`` hooks; ``loss_reduction="mean"`` matches the loss."""
    from opacus import GradSampleModule

    module = GradSampleModule(copy.deepcopy(w.model), loss_reduction="mean")
    prefix = len("_module.")
    named = [(n[prefix:], p) for n, p in _named(module)]

    def run() -> Output:
        with quiet_hooks():
            w.loss_fn(module(w.inputs), w.targets).backward()
        grads = {n: p.grad_sample for n, p in named}
        module.zero_grad(set_to_none=True)  # drops .grad and .grad_sample from the module
        return Output(grads=grads)

    try:
        yield run
    finally:
        module.remove_hooks()


@contextmanager
def _backpack(w: Workload, _options: Options) -> Iterator[Run]:
    """(f) BackPACK ``BatchGrad`` on an extended copy of the model and loss.

    The loss is summed, not averaged: BackPACK scales ``grad_batch`` by the
    loss reduction, and the sum makes ``grad_batch[i]`` example ``i``'s own
    gradient without an extra pass over the result.
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(copy.deepcopy(w.model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    named = _named(model)

    def run() -> Output:
        with quiet_hooks():
            loss = loss_fn(model(w.inputs), w.targets)
            with backpack(BatchGrad()):
                loss.backward()
        grads = {n: p.grad_batch for n, p in named}
        model.zero_grad(set_to_none=True)
        for _, p in named:
            del p.grad_batch
        return Output(grads=grads)

    yield run


def _partial(fn: Callable[..., AbstractContextManager[Run]], **fixed: object) -> Prepare:
    def prepare(w: Workload, options: Options) -> AbstractContextManager[Run]:
        return fn(w, options, **fixed)

    return prepare


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("plain", "plain backward (a)", "mean", _plain, materialises=False),
        Method("write_floor", "zero-filled B x P result (floor)", "floor", _write_floor),
        Method("pe_grads", "per_example_grads (b)", "grads", _partial(_vmap_grads, chunked=False)),
        Method(
            "pe_grads_chunked",
            "per_example_grads chunked (b)",
            "grads",
            _partial(_vmap_grads, chunked=True),
        ),
        Method(
            "dots_ghost",
            "per_example_dots ghost (c)",
            "dots",
            _partial(_dots, method="ghost"),
            requires="gradlens.ghost",
            materialises=False,
        ),
        Method(
            "dots_vmap",
            "per_example_dots vmap (c)",
            "dots",
            _partial(_dots, method="vmap"),
            requires="gradlens.ghost",
        ),
        Method("loop", "autograd loop (d)", "grads", _loop, max_batch=256),
        Method("opacus", "Opacus grad_sample (e)", "grads", _opacus, requires="opacus"),
        Method("backpack", "BackPACK BatchGrad (f)", "grads", _backpack, requires="backpack"),
    )
}


def missing_requirement(method: Method) -> str | None:
    """Return a note if the method's optional dependency is not installed, else ``None``."""
    if method.requires is None:
        return None
    try:
        found = importlib.util.find_spec(method.requires) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    extra = " (pip install gradlens[bench])" if method.requires in ("opacus", "backpack") else ""
    return f"{method.requires} is not installed{extra}"
