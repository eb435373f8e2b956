"""probed_step passes method, chunk_size, randomness and output on; its errors are actionable."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, per_example_grads, probed_step
from gradlens.errors import UnsupportedModelError

ACCEPTED = set(inspect.signature(probed_step).parameters)


def assert_actionable(err: BaseException) -> None:
    """Every ``name=`` the message advises is an argument of probed_step."""
    advised = set(re.findall(r"\b([a-z_]+)=", str(err)))
    assert advised <= ACCEPTED, (advised - ACCEPTED, str(err))


class Dict(nn.Module):
    """An MLP that returns a dict, with optional dropout inside the forward (functional)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p
        self.inp = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = F.dropout(torch.tanh(self.inp(x)), self.p, self.training)
        return {"logits": self.out(h), "hidden": h}


def objectives(train_size: int = 12) -> tuple[Objective, Objective]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(train_size, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (train_size,), generator=gen)
    xt = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    yt = torch.randint(0, 3, (20,), generator=gen)
    return Objective(F.cross_entropy, x, (y,)), Objective(F.cross_entropy, xt, (yt,))


def step(model: nn.Module, **options: object) -> dict[str, Tensor]:
    train, trait = objectives()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = probed_step(model, opt, train, trait, **options)  # type: ignore[arg-type]
    return {**out.records, "example_cosine": out.example_cosine}


def fresh(p: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return Dict(p).double()


def test_method_and_chunk_size_reach_the_probe() -> None:
    want = step(fresh(), output="logits")
    for options in ({"method": "vmap"}, {"method": "vmap", "chunk_size": 5}, {"chunk_size": 1}):
        got = step(fresh(), output="logits", **options)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    ("options", "error"),
    [({"chunk_size": 0}, ValueError), ({"method": "fast"}, ValueError)],
)
def test_bad_probe_options_are_named(options: dict[str, object], error: type) -> None:
    with pytest.raises(error, match=next(iter(options))) as err:
        step(fresh(), output="logits", **options)
    assert_actionable(err.value)


@pytest.mark.parametrize(
    "model",
    [
        lambda: fresh(p=0.5).train(),  # functional dropout: found by vmap
        lambda: nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double(),
    ],
    ids=["functional_dropout", "dropout_module"],
)
def test_dropout_in_training_mode_asks_for_randomness_which_works(
    model: Callable[[], nn.Module],
) -> None:
    output = "logits" if isinstance(model(), Dict) else None
    with pytest.raises(UnsupportedModelError, match="randomness='different'") as err:
        step(model(), output=output, method="vmap")
    assert_actionable(err.value)
    got = step(model(), output=output, randomness="different")
    assert torch.isfinite(got["example_cosine"]).all()


def test_a_model_returning_a_dict_needs_output_and_says_so() -> None:
    with pytest.raises(UnsupportedModelError, match="output='logits'") as err:
        step(fresh())
    assert_actionable(err.value)
    assert "keys ['logits', 'hidden']" in str(err.value)


class Scaled(nn.Module):
    """A parameter used functionally (``x @ diag(scale)``): it has no factored form (``x * scale``
    has one since issue 21, the broadcast form)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x @ torch.diag(self.scale))


def test_ghost_refusal_names_method() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'scale'.*method='auto'") as err:
        step(Scaled().double(), method="ghost")
    assert_actionable(err.value)
    auto = step(Scaled().double())
    assert torch.isfinite(auto["example_cosine"]).all()


def test_mixing_forward_is_refused_without_naming_an_unknown_argument() -> None:
    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x - x.mean(0))

    with pytest.raises(UnsupportedModelError, match="mixes examples") as err:
        step(Centred().double())
    assert_actionable(err.value)


def test_empty_batches_are_refused_naming_the_objective() -> None:
    """A probed step of no examples would be no step; it is refused before any forward."""
    model = fresh()
    train, trait = objectives()
    empty_train, _ = objectives(train_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty_trait = Objective(trait.loss_fn, trait.inputs[:0], (trait.targets[0][:0],))
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for bad_train, bad_trait, which in (
        (train, empty_trait, "trait"),
        (empty_train, trait, "train"),
    ):
        with pytest.raises(ValueError, match=f"{which}.inputs has no examples") as err:
            probed_step(model, opt, bad_train, bad_trait, output="logits")
        assert "drop_last=True" in str(err.value)  # a DataLoader's argument, not probed_step's
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before_params[name]) and p.grad is None


def test_a_model_without_trainable_parameters_is_refused() -> None:
    model = fresh().requires_grad_(False)
    with pytest.raises(UnsupportedModelError, match="requires grad") as err:
        step(model, output="logits")
    assert_actionable(err.value)


def test_per_example_grads_on_functional_dropout_asks_for_randomness() -> None:
    train, _ = objectives()
    with pytest.raises(UnsupportedModelError, match="randomness='different'"):
        per_example_grads(fresh(p=0.5).train(), F.cross_entropy, train.inputs, *train.targets,
                          output="logits")  # fmt: skip
    grads = per_example_grads(
        fresh(p=0.5).train(), F.cross_entropy, train.inputs, *train.targets, output="logits",
        randomness="different",
    )  # fmt: skip
    assert grads["inp.weight"].shape == (12, 8, 5)


def test_a_pure_bfloat16_model_with_a_mean_loss_is_not_refused() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model = model.to(torch.bfloat16)
    x, t = torch.randn(8, 4, dtype=torch.bfloat16), torch.randn(8, 3, dtype=torch.bfloat16)
    px, py = torch.randn(6, 4, dtype=torch.bfloat16), torch.randint(0, 3, (6,))
    out = probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        Objective(F.mse_loss, x, (t,)),
        Objective(F.cross_entropy, px, (py,)),
    )
    assert torch.isfinite(out.records["cosine"])


def test_a_per_example_transform_as_after_is_refused_before_any_step() -> None:
    from gradlens.transforms import named_chain, remove_aligned, remove_aligned_per_example

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for after in (
        remove_aligned_per_example(),
        named_chain(("global", remove_aligned()), ("each", remove_aligned_per_example())),
    ):
        with pytest.raises(TypeError, match="Pass it as before="):
            probed_step(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                Objective(F.cross_entropy, x, (y,)),
                Objective(F.cross_entropy, x, (y,)),
                after=after,
                after_state=after.init(dict(model.named_parameters())),
            )
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # exact: untouched, not recomputed
