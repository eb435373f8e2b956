"""The opt-in ``token_dot`` record of a probed step: (step, example, token), exact, checked.

``probed_step(..., token_loss=token_losses)`` records each training token's
loss term against ``g_t`` at the parameters the step starts from; the values
are ``token_dots`` of the batch (itself tested against a per-token float64
loop in ``tests/probes/test_token_dots.py``), their row sums the step's own
per-example dots, and a ``token_loss`` that does not split the training loss
is refused before the optimizer steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gradlens import Objective, Recorder, per_example_dots, probed_step
from gradlens.alignment.layerstats import groups_for
from gradlens.probes import mean_grad, token_dots
from gradlens.training.losses import token_losses
from gradlens.training.records import step_coords, step_values, step_variables
from tests.hf import collated, gpt2

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LENGTHS = [8, 5, 8, 3]


def _step(batch: dict[str, Tensor], token_loss: object, model: torch.nn.Module) -> tuple:
    trait = Objective.from_tokens(collated([6, 4]))
    g_t = mean_grad(model, trait.loss_fn, trait.inputs, *trait.targets, output="logits")
    train = Objective.from_tokens(batch, weighting="batch")
    before = token_dots(
        model, token_losses, train.inputs, *train.targets, reference=g_t, output="logits"
    )
    dots, _ = per_example_dots(
        model, train.loss_fn, train.inputs, *train.targets, reference=g_t, output="logits"
    )
    result = probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        train,
        trait,
        output="logits",
        token_loss=token_loss,
    )
    return result, before, torch.stack(list(dots.values())).sum(0)


def test_the_step_records_token_dots_before_it_steps_and_they_sum_to_its_example_dots() -> None:
    batch = collated(LENGTHS)
    result, before, example_dots = _step(batch, token_losses, gpt2())
    got = result.records["token_dot"]
    assert got.shape == batch["input_ids"].shape
    torch.testing.assert_close(got, before, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.sum(1), example_dots, rtol=1e-9, atol=1e-12)  # <g_i, g_t>


def test_a_token_loss_that_does_not_split_the_training_loss_is_refused_before_the_step() -> None:
    def unweighted(logits: Tensor, labels: Tensor, *weights: Tensor) -> Tensor:
        return token_losses(logits, labels)  # drops the batch weights: another loss

    model = gpt2()
    with pytest.raises(ValueError, match=r"token_loss must split train\.loss_fn"):
        _step(collated(LENGTHS), unweighted, model)
    for p, q in zip(model.parameters(), gpt2().parameters(), strict=True):
        assert torch.equal(p, q)


def test_token_dot_goes_into_a_run_with_its_dims_and_attrs() -> None:
    batch = collated(LENGTHS)
    model = gpt2()
    result, _, _ = _step(batch, token_losses, model)
    layers = list(groups_for([n for n, _ in model.named_parameters()], "layer"))
    variables = step_variables(optional=["token_dot"])
    rec = Recorder(None, variables, coords=step_coords(layers))
    values = step_values(result)
    rec.log(0, **values)
    ds = rec.dataset()
    assert ds["token_dot"].dims == ("step", "example", "token")
    assert ds["token_dot"].attrs["units"] == "nat^2"
    assert "trait gradient" in ds["token_dot"].attrs["long_name"]
    torch.testing.assert_close(
        torch.as_tensor(ds["token_dot"].values[0]),
        result.records["token_dot"].float(),
    )
