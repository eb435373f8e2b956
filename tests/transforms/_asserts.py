"""Properties every gradient transform must have, written once.

Each ``assert_*`` takes a :class:`~_cases.Case` (a transform and the ``alpha``,
scope and flags it should act with) and a :class:`~_cases.Problem` (random
float64 gradients), runs the transform and checks one property against a
plain dense computation on flattened vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.testing import assert_close

from gradlens.alignment.gradops import flatten
from gradlens.transforms import State, chain, identity, transform_records
from gradlens.transforms._random import mix_seed

from ._cases import RANDOM_SEED, Case, Problem, along, make_problem


def apply(
    case: Case, problem: Problem, transform_chain: bool = False
) -> tuple[dict[str, Tensor], State]:
    """Run ``case``'s transform once from its init state, passing every extra."""
    transform = case.make()
    if transform_chain:
        transform = chain(identity(), transform, identity())
    state = transform.init(problem.grads)
    return transform.update(
        problem.grads,
        state,
        reference=problem.reference,
        example_dots=problem.example_dots,
        unused_extra="ignored",
    )


def groups(case: Case, problem: Problem) -> list[list[str]]:
    return [list(problem.grads)] if case.scope == "global" else problem.layers


def dense(values: dict[str, Tensor], names: list[str], *, batch: bool = False) -> Tensor:
    return flatten({name: values[name] for name in names}, batch=batch)


def coef(g: Tensor, r: Tensor) -> Tensor:
    """``<g, r> / ||r||^2`` over the last axis, 0 for a zero ``r``."""
    rr = r @ r
    return (g @ r) / rr if rr > 0 else torch.zeros(g.shape[:-1], dtype=g.dtype)


def cosine(g: Tensor, r: Tensor) -> Tensor:
    den = g.norm() * r.norm()
    return (g @ r) / den if den > 0 else torch.zeros((), dtype=g.dtype)


def acted(case: Case, c: Tensor, r: Tensor) -> bool:
    return bool(r.norm() > 0 and (c > 0 or not case.only_positive))


def expected_output(case: Case, problem: Problem) -> dict[str, Tensor]:
    """``g - (1 - alpha) m r`` per group, ``m = f(mean_i c_i)`` or ``mean_i f(c_i)``."""
    amounts = {}
    reference = along(case, problem)
    for names in groups(case, problem):
        r = dense(reference, names)
        c_i = coef(dense(problem.examples, names, batch=True), r)
        f = torch.relu if case.only_positive else (lambda x: x)
        m = f(c_i).mean() if case.per_example else f(c_i.mean())
        amounts.update(dict.fromkeys(names, (1 - case.alpha) * m))
    return {n: g - amounts[n] * reference[n] for n, g in problem.grads.items()}


def _flat_records(state: State) -> dict[str, torch.Tensor]:
    """Every transform field as ``"<transform>/<field>"``."""
    return {
        f"{name}/{field}": value
        for name, fields in transform_records(state).items()
        for field, value in fields.items()
    }


def assert_structure_preserved(case: Case, problem: Problem) -> None:
    out, state = apply(case, problem)
    assert list(out) == list(problem.grads)
    for name, g in problem.grads.items():
        assert out[name].shape == g.shape
        assert out[name].dtype == g.dtype
        assert out[name].isfinite().all()
    before = _flat_records(case.make().init(problem.grads))
    after = _flat_records(state)
    assert before.keys() == after.keys()
    for name, value in after.items():
        assert value.shape == before[name].shape
        assert value.dtype == before[name].dtype
        assert value.isfinite().all()


def expected_random_output(case: Case, problem: Problem) -> dict[str, Tensor]:
    """``g - s sign(<g, u>) u`` per group: ``s = |<g, r>| / ||r||`` where it acts, ``u`` unit.

    ``u`` is the first draw of the seed: ``torch.randn`` over the flattened
    gradient in key order, from a generator seeded with ``mix_seed(seed, 0)``,
    normalised per group. For ``on_support`` cases ``r`` and ``u`` are zeroed
    where ``g`` is (:func:`~_cases.along`). Gaussian directions only.
    """
    reference = along(case, problem)
    total = sum(g.numel() for g in problem.grads.values())
    generator = torch.Generator().manual_seed(mix_seed(RANDOM_SEED, 0))
    z = torch.randn(total, generator=generator, dtype=torch.float64)
    offsets, start = {}, 0
    for name, g in problem.grads.items():
        offsets[name] = (start, start + g.numel())
        start += g.numel()
    out = {}
    for names in groups(case, problem):
        g, r = dense(problem.grads, names), dense(reference, names)
        u = torch.cat([z[slice(*offsets[n])] for n in names])
        if case.on_support:
            u = torch.where(g != 0, u, 0.0)
        u = u / u.norm() if u.norm() > 0 else u
        s = (g @ r).abs() / r.norm() if acted(case, coef(g, r), r) else torch.zeros(())
        side = -1.0 if g @ u < 0 else 1.0
        new = g - s * side * u
        start = 0
        for name in names:
            size = problem.grads[name].numel()
            out[name] = new[start : start + size].reshape(problem.grads[name].shape)
            start += size
    return {name: out[name] for name in problem.grads}


def assert_sign_permuted_step(case: Case, problem: Problem, out: dict[str, Tensor]) -> None:
    """A ``"sign_permuted"`` removal writes ``|r|`` scaled, with the signs of ``r`` permuted.

    Per group where it acts, ``|g - g'| = (s / ||r||) |r|`` entry by entry, and
    within each tensor the signs of ``g - g'`` are those of ``r`` permuted (up
    to one flip of the whole group, the side of ``u`` that ``g`` lies on).
    """
    reference = along(case, problem)
    for names in groups(case, problem):
        g, r = dense(problem.grads, names), dense(reference, names)
        if not acted(case, coef(g, r), r):
            continue
        s = (g @ r).abs() / r.norm()
        step = {name: problem.grads[name] - out[name] for name in names}
        assert_close(dense(step, names).abs(), s / r.norm() * r.abs(), atol=1e-9 * s, rtol=1e-7)
        signs = [(step[n].sign().sum(), reference[n].sign().sum()) for n in names]
        same = all(torch.equal(a, b) for a, b in signs)
        flipped = all(torch.equal(a, -b) for a, b in signs)
        assert same or flipped, signs


def assert_matches_formula(case: Case, problem: Problem) -> None:
    out, _ = apply(case, problem)
    if case.random:
        if case.direction == "gaussian":
            assert_close(out, expected_random_output(case, problem))
        else:
            assert_sign_permuted_step(case, problem, out)
        reference = along(case, problem)
        for names in groups(case, problem):
            g, new, r = (dense(d, names) for d in (problem.grads, out, reference))
            removed = (g @ r).abs() / r.norm() if acted(case, coef(g, r), r) else 0.0
            assert_close((new - g).norm(), torch.as_tensor(removed, dtype=g.dtype))
        return
    assert_close(out, expected_output(case, problem))


def assert_writes_nothing_off_support(case: Case, problem: Problem) -> None:
    """An ``on_support`` transform leaves every exact zero of ``g`` exactly zero."""
    out, _ = apply(case, problem)
    for name, g in problem.grads.items():
        zero = g == 0
        assert torch.equal(out[name][zero], g[zero]), name


def assert_keeps_orthogonal_part(case: Case, problem: Problem) -> None:
    """The part orthogonal to the direction acted along stays (``r ⊙ 1[g != 0]`` on_support)."""
    out, _ = apply(case, problem)
    reference = along(case, problem)
    for names in groups(case, problem):
        g, new, r = (dense(d, names) for d in (problem.grads, out, reference))
        assert_close(new - coef(new, r) * r, g - coef(g, r) * r)


def assert_removes_aligned(case: Case, problem: Problem) -> None:
    """For ``alpha = 0``: no cosine left where it acted, untouched elsewhere.

    The cosine is taken against the incoming norm, ``<g', r> / (||g|| ||r||)``:
    when ``g`` is parallel to ``r``, ``g'`` is rounding noise whose own cosine
    with ``r`` means nothing.
    """
    out, _ = apply(case, problem)
    reference = along(case, problem)
    for names in groups(case, problem):
        g, new, r = (dense(d, names) for d in (problem.grads, out, problem.reference))
        acting = dense(reference, names)
        if acted(case, coef(g, acting), acting):
            assert (new @ r).abs() <= 1e-6 * g.norm() * r.norm()
        else:
            assert_close(new, g)


def assert_reverses_aligned(case: Case, problem: Problem) -> None:
    """For ``alpha = -1``: the coefficient flips sign where it acted, the rest stays.

    The sign flip holds along the full reference for ``on_support`` cases too
    (``<g', r> = -<g, r>``); the part that stays is the one orthogonal to the
    direction acted along.
    """
    out, _ = apply(case, problem)
    reference = along(case, problem)
    for names in groups(case, problem):
        g, new, r = (dense(d, names) for d in (problem.grads, out, problem.reference))
        acting = dense(reference, names)
        c, c_acting = coef(g, r), coef(g, acting)
        scale = float(g.norm() / r.norm()) if r.norm() > 0 else 0.0
        flips = acted(case, c_acting, acting)
        assert_close(coef(new, r), -c if flips else c, atol=1e-12 * scale, rtol=1e-9)
        assert_close(new - coef(new, acting) * acting, g - c_acting * acting)


def assert_zero_reference_is_noop(case: Case, problem: Problem) -> None:
    zero = {name: torch.zeros_like(r) for name, r in problem.reference.items()}
    out, state = apply(case, make_problem(problem.examples, zero))
    for name, g in problem.grads.items():
        assert torch.equal(out[name], g)
    for value in _flat_records(state).values():
        assert value.isfinite().all()


def assert_orthogonal_is_noop(case: Case, problem: Problem) -> None:
    """Examples orthogonal to the reference in every layer (so globally too) stay."""
    examples = dict(problem.examples)
    for names in problem.layers:
        r = dense(problem.reference, names)
        c_i = coef(dense(examples, names, batch=True), r)
        for name in names:
            shape = (-1,) + (1,) * problem.reference[name].ndim
            examples[name] = examples[name] - c_i.reshape(shape) * problem.reference[name]
    orthogonal = make_problem(examples, problem.reference)
    out, _ = apply(case, orthogonal)
    assert_close(out, orthogonal.grads)


def assert_identity_chain_is_noop(case: Case, problem: Problem) -> None:
    out, state = apply(case, problem)
    chained_out, chained_state = apply(case, problem, transform_chain=True)
    for name, value in out.items():
        assert torch.equal(chained_out[name], value)
    plain = _flat_records(state)
    chained = _flat_records(chained_state[1])
    assert plain.keys() == chained.keys()
    for name, value in plain.items():
        assert torch.equal(chained[name], value)


def assert_records_cosine_after(case: Case, problem: Problem) -> None:
    """The last recorded ``cosine_after`` is the cosine of the output (per group).

    Every transform but the identity must record one; the identity records nothing.

    Rounding in ``<g', r>`` is relative to the incoming ``||g||``, so the
    tolerance on the cosine grows as ``||g|| / ||g'||``.
    """
    out, state = apply(case, problem)
    records = _flat_records(state)
    names = [name for name in records if name.endswith("/cosine_after")]
    if case.alpha == 1.0:  # the identity: it records nothing, and changes nothing
        assert not records
        for name, g in problem.grads.items():
            assert torch.equal(out[name], g)
        return
    assert names, f"{case.id} records no cosine_after: {sorted(records)}"
    recorded = records[names[-1]].reshape(-1)
    for k, group in enumerate(groups(case, problem)):
        g, new, r = (dense(d, group) for d in (problem.grads, out, problem.reference))
        atol = 1e-9 * max(1.0, float(g.norm() / new.norm()) if new.norm() > 0 else 1.0)
        assert_close(recorded[k], cosine(new, r), atol=atol, rtol=1e-7)


def assert_records_incoming_coef_and_cosine(case: Case, problem: Problem) -> None:
    """The first recorded ``coef`` and ``cosine_before`` are those of the incoming gradient.

    Per group, against the dense float64 ``<g, r> / ||r||^2`` and ``cos(g, r)``, both 0
    for a zero reference. Every transform but the identity records them; the first
    member of a chain sees the incoming gradient.
    """
    _, state = apply(case, problem)
    records = _flat_records(state)
    if case.alpha == 1.0:
        assert not records
        return
    coefs = [name for name in records if name.endswith("/coef")]
    cosines = [name for name in records if name.endswith("/cosine_before")]
    assert coefs and cosines, f"{case.id} records no coef or cosine_before: {sorted(records)}"
    recorded_coef = records[coefs[0]].reshape(-1)
    recorded_cosine = records[cosines[0]].reshape(-1)
    reference = along(case, problem)
    for k, group in enumerate(groups(case, problem)):
        g, r = dense(problem.grads, group), dense(problem.reference, group)
        acting = dense(reference, group)  # coef is along the direction acted along
        # rounding in <g, r> is relative to ||g|| ||r||: in the coefficient to ||g|| / ||r||
        scale = float(g.norm() / acting.norm()) if acting.norm() > 0 else 0.0
        assert_close(recorded_coef[k], coef(g, acting), atol=1e-12 * scale, rtol=1e-9)
        assert_close(recorded_cosine[k], cosine(g, r), atol=1e-12, rtol=1e-9)
