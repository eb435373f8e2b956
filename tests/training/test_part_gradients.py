"""``part_gradients=True``: g_t against the gradient of each named part of the training loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, probed_step
from gradlens.training import weighted_sum


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def _kl(out: Tensor, target: Tensor) -> Tensor:
    p = F.log_softmax(target, -1)
    return (p.exp() * (p - F.log_softmax(out, -1))).sum(-1).mean()


def _ce(out: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(out, labels)


def _objectives() -> tuple[Objective, Objective]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    target = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (10,), generator=gen)
    loss = weighted_sum(_kl, _ce, 0.25, split=1)
    train = Objective(loss, x, (target, labels), parts={"kl": _kl_part, "ce": _ce_part})
    probe = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    trait = Objective(_ce, probe, (torch.randint(0, 4, (8,), generator=gen),))
    return train, trait


def _kl_part(out: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    del labels
    return _kl(out, target)


def _ce_part(out: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    del target
    return _ce(out, labels)


def _flat_grad(model: nn.Module, objective: Objective, fn) -> Tensor:
    loss = fn(model(objective.inputs), *objective.targets)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_part_cosines_and_norms_match_autograd() -> None:
    model = _model()
    train, trait = _objectives()
    g_t = _flat_grad(model, trait, trait.loss_fn)
    parts = [_flat_grad(model, train, fn) for fn in train.parts.values()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = probed_step(model, opt, train, trait, part_gradients=True).records
    expected = torch.stack([F.cosine_similarity(p, g_t, dim=0) for p in parts])
    torch.testing.assert_close(records["train_part_cosine"], expected, rtol=1e-10, atol=1e-12)
    norms = torch.stack([p.norm() for p in parts])
    torch.testing.assert_close(records["train_part_norm"], norms, rtol=1e-10, atol=0)
    # the two parts point differently: the combined cosine is neither of them
    assert abs(float(expected[0] - expected[1])) > 1e-3
    assert not torch.isclose(records["cosine"], expected).any()


def test_part_gradients_needs_parts_and_one_objective() -> None:
    model = _model()
    train, trait = _objectives()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = Objective(train.loss_fn, train.inputs, train.targets)
    with pytest.raises(ValueError, match="part_gradients=True measures"):
        probed_step(model, opt, plain, trait, part_gradients=True)
    with pytest.raises(ValueError, match="not micro-batches"):
        probed_step(model, opt, train.split(5), trait, part_gradients=True)
    assert "train_part_cosine" not in probed_step(model, opt, train, trait).records
