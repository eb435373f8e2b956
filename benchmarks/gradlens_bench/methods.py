"""The benchmark's one registry: every timed method, with the baseline it is compared with.

A method is a context manager ``prepare(workload)`` that does the one-off setup
(wrapping or extending a copy of the model), yields a ``run()`` closure that
does the measured work once, and undoes the setup on exit. Probe methods run
on the probe models and are compared with ``plain`` (forward and backward of
the mean loss); step methods run on the step model and are compared with
``step_unprobed``; DDP methods run on the DDP models, one process per rank
(:mod:`gradlens_bench.world`), and are compared with ``ddp_plain``. ``run()``
leaves nothing behind on the model (``.grad``, ``grad_sample`` and
``grad_batch`` move into its :class:`~gradlens_bench.contract.Output`), so
calls of probe methods are independent; each call of a step or DDP method
takes one more optimizer step.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, cast

from torch import nn

from gradlens import per_example_grads
from gradlens.compiling import Compile
from gradlens.numerics import flush_denormal
from gradlens.probes.ghost import per_example_dots
from gradlens.training import StepResult, reuse_trait
from gradlens.transforms import remove_aligned
from gradlens_bench import step
from gradlens_bench.agreement import against_loop, loop_grads, same_update
from gradlens_bench.contract import Method, Output, Prepare, Run
from gradlens_bench.ddp import ddp_step
from gradlens_bench.models import ProbeWorkload, Workload, forward

__all__ = ["CHUNK_SIZE", "DEFAULT_METHODS", "METHODS", "quiet_hooks"]

CHUNK_SIZE = 128


@contextmanager
def quiet_hooks() -> Iterator[None]:
    """Silence torch's note that full backward hooks fire on module outputs.

    Opacus and BackPACK register full backward hooks on the first layer, whose
    input does not require grad; torch then warns once per call.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _once(fn: Callable[[ProbeWorkload], Output]) -> Prepare:
    """A method without setup: ``run()`` is ``fn(w)``."""

    @contextmanager
    def prepare(w: Workload) -> Iterator[Run]:
        yield lambda: fn(cast(ProbeWorkload, w))

    return prepare


def _plain(w: ProbeWorkload) -> Output:
    """(a) The floor: forward and backward of the mean loss, gradients into ``.grad``."""
    w.loss_fn(forward(w, w.inputs), w.targets).backward()
    mean = {n: p.grad for n, p in _named(w.model)}
    w.model.zero_grad(set_to_none=True)  # the result lives in the Output only
    return Output(mean=mean)


def _write_floor(w: ProbeWorkload) -> Output:
    """Allocate and zero an ``example x parameter`` result: no gradient, just its memory."""
    return Output(grads={n: p.new_zeros((len(w.inputs), *p.shape)) for n, p in _named(w.model)})


@contextmanager
def _opacus(w: ProbeWorkload) -> Iterator[Run]:
    """(e) Opacus ``GradSampleModule`` hooks; ``loss_reduction="mean"`` matches the loss."""
    from opacus import GradSampleModule

    module = GradSampleModule(copy.deepcopy(w.model), loss_reduction="mean")
    named = [(n.removeprefix("_module."), p) for n, p in _named(module)]

    def run() -> Output:
        with quiet_hooks():
            w.loss_fn(forward(w, w.inputs, module), w.targets).backward()
        grads = {n: p.grad_sample for n, p in named}
        module.zero_grad(set_to_none=True)  # drops .grad and .grad_sample
        return Output(grads=grads)

    try:
        yield run
    finally:
        module.remove_hooks()


@contextmanager
def _backpack(w: ProbeWorkload) -> Iterator[Run]:
    """(f) BackPACK ``BatchGrad``; the summed loss makes ``grad_batch[i]`` example i's gradient."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    if w.loss_fn is not nn.functional.cross_entropy or w.output is not None:
        raise NotImplementedError(
            "this benchmark gives BackPACK a CrossEntropyLoss module on a tensor-valued model only"
        )
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


REUSED = 10**9
"""``step_probed_reused``'s ``every``: its first call (a warm-up) takes ``g_t``, every later one
reuses it, so each timed call is a step that reuses the trait gradient."""


def _step(
    probe: bool,
    measure_change: bool = True,
    remove: bool = False,
    trait: bool = False,
    reuse: bool = False,
    compile: Compile | None = None,
) -> Prepare:
    """(g) One step: unprobed, unprobed plus the trait gradient, or probed; subnormals flushed.

    With ``reuse`` the probed step reuses the trait gradient of its first call
    (``trait_cache=reuse_trait(every=REUSED)``, the cache threaded through the calls).
    With ``compile`` the probed step compiles gradlens's own arithmetic
    (``probed_step(compile=...)``; the timer's warm-up call compiles); CUDA graphs
    are unsupported off a GPU.
    """

    @contextmanager
    def prepare(workload: Workload) -> Iterator[Run]:
        w = cast(step.StepWorkload, workload)
        device = next(w.student.parameters()).device
        if compile is not None and compile.cuda_graphs and device.type != "cuda":
            raise NotImplementedError(f"CUDA graphs need a CUDA device, not {device}")
        tx = remove_aligned() if remove else None
        state = tx.init(dict(w.student.named_parameters())) if tx is not None else None
        cache = [reuse_trait(REUSED) if reuse else None]

        def probed() -> StepResult:
            out = step.probed(
                w, tx, state, measure_change, trait_cache=cache[0], compile=compile or False
            )
            cache[0] = out.trait_cache
            return out

        with flush_denormal():
            if probe:
                yield probed
            elif trait:
                yield lambda: step.unprobed_with_trait(w)
            else:
                yield lambda: step.unprobed(w)

    return prepare


def _dots(method: Literal["auto", "ghost", "vmap"]) -> Callable[[ProbeWorkload], Output]:
    def run(w: ProbeWorkload) -> Output:
        dots, sq = per_example_dots(
            w.model,
            w.loss_fn,
            w.inputs,
            w.targets,
            reference=w.reference,
            method=method,
            output=w.output,
        )
        return Output(dots=dots, sq_norms=sq)

    return run


def _grads(chunk_size: int | None) -> Callable[[ProbeWorkload], Output]:
    def run(w: ProbeWorkload) -> Output:
        return Output(
            grads=per_example_grads(
                w.model, w.loss_fn, w.inputs, w.targets, chunk_size=chunk_size, output=w.output
            )
        )

    return run


_GRADS = against_loop("grads")
_DOTS = against_loop("dots")
_STEP = same_update()

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "plain", "plain backward (a)", "probe", "plain", _once(_plain), against_loop("mean")
        ),
        Method(
            "write_floor",
            "zero-filled B x P result (floor)",
            "probe",
            "plain",
            _once(_write_floor),
            None,
            materialises=True,
        ),
        Method(
            "pe_grads",
            "per_example_grads (b)",
            "probe",
            "plain",
            _once(_grads(None)),
            _GRADS,
            materialises=True,
        ),
        Method(
            "pe_grads_chunked",
            "per_example_grads chunked (b)",
            "probe",
            "plain",
            _once(_grads(CHUNK_SIZE)),
            _GRADS,
            materialises=True,
        ),
        Method(
            "dots_auto",
            "per_example_dots auto (c)",
            "probe",
            "plain",
            _once(_dots("auto")),
            _DOTS,
        ),
        Method(
            "dots_ghost",
            "per_example_dots ghost (c)",
            "probe",
            "plain",
            _once(_dots("ghost")),
            _DOTS,
        ),
        Method(
            "dots_vmap",
            "per_example_dots vmap (c)",
            "probe",
            "plain",
            _once(_dots("vmap")),
            _DOTS,
            materialises=True,
        ),
        Method(
            "loop",
            "autograd loop (d)",
            "probe",
            "plain",
            _once(lambda w: Output(grads=loop_grads(w))),
            against_loop("loop"),
            max_batch=256,
            materialises=True,
        ),
        Method(
            "opacus",
            "Opacus grad_sample (e)",
            "probe",
            "plain",
            _opacus,
            _GRADS,
            requires="opacus",
            materialises=True,
        ),
        Method(
            "backpack",
            "BackPACK BatchGrad (f)",
            "probe",
            "plain",
            _backpack,
            _GRADS,
            requires="backpack",
            materialises=True,
        ),
        Method("step_unprobed", "unprobed step (g)", "step", "step_unprobed", _step(False), _STEP),
        Method(
            "step_plain_trait",
            "unprobed step + trait gradient (g)",
            "step",
            "step_unprobed",
            _step(False, trait=True),
            _STEP,
        ),
        Method("step_probed", "probed step (g)", "step", "step_unprobed", _step(True), _STEP),
        Method(
            "step_probed_reused",
            "probed step, trait gradient reused (g)",
            "step",
            "step_unprobed",
            _step(True, reuse=True),
            _STEP,
        ),
        Method(
            "step_probed_compiled",
            "probed step, compiled (g)",
            "step",
            "step_unprobed",
            _step(True, compile=Compile()),
            _STEP,
            opt_in=True,
        ),
        Method(
            "step_probed_cuda_graphs",
            "probed step, compiled, CUDA graphs (g)",
            "step",
            "step_unprobed",
            _step(True, compile=Compile(cuda_graphs=True)),
            _STEP,
            opt_in=True,
        ),
        Method(
            "step_probed_no_change",
            "probed step, no measured change (g)",
            "step",
            "step_unprobed",
            _step(True, measure_change=False),
            _STEP,
        ),
        Method(
            "step_remove_aligned",
            "probed step + remove_aligned (g)",
            "step",
            "step_unprobed",
            _step(True, remove=True),
            same_update(project=True),
        ),
        Method("ddp_plain", "plain DDP step (h)", "ddp", "ddp_plain", ddp_step("plain"), _STEP),
        Method("ddp_probed", "probed DDP step (h)", "ddp", "ddp_plain", ddp_step("probed"), _STEP),
        Method(
            "ddp_probed_lean",
            "probed DDP step, lean (h)",
            "ddp",
            "ddp_plain",
            ddp_step("lean"),
            _STEP,
        ),
        Method(
            "ddp_probed_remove",
            "probed DDP step + remove_aligned (h)",
            "ddp",
            "ddp_plain",
            ddp_step("remove"),
            same_update(project=True),
        ),
    )
}

DEFAULT_METHODS = tuple(name for name, m in METHODS.items() if not m.opt_in)
"""What a run without ``--methods`` times: every method but the opt-in (compiled) ones."""
