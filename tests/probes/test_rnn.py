"""Fused RNNs (nn.LSTM, nn.GRU, nn.RNN) and packed sequences: exact by the loop path.

vmap cannot batch the fused recurrent kernels nor packing; per-example gradients
of such a model are taken one example at a time (gradlens.probes.loop), and the
ghost path keeps the parameters with a factored form (the head). Every case is
checked against the float64 autograd loop of tests/models.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradlens import Objective, per_example_dots, per_example_grads, probe_batch, probed_step
from gradlens.errors import UnsupportedModelError
from tests.models import loop_grads, loss_fn
from tests.probes.test_ghost import reference_for
from tests.zoo import CLASSES

BATCH = 5


class Recurrent(nn.Module):
    """A fused RNN over ``(example, token, 3)`` inputs, mean over tokens, a linear head."""

    def __init__(
        self, cell: type[nn.RNNBase], batch_first: bool, layers: int = 1, both: bool = False
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 4, num_layers=layers, bidirectional=both, batch_first=batch_first)
        self.head = nn.Linear(8 if both else 4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(dim=1))


class Packed(nn.Module):
    """Zero-padded ``(example, token, 3)`` inputs packed by length; the head on the last state."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        lengths = (x.abs().sum(dim=-1) > 0).sum(dim=1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        state = self.rnn(packed)[1]
        last = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
        return self.head(last[-1])


CASES = {
    "lstm": lambda: Recurrent(nn.LSTM, batch_first=True),
    "lstm_seq_first_2_layers_bidirectional": lambda: Recurrent(nn.LSTM, False, 2, both=True),
    "gru_2_layers_bidirectional": lambda: Recurrent(nn.GRU, True, 2, both=True),
    "gru_seq_first": lambda: Recurrent(nn.GRU, batch_first=False),
    "rnn_tanh": lambda: Recurrent(nn.RNN, batch_first=True),
    "packed_lstm": lambda: Packed(nn.LSTM),
    "packed_gru": lambda: Packed(nn.GRU),
}


def make(kind: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor, Tensor]:
    """``(model, inputs, labels)``: ``token == example`` (the sequence-first coincidence)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = CASES[kind]().to(dtype)
    x = torch.randn(BATCH, BATCH, 3, generator=gen, dtype=dtype)
    if kind.startswith("packed"):
        for row, length in enumerate([5, 2, 5, 3, 1]):
            x[row, length:] = 0.0
    return model, x, torch.randint(0, CLASSES, (BATCH,), generator=gen)


@pytest.mark.parametrize("kind", list(CASES))
def test_per_example_grads_of_a_fused_rnn_equal_the_autograd_loop(kind: str) -> None:
    model, x, y = make(kind)
    expected = loop_grads(model, x, y)
    found = per_example_grads(model, loss_fn, x, y)
    assert found.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(found[name], g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_probe_of_a_fused_rnn_equals_the_autograd_loop(kind: str, method: str) -> None:
    model, x, y = make(kind)
    ref = reference_for(model)
    expected = loop_grads(model, x, y)
    probe = probe_batch(model, loss_fn, x, y, reference=ref, method=method)
    for name, g in expected.items():
        flat = g.flatten(start_dim=1)
        torch.testing.assert_close(probe.dots[name], flat @ ref[name].reshape(-1), rtol=1e-9,
                                   atol=1e-12)  # fmt: skip
        torch.testing.assert_close(probe.sq_norms[name], flat.square().sum(1), rtol=1e-9,
                                   atol=1e-12)  # fmt: skip
        torch.testing.assert_close(probe.grad[name], g.mean(dim=0), rtol=1e-9, atol=1e-12)
    if method == "auto":
        assert probe.plan["head.weight"].path == "ghost"
    rnn = [n for n in probe.plan if n.startswith("rnn.")]
    assert rnn and all(probe.plan[n].path == "vmap" for n in rnn)
    assert all("loop over examples" in probe.plan[n].reason for n in rnn)


def test_an_lstm_in_float32_matches_the_float64_loop_without_a_vmap_warning() -> None:
    model, x, y = make("lstm")
    expected = loop_grads(model, x, y)
    found = per_example_grads(model.float(), loss_fn, x.float(), y)  # warnings are errors here
    for name, g in expected.items():
        torch.testing.assert_close(found[name].double(), g, rtol=1e-4, atol=1e-6)


def test_per_example_dots_on_an_rnn_with_chunks_equal_those_without() -> None:
    model, x, y = make("gru_2_layers_bidirectional")
    ref = reference_for(model)
    whole = per_example_dots(model, loss_fn, x, y, reference=ref, method="vmap")
    chunked = per_example_dots(model, loss_fn, x, y, reference=ref, method="vmap", chunk_size=2)
    for got, want in zip(chunked, whole, strict=True):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14)


def test_rnn_dropout_in_training_mode_needs_randomness_and_same_gives_one_mask() -> None:
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM, batch_first=True, layers=2).double()
    model.rnn.dropout = 0.5
    x = torch.randn(1, 4, 3, dtype=torch.float64).expand(3, 4, 3).contiguous()  # one example x3
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(UnsupportedModelError, match=r"'rnn' \(LSTM, dropout=0.5\).*randomness"):
        per_example_grads(model, loss_fn, x, y)
    same = per_example_grads(model, loss_fn, x, y, randomness="same")["rnn.weight_ih_l0"]
    torch.testing.assert_close(same[1], same[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(same[2], same[0], rtol=1e-12, atol=1e-14)
    other = per_example_grads(model, loss_fn, x, y, randomness="different")["rnn.weight_ih_l0"]
    assert float((other[1] - other[0]).abs().max()) > 1e-6  # masks drawn per example


def test_probed_step_on_an_lstm_follows_the_loss_gradient() -> None:
    model, x, y = make("lstm_seq_first_2_layers_bidirectional")
    plain = copy.deepcopy(model)
    xt, yt = torch.flip(x, dims=(0,)), torch.flip(y, dims=(0,))
    out = probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        Objective(F.cross_entropy, x, (y,)),
        Objective(F.cross_entropy, xt, (yt,)),
    )
    F.cross_entropy(plain(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad, rtol=1e-9, atol=1e-12,
                                   msg=name)  # fmt: skip
    assert out.example_cosine.shape == (BATCH,)
