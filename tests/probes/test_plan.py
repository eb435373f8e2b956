"""The ghost path goes only where it is established exact; elsewhere vmap or an error."""

import gc
import re

import pytest
import torch

import gradlens.probes.plan as ghost_plan_module
from gradlens import ghost_plan, per_example_dots, per_example_grads, probe_batch
from gradlens.errors import UnsupportedModelError
from gradlens.probes import mean_grad
from gradlens.probes.plan import cheapest
from tests.models import loop_grads, loss_fn, make_case
from tests.probes.test_ghost import reference_for
from tests.zoo import ZOO, make

# vmap over MultiheadAttention on the CPU runs sdpa through vmap's slow fallback, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

# What the plan must send to vmap in each zoo model (every other parameter goes ghost).
VMAP = {
    "sequence_first": set(),  # attention projections and LayerNorms have factored forms
    "time_major": set(),
    "shared_weight": set(),  # two F.linear calls: contributions and cross terms added
    "tied_embedding": {"embed.weight"},  # read by F.embedding and by h @ W.T
    "functional_reuse": {"inp.weight"},
    "table_lookup": {
        "table",
        "key_proj.weight",
        "key_proj.bias",
        "table_proj.weight",
        "table_proj.bias",
    },
}
CASES = [(kind, None) for kind in ZOO] + [("sequence_first", 6), ("time_major", 6)]


def assert_matches_loop(dots: dict, sq_norms: dict, model, x, y, ref) -> None:
    for name, g in loop_grads(model, x, y).items():
        flat = g.flatten(start_dim=1)
        torch.testing.assert_close(dots[name], flat @ ref[name].reshape(-1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sq_norms[name], flat.pow(2).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kind", "tokens"), CASES)
def test_auto_equals_the_autograd_loop(kind: str, tokens: int | None) -> None:
    model, x, y = make(kind, tokens=tokens)
    ref = reference_for(model)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, reference=ref)
    assert_matches_loop(dots, sq_norms, model, x, y, ref)


@pytest.mark.parametrize(("kind", "tokens"), CASES)
def test_plan_sends_to_vmap_exactly_what_ghost_cannot_do(kind: str, tokens: int | None) -> None:
    model, x, _ = make(kind, tokens=tokens)
    plan = ghost_plan(model, x)
    assert {n for n, e in plan.items() if e.path == "vmap"} == VMAP[kind]
    assert list(plan) == [n for n, _ in model.named_parameters()]
    sequence = kind in ("sequence_first", "time_major")
    for name, entry in plan.items():
        if entry.path == "ghost":
            want = 0 if name.startswith("head.") or not sequence else 1  # (token, example, d)
            if ".out_proj." in name:  # (token * example, d), token-major
                assert (entry.rows, entry.token_major) == (tokens or 4, True), entry
                want = 0
            assert entry.example_axis == want, (name, entry)
        else:
            assert entry.example_axis is None


@pytest.mark.parametrize(("kind", "tokens"), CASES)
def test_ghost_is_exact_or_refuses_naming_each_parameter(kind: str, tokens: int | None) -> None:
    model, x, y = make(kind, tokens=tokens)
    ref = reference_for(model)
    if not VMAP[kind]:
        dots, sq_norms = per_example_dots(model, loss_fn, x, y, reference=ref, method="ghost")
        assert_matches_loop(dots, sq_norms, model, x, y, ref)
        return
    with pytest.raises(UnsupportedModelError, match="without an exact ghost form") as err:
        per_example_dots(model, loss_fn, x, y, reference=ref, method="ghost")
    for name in VMAP[kind]:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    ("kind", "name", "reason"),
    [
        (
            "shared_weight",
            "first.weight",
            r"read by 2 calls, contributions added, cross terms in the norm",
        ),
        (
            "sequence_first",
            "encoder.self_attn.out_proj.weight",
            r"F.linear weight on \(16, 4\), example axis 0, 4 rows per example \(token-major\)",
        ),
        ("tied_embedding", "embed.weight", r"read by 2 operations .*\(embedding, Tensor.T\)"),
        ("functional_reuse", "inp.weight", "read by 2 operations"),
        ("table_lookup", "key_proj.bias", r"does not change with the batch size"),
        ("table_lookup", "table_proj.weight", r"does not change with the batch size"),
        ("time_major", "inp.weight", r"F.linear weight on \(4, 4, 4\), example axis 1"),
    ],
)
def test_plan_says_why(kind: str, name: str, reason: str) -> None:
    model, x, _ = make(kind)
    assert re.search(reason, ghost_plan(model, x)[name].reason)


@pytest.mark.parametrize("kind", ZOO)
def test_probe_batch_reports_its_plan_and_the_batch_gradient(kind: str) -> None:
    model, x, y = make(kind)
    ref = reference_for(model)
    found = probe_batch(model, loss_fn, x, y, reference=ref, chunk_size=3)
    assert found.plan == cheapest(ghost_plan(model, x))  # vmap for all where cheaper
    assert_matches_loop(found.dots, found.sq_norms, model, x, y, ref)
    plain = mean_grad(model, loss_fn, x, y)
    for name, g in plain.items():
        torch.testing.assert_close(found.grad[name], g, rtol=1e-10, atol=1e-12)
    vmap = probe_batch(model, loss_fn, x, y, reference=ref, method="vmap")
    assert {e.path for e in vmap.plan.values()} == {"vmap"}


@pytest.mark.parametrize("method", ["auto", "ghost", "vmap"])
def test_a_forward_that_mixes_examples_is_refused(method: str) -> None:
    model, x, y = make("batch_centred")
    with pytest.raises(UnsupportedModelError, match="mixes examples"):
        per_example_dots(model, loss_fn, x, y, reference=reference_for(model), method=method)
    with pytest.raises(UnsupportedModelError, match="mixes examples"):
        ghost_plan(model, x)


def test_the_plan_is_cached_per_input_signature_and_holds_no_model(monkeypatch) -> None:
    model, x, y = make("time_major")
    traces = []
    real = ghost_plan_module._trace
    monkeypatch.setattr(ghost_plan_module, "_trace", lambda *a: traces.append(1) or real(*a))
    ref = reference_for(model)
    for _ in range(3):
        per_example_dots(model, loss_fn, x, y, reference=ref)
    assert len(traces) == 2  # two batch sizes, once
    per_example_dots(model, loss_fn, x[:3], y[:3], reference=ref)
    assert len(traces) == 4  # a new input shape is a new plan
    model.eval()
    ghost_plan(model, x)
    assert len(traces) == 6  # so is another training mode
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    cache = ghost_plan_module._CACHE
    assert model in cache
    del model
    gc.collect()
    assert all(type(m).__name__ != "TimeMajor" for m in cache)


def test_an_empty_batch_gives_empty_results() -> None:
    model, x, y = make_case("mlp")
    ref = reference_for(model)
    for method in ("auto", "ghost", "vmap"):
        found = probe_batch(model, loss_fn, x[:0], y[:0], reference=ref, method=method)
        assert found.losses.shape == (0,) and found.plan == {}
        assert all(v.shape == (0,) for v in (*found.dots.values(), *found.sq_norms.values()))
        assert all(torch.equal(g, torch.zeros_like(ref[n])) for n, g in found.grad.items())
    grads = per_example_grads(model, loss_fn, x[:0], y[:0])
    assert {n: tuple(g.shape) for n, g in grads.items()} == {
        n: (0, *p.shape) for n, p in model.named_parameters()
    }
    with pytest.raises(ValueError, match="at least one example"):
        ghost_plan(model, x[:0])


@pytest.mark.parametrize("chunk_size", [0, -2])
def test_chunk_size_must_be_positive(chunk_size: int) -> None:
    model, x, y = make_case("mlp")
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        per_example_grads(model, loss_fn, x, y, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        ref = reference_for(model)
        per_example_dots(model, loss_fn, x, y, reference=ref, chunk_size=chunk_size)


@pytest.mark.parametrize("kind", ["time_major", "shared_weight", "table_lookup"])
def test_probed_step_example_cosine_matches_the_loop(kind: str) -> None:
    from gradlens import Objective, probed_step
    from gradlens.alignment.gradops import cosine

    model, x, y = make(kind)
    trait = Objective(loss_fn, x.flip(0), (y.flip(0),))
    g_t = mean_grad(model, loss_fn, x.flip(0), y.flip(0))
    each = loop_grads(model, x, y)
    want = [cosine({n: g[i] for n, g in each.items()}, g_t) for i in range(x.shape[0])]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = probed_step(model, opt, Objective(loss_fn, x, (y,)), trait, measure_change=False)
    torch.testing.assert_close(result.example_cosine, torch.stack(want), rtol=1e-9, atol=1e-12)
