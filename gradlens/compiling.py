"""``torch.compile`` of gradlens's own tensor arithmetic in a probed step (opt-in).

Besides the model's passes, a probed step runs arithmetic of its own: the factored forms'
per-layer products (:func:`gradlens.probes.forms.linear.grouped_dots` and the
other forms' ``compute``), the reductions of the ``vmap`` path's per-example
gradients (:func:`gradlens.probes.fallback.vmap_dots`), and the step's records
(:mod:`gradlens.training.body`). These are pure tensor functions, and while
:func:`compiling` is active (``probed_step(..., compile=True)`` enters it) each
runs through ``torch.compile``. The model's forward and backward are not
compiled: the probes see every operation of the forward (the ghost path's
``TorchFunctionMode``, ``vmap``), so the model runs eagerly inside a step, as
a compiled model always does there (:func:`~gradlens.probes.outputs.plain_forward`).

The compiled functions compute what the eager ones compute (the same operations;
the float64 tests compare them at ``allclose``); a graph break, or a function
compiled more often than dynamo's recompile limit, runs that part eagerly,
which changes the time, never the result. A backend that cannot compile at all
(inductor without a C++ compiler, say) raises :class:`CompileError`, naming the
backend that works without one. :class:`Compile` ``(parts=...)`` picks the parts
(``"forms"``, ``"vmap"``, ``"records"``); on a CPU the step's time is in the
model's passes, which are not compiled, and compiling bought nothing measurable
there (docs/benchmarks.md, "Compiling the probed step").

:class:`Compile` ``(cuda_graphs=True)`` compiles with ``mode="reduce-overhead"``
and static shapes, so each compiled part is captured in a CUDA graph and
replayed (fewer kernel launches, the GPU cost of a probed step); its outputs
are copied out of the graph's memory before use. It needs the model on a CUDA
device, and is refused elsewhere. It was not run in this repository's tests
(no GPU): ``benchmarks/gradlens_bench/suite.py`` measures it where one is lent.

Example:
    >>> import torch
    >>> def double(x: torch.Tensor) -> torch.Tensor:
    ...     return 2 * x
    >>> fast = compiled("records")(double)
    >>> float(fast(torch.ones(())))  # no compiling() block: the function itself
    2.0
    >>> with compiling(Compile(backend="aot_eager")):
    ...     float(fast(torch.ones(())))
    2.0
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch.utils._pytree import tree_map

from gradlens.errors import GradlensError

__all__ = [
    "PARTS",
    "Compile",
    "CompileError",
    "Part",
    "check_compile",
    "compiled",
    "compiling",
    "options_of",
]

F = TypeVar("F", bound=Callable[..., Any])

Part = Literal["forms", "vmap", "records"]
"""What :func:`compiled` marks: the factored forms' ``compute``, the ``vmap`` path's
reductions, the step's records."""

PARTS: tuple[Part, ...] = ("forms", "vmap", "records")


class CompileError(GradlensError, RuntimeError):
    """A ``torch.compile`` backend that failed to compile gradlens's own arithmetic."""


@dataclass(frozen=True)
class Compile:
    """How :func:`compiling` compiles gradlens's own tensor arithmetic.

    Attributes:
        backend: ``torch.compile``'s backend: ``"inductor"`` (generated kernels;
            needs a C++ compiler on the CPU), ``"aot_eager"`` (traced, no code
            generation: checks tracing, gains little), or a backend callable.
        mode: ``torch.compile``'s mode (``None``, ``"max-autotune-no-cudagraphs"``, ...).
        cuda_graphs: Capture each compiled part in a CUDA graph
            (``mode="reduce-overhead"``, static shapes). GPU only.
        dynamic: ``torch.compile``'s ``dynamic``; ``None`` lets dynamo mark a
            size dynamic when it changes (``False`` with ``cuda_graphs``).
        recompile_limit: Graphs dynamo keeps per compiled function (a form's
            ``compute`` gets one per layer shape and branch) while it runs, at
            least (a higher ``torch._dynamo.config.recompile_limit`` is kept);
            past it that function runs eagerly, for the rest of the process.
            Dynamo's own default, 8, is met by a transformer's linear layers.
        parts: Which parts are compiled (:data:`PARTS`); the others run eagerly.
            On a CPU inductor's kernels for the convolution form were slower
            than eager (docs/benchmarks.md): ``parts=("vmap", "records")`` leaves
            the forms eager.
    """

    backend: str | Callable[..., Any] = "inductor"
    mode: str | None = None
    cuda_graphs: bool = False
    dynamic: bool | None = None
    recompile_limit: int = 64
    parts: tuple[Part, ...] = PARTS

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ValueError(f"Compile(parts=...) takes parts of {PARTS}, not {unknown}.")

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``torch.compile``."""
        if self.cuda_graphs:
            if self.mode not in (None, "reduce-overhead"):
                raise ValueError(
                    f"Compile(cuda_graphs=True) compiles with mode='reduce-overhead', not "
                    f"mode={self.mode!r}: leave mode out, or drop cuda_graphs."
                )
            return {"backend": self.backend, "mode": "reduce-overhead", "dynamic": False}
        return {"backend": self.backend, "mode": self.mode, "dynamic": self.dynamic}


_ACTIVE: ContextVar[Compile | None] = ContextVar("gradlens_compile", default=None)


def options_of(compile: bool | Compile | None) -> Compile | None:
    """The options a ``compile=`` argument asks for: ``None`` (eager), or a :class:`Compile`."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return Compile()
    if not isinstance(compile, Compile):
        raise TypeError(
            f"compile must be True, False or a gradlens.compiling.Compile, not "
            f"{type(compile).__name__}."
        )
    return compile


def check_compile(options: Compile | None, devices: Iterable[torch.device]) -> None:
    """Refuse ``cuda_graphs`` unless every device is a CUDA device (before any forward).

    Raises:
        ValueError: With ``cuda_graphs=True`` and a tensor off CUDA, naming the fix.
    """
    if options is None or not options.cuda_graphs:
        return
    others = sorted({str(d) for d in devices if d.type != "cuda"})
    if others:
        raise ValueError(
            f"Compile(cuda_graphs=True) captures CUDA graphs, which run only on a CUDA device; "
            f"the model's parameters are on {', '.join(others)}. Pass compile=True (or "
            "Compile(cuda_graphs=False)) to compile without CUDA graphs, or move the model "
            "to a GPU."
        )
    options.arguments()  # a mode that contradicts cuda_graphs


@contextmanager
def compiling(options: Compile | None) -> Iterator[None]:
    """Run the functions wrapped by :func:`compiled` through ``torch.compile`` in the block.

    ``None`` leaves them eager (so callers can pass their option through).
    """
    token = _ACTIVE.set(options)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@functools.cache
def _compiled(fn: Callable[..., Any], options: Compile) -> Callable[..., Any]:
    return torch.compile(fn, **options.arguments())


def _copied(value: Any) -> Any:
    """Outputs of a CUDA graph copied out of its memory (the next replay overwrites it)."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def compiled(part: Part) -> Callable[[F], F]:
    """Mark ``fn`` as ``part``: compiled while :func:`compiling` asks for it, else itself.

    ``fn`` must be a pure tensor function of detached values (no model call, no
    gradient through it; dynamo would read ``.grad`` of a non-leaf input): it
    runs outside :func:`~gradlens.probes.outputs.plain_forward`'s eager stance.
    A failing backend raises :class:`CompileError`.
    """
    return functools.partial(_marked, part=part)  # type: ignore[return-value]


def _marked(fn: F, part: Part) -> F:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        options = _ACTIVE.get()
        if options is None or part not in options.parts:
            return fn(*args, **kwargs)
        config = torch._dynamo.config
        limit = config.recompile_limit  # set and reset by hand: config.patch costs ~1 ms
        config.recompile_limit = max(limit, options.recompile_limit)
        try:
            with torch.compiler.set_stance("default"):
                found = _compiled(fn, options)(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            raise CompileError(
                f"torch.compile with backend {options.backend!r} could not compile "
                f"{fn.__qualname__} ({type(err.inner_exception).__name__}: "
                f"{str(err.inner_exception)[:200]}). Inductor on a CPU needs a working C++ "
                "compiler: install one, or pass compile=Compile(backend='aot_eager'), or "
                "compile=False."
            ) from err
        finally:
            config.recompile_limit = limit
        return _copied(found) if options.cuda_graphs else found

    return run  # type: ignore[return-value]
