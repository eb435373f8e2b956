"""Every factored form is exact against the float64 loop, on every zoo model (issue 9).

The properties are written once (``assert_*``) and run over every entry of
``tests.zoo.FORMS_ZOO``, with ``token == example`` (the coincidence that fooled
size-based eligibility) and ``token != example`` where the model has tokens.
"""

import copy
import re
from functools import cache

import pytest
import torch
from torch import Tensor, nn

from gradlens import ghost_plan, per_example_dots, probe_batch
from gradlens.errors import UnsupportedModelError
from gradlens.probes import mean_grad
from tests.models import loop_grads, loss_fn
from tests.probes.test_ghost import reference_for
from tests.zoo import FORMS_ZOO, make_forms

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*bos_token_id.*|.*eos_token_id.*"),
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning"),
]

# What the plan must send to vmap in each model; every other parameter goes ghost.
VMAP: dict[str, set[str]] = {
    "convs2d": set(),
    "convs1d": set(),
    "embeddings": set(),
    "max_norm_embedding": set(),
    "norms": set(),
    "attention": set(),  # cross-attention: in_proj_weight split into q and kv weights first
    "sequence_first": set(),
    "encoder_batch_first": set(),
    "lora": {"functional.lora_a", "functional.lora_b"},  # x @ A.T @ B.T
    "gpt2": set(),  # wpe: position ids (1, token), the same for all: the broadcast form
    "shared_uses": set(),
    "resnet": set(),
    "broadcasts": set(),
    "llama": set(),  # LlamaRMSNorm weights: weight * hidden, the broadcast form
    "cross_attention": set(),
    "vit": set(),  # class_token expanded to the batch; pos_embedding added
}
WHY = {
    "cross_attn.in_proj_weight": r"broadcast over the examples: split, applied by linear on "
    r"example axis 1; linear on example axis 1",
    "cross_kv.in_proj_weight": r"chunk, applied by linear on example axis 1; linear .*; linear",
    "cross_kv.in_proj_bias": r"chunk, applied by linear on example axis 1; linear .*; linear",
    "functional.lora_a": "read by Tensor.T, which has no factored form",
    "gpt.transformer.wte.weight": r"read by 2 calls, contributions added.*F.embedding.*F.linear",
    "gpt.transformer.wpe.weight": r"broadcast over the examples: embedding -> to, applied by add",
    "class_token": r"broadcast over the examples: itself, applied by expand on example axis 0",
    "encoder.pos_embedding": r"broadcast over the examples: itself, applied by add",
    "llama.model.norm.weight": r"broadcast over the examples: itself, applied by mul",
    "channel_bias": r"broadcast over the examples: view, applied by sub on example axis 0",
    "scale": r"applied by mul on example axis 0; mul on example axis 0",
    "seq_pos": r"applied by add on example axis 1",
    "embed.weight": r"read by 2 calls, .*F.embedding weight.*; F.linear weight",
    "mix.weight": r"read by 2 calls, .*example axis 0; F.linear weight on .*example axis 1",
    "mix.bias": r"read by 3 calls, .*F.linear bias.*F.linear bias.*F.layer_norm bias",
}
SEQUENCES = (
    "embeddings",
    "shared_uses",
    "attention",
    "sequence_first",
    "encoder_batch_first",
    "lora",
    "gpt2",
    "broadcasts",
    "llama",
    "cross_attention",
)
CASES = [(kind, None) for kind in FORMS_ZOO] + [(kind, 6) for kind in SEQUENCES]
HEAVY = ("gpt2", "resnet")


def case(kind: str, tokens: int | None) -> tuple[nn.Module, Tensor, Tensor]:
    """A fresh zoo model and its batch (a model may rewrite its parameters, as max_norm does)."""
    return make_forms(kind, tokens=tokens)


@cache
def truth(kind: str, tokens: int | None) -> dict[str, Tensor]:
    """The float64 loop's per-example gradients, on a fresh copy of the model."""
    model, x, y = case(kind, tokens)
    return loop_grads(copy.deepcopy(model), x, y)


def assert_matches(dots: dict, sq_norms: dict, grads: dict, refs: dict[str, dict]) -> None:
    """Dots ``(example, reference)`` and squared norms equal the loop's, per parameter."""
    for name, g in grads.items():
        flat = g.flatten(start_dim=1)
        want = torch.stack([flat @ ref[name].reshape(-1) for ref in refs.values()], dim=1)
        torch.testing.assert_close(dots[name], want, rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(
            sq_norms[name], flat.square().sum(1), rtol=1e-9, atol=1e-12, msg=name
        )


def two_references(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    return {"trait": reference_for(model, seed=1), "teacher": reference_for(model, seed=2)}


def params_case(kind: str, tokens: int | None) -> object:
    marks = [pytest.mark.slow] if kind in HEAVY and tokens is not None else []
    return pytest.param(kind, tokens, marks=marks, id=f"{kind}-{tokens or 'T=B'}")


@pytest.mark.parametrize(("kind", "tokens"), [params_case(*c) for c in CASES])
def test_auto_equals_the_loop_for_each_reference(kind: str, tokens: int | None) -> None:
    model, x, y = case(kind, tokens)
    refs = two_references(model)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, references=refs)
    assert_matches(dots, sq_norms, truth(kind, tokens), refs)


@pytest.mark.parametrize(("kind", "tokens"), [params_case(*c) for c in CASES])
def test_plan_sends_to_vmap_exactly_what_has_no_form(kind: str, tokens: int | None) -> None:
    model, x, _ = case(kind, tokens)
    plan = ghost_plan(model, x)
    assert list(plan) == [n for n, _ in model.named_parameters()]
    moved = {n for n, e in plan.items() if e.reason.startswith("by cost")}  # all or none
    assert not moved or moved == set(plan) - VMAP[kind], moved
    assert {n for n, e in plan.items() if e.path == "vmap"} - moved == VMAP[kind]
    for name, entry in plan.items():
        if name in moved:
            continue
        if entry.path == "ghost":
            assert entry.form is not None and entry.example_axis is not None, entry
            assert entry.form in entry.reason
        else:
            assert (entry.form, entry.example_axis) == (None, None)
            assert entry.reason
        if name in WHY:
            assert re.search(WHY[name], entry.reason), entry


@pytest.mark.parametrize("kind", [k for k in FORMS_ZOO if k not in HEAVY])
def test_several_references_equal_separate_calls(kind: str) -> None:
    model, x, y = case(kind, None)
    refs = two_references(model)
    found = probe_batch(model, loss_fn, x, y, references=refs)
    assert found.references == ("trait", "teacher")
    for k, ref in enumerate(refs.values()):
        dots, sq_norms = per_example_dots(model, loss_fn, x, y, reference=ref)
        for name in dots:
            assert found.dots[name].shape == (x.shape[0], 2)
            torch.testing.assert_close(found.dots[name][:, k], dots[name], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(found.sq_norms[name], sq_norms[name])
    if kind == "max_norm_embedding":  # vmap cannot batch embedding_renorm_: ghost only
        with pytest.raises(UnsupportedModelError, match="embedding_renorm_"):
            per_example_dots(model, loss_fn, x, y, references=refs, method="vmap")
        return
    vmap = per_example_dots(model, loss_fn, x, y, references=refs, method="vmap", chunk_size=3)
    assert_matches(*vmap, truth(kind, None), refs)


@pytest.mark.parametrize("kind", [k for k in FORMS_ZOO if k not in HEAVY])
def test_ghost_is_exact_or_names_each_parameter_without_a_form(kind: str) -> None:
    model, x, y = case(kind, None)
    ref = {"only": reference_for(model)}
    if not VMAP[kind]:
        dots, sq_norms = per_example_dots(model, loss_fn, x, y, references=ref, method="ghost")
        assert_matches(dots, sq_norms, truth(kind, None), ref)
        return
    with pytest.raises(UnsupportedModelError, match="without an exact ghost form") as err:
        per_example_dots(model, loss_fn, x, y, references=ref, method="ghost")
    for name in VMAP[kind]:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=[pytest.mark.slow] if k in HEAVY else []) for k in FORMS_ZOO]
)
def test_probe_batch_gives_the_batch_gradient(kind: str) -> None:
    model, x, y = case(kind, None)
    found = probe_batch(model, loss_fn, x, y, reference=reference_for(model))
    plain = mean_grad(case(kind, None)[0], loss_fn, x, y)
    for name, g in plain.items():
        torch.testing.assert_close(found.grad[name], g, rtol=1e-10, atol=1e-12, msg=name)
    assert found.references is None and found.dots[name].shape == (x.shape[0],)


def test_share_of_parameters_on_the_ghost_path() -> None:
    """The plan says which path each parameter took; the share by parameter count follows."""
    shares = {}
    for kind in FORMS_ZOO:
        model, x, _ = case(kind, None)
        plan = ghost_plan(model, x)
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        ghost = sum(sizes[n] for n, e in plan.items() if e.path == "ghost")
        shares[kind] = ghost / sum(sizes.values())
        vmap = sum(sizes[n] for n in VMAP[kind])
        assert shares[kind] == pytest.approx(1 - vmap / sum(sizes.values()), abs=1e-12)
    assert {k for k, share in shares.items() if share == 1.0} == {
        k for k in FORMS_ZOO if not VMAP[k]
    }
    assert shares["lora"] < 1  # x @ A.T @ B.T goes to vmap


def test_an_in_place_op_after_a_layer_does_not_change_its_output_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> Tensor:
            h = self.inner[0](x)
            h = self.inner[1](h)  # writes the first layer's output in place
            h = self.inner[2](h)
            h.mul_(3.0)  # and the second's
            return self.inner[4](self.inner[3](h))

    net = Scaled()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    plan = ghost_plan(net, x)
    assert [plan[f"inner.{k}.weight"].copy_output for k in (0, 2, 4)] == [True, True, False]
    ref = {"r": reference_for(net)}
    dots, sq_norms = per_example_dots(net, loss_fn, x, y, references=ref, method="ghost")
    assert_matches(dots, sq_norms, loop_grads(net, x, y), ref)


def test_reference_and_references_are_exclusive() -> None:
    model, x, y = case("convs1d", None)
    ref = reference_for(model)
    with pytest.raises(ValueError, match=r"exactly one of reference= .* and references="):
        per_example_dots(model, loss_fn, x, y, reference=ref, references={"a": ref})
    with pytest.raises(ValueError, match="exactly one of reference="):
        per_example_dots(model, loss_fn, x, y)
    bad = {"a": ref, "b": {n: t for n, t in ref.items() if n != "head.bias"}}
    with pytest.raises(Exception, match=r"references\['b'\]"):
        per_example_dots(model, loss_fn, x, y, references=bad)
    empty = probe_batch(model, loss_fn, x[:0], y[:0], references={"a": ref, "b": ref})
    assert all(d.shape == (0, 2) for d in empty.dots.values())


@pytest.mark.parametrize("kind", ["sequence_first", "attention", "shared_uses", "embeddings"])
def test_a_batch_of_one_is_exact(kind: str) -> None:
    model, x, y = make_forms(kind, batch=1, tokens=5)
    refs = two_references(model)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, references=refs)
    assert_matches(dots, sq_norms, loop_grads(copy.deepcopy(model), x, y), refs)


def test_a_flattened_axis_is_not_trusted_when_the_forward_draws_random_numbers() -> None:
    model, x, _ = make_forms("sequence_first", tokens=6)
    plan = ghost_plan(model, x, randomness="different")
    entry = plan["encoder.self_attn.out_proj.weight"]
    assert entry.path == "vmap"
    assert "cannot be checked when the forward draws random numbers" in entry.reason
    assert plan["encoder.linear1.weight"].path == "ghost"  # an unflattened axis is by shape


def test_float32_models_keep_the_ghost_path() -> None:
    for kind in ("encoder_batch_first", "gpt2", "convs2d", "norms", "broadcasts", "llama"):
        model, x, y = make_forms(kind, batch=8, tokens=6)
        model = model.float()
        x = x.float() if x.is_floating_point() else x
        plan = ghost_plan(model, x)
        assert {n for n, e in plan.items() if e.path == "vmap"} == VMAP[kind], kind
        ref = reference_for(model)
        ghost = per_example_dots(model, loss_fn, x, y, reference=ref)
        vmap = per_example_dots(model, loss_fn, x, y, reference=ref, method="vmap")
        for got, want in zip(ghost, vmap, strict=True):
            for name in want:
                scale = want[name].abs().max()
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale)


def test_a_forward_that_differs_from_its_cached_plan_falls_back_exactly() -> None:
    class Switch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)
            self.head = nn.Linear(2, 3)
            self.twice = False

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.conv(x))
            if self.twice:  # not part of the plan's cache key
                h = torch.tanh(self.conv(h))
            return self.head(h.mean(dim=2))

    torch.manual_seed(0)
    model = Switch().double()
    x, y = torch.randn(5, 2, 7, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = {"r": reference_for(model)}
    assert ghost_plan(model, x)["conv.weight"].path == "ghost"
    model.twice = True
    found = probe_batch(model, loss_fn, x, y, references=ref)
    assert found.plan["conv.weight"].path == "vmap"
    assert found.plan["conv.weight"].reason == "the forward differed from its traced plan"
    assert found.plan["head.weight"].path == "ghost"
    assert_matches(found.dots, found.sq_norms, loop_grads(model, x, y), ref)
    with pytest.raises(UnsupportedModelError, match="differed from its trace"):
        per_example_dots(model, loss_fn, x, y, references=ref, method="ghost")
