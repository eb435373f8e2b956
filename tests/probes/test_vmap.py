import pytest
import torch
from torch import nn

import gradlens
from gradlens import per_example_grads
from gradlens.errors import UnsupportedModelError
from gradlens.probes import mean_grad
from tests.models import KINDS, loop_grads, loss_fn, make_case


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_grads_match_autograd_loop(kind: str) -> None:
    model, x, y = make_case(kind)
    expected = loop_grads(model, x, y)
    got = per_example_grads(model, loss_fn, x, y)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_size_gives_same_result(kind: str) -> None:
    model, x, y = make_case(kind, batch=7)
    whole = per_example_grads(model, loss_fn, x, y)
    chunked = per_example_grads(model, loss_fn, x, y, chunk_size=3)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_grad_is_mean_of_per_example_and_plain_backward(kind: str) -> None:
    model, x, y = make_case(kind)
    got = mean_grad(model, loss_fn, x, y)
    per_example = per_example_grads(model, loss_fn, x, y)
    loss_fn(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], per_example[name].mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[name], p.grad, rtol=1e-12, atol=1e-14)


def test_params_selects_and_buffers_pass_through() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    got = per_example_grads(model, loss_fn, x, y, params=["2.weight"])
    assert list(got) == ["2.weight"]
    torch.testing.assert_close(got["2.weight"], loop_grads(model, x, y)["2.weight"])
    assert torch.all(model[1].running_mean == 0.3)


def test_model_parameters_untouched() -> None:
    model, x, y = make_case("mlp")
    before = {n: p.clone() for n, p in model.named_parameters()}
    per_example_grads(model, loss_fn, x, y)
    mean_grad(model, loss_fn, x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None


def test_unknown_param_name_is_an_error() -> None:
    model, x, y = make_case("mlp")
    with pytest.raises(UnsupportedModelError, match=r"\['nope'\] are not parameters"):
        per_example_grads(model, loss_fn, x, y, params=["nope"])


def test_batchnorm_in_training_mode_is_refused_with_remedy() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match=r"'1' \(BatchNorm1d\).*model\.eval\(\)"):
        per_example_grads(model, loss_fn, x, y)


def test_dropout_needs_a_randomness_choice() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match=r"'1' \(Dropout\).*randomness='different'"):
        per_example_grads(model, loss_fn, x, y)
    grads = per_example_grads(model, loss_fn, x, y, randomness="different")
    assert grads["0.weight"].shape == (5, 4, 4)
    # a dropped hidden unit gets no gradient in its row of 0.weight; masks differ by example
    dropped = (grads["0.weight"] == 0).all(dim=2)
    assert dropped.any() and not dropped.all()
    assert len({tuple(row.tolist()) for row in dropped}) > 1


class InPlaceIntoShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("offset", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.offset.clone()
        out += self.lin(x).sum(dim=0)
        return out.unsqueeze(0)


def test_inplace_write_into_shared_tensor_names_the_module() -> None:
    model = InPlaceIntoShared()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match=r"InPlaceIntoShared. fails under vmap"):
        per_example_grads(model, loss_fn, x, y)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_public_api_is_reexported() -> None:
    for name in gradlens.__all__:
        assert hasattr(gradlens, name), name
