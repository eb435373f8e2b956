"""Real models as clients: a tiny Hugging Face GPT-2 and torchvision ResNets, own outputs.

Every value is checked against a float64 per-example ``torch.autograd.grad``
loop that calls the model as its user would (``model(x).logits``). Nothing is
downloaded: the models are built from configs with random weights.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import (
    Objective,
    ghost_plan,
    per_example_dots,
    per_example_grads,
    probe_batch,
    probed_step,
)
from gradlens.errors import UnsupportedModelError
from gradlens.probes import mean_grad, per_example_losses
from gradlens.transforms import remove_aligned

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

# torch has no vmap batching rule for the CPU flash-attention kernel that GPT-2's
# default "sdpa" attention calls; it falls back to a loop and says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

Selector = Callable[[object], Tensor]


def gpt2_tiny() -> nn.Module:
    """The issue's GPT-2: 2 layers, width 32, vocabulary 50, random weights, float64, eval."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over every token of the batch."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def tokens(batch: int = 4, length: int = 8) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, 50, (batch, length), generator=gen),
        torch.randint(0, 50, (batch, length), generator=gen),
    )


def loop(
    model: nn.Module, loss_fn: Callable[..., Tensor], x: Tensor, y: Tensor, pick: Selector
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example losses and gradients, one forward and ``autograd.grad`` per example."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses, rows = [], []
    for i in range(x.shape[0]):
        loss = loss_fn(pick(model(x[i : i + 1])), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, [p for _, p in named]))
        losses.append(loss.detach())
    return torch.stack(losses), {
        n: torch.stack([r[k] for r in rows]) for k, (n, _) in enumerate(named)
    }


def reference_for(model: nn.Module) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()
    }


def assert_dots(
    got: tuple[dict[str, Tensor], dict[str, Tensor]],
    grads: dict[str, Tensor],
    ref: dict[str, Tensor],
) -> None:
    dots, sq_norms = got
    assert dots.keys() == grads.keys() == sq_norms.keys()
    for name, g in grads.items():
        flat = g.flatten(start_dim=1)
        torch.testing.assert_close(dots[name], flat @ ref[name].flatten(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sq_norms[name], flat.square().sum(1), rtol=1e-9, atol=1e-12)


# --- GPT-2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_case() -> tuple[nn.Module, Tensor, Tensor, dict[str, Tensor], Tensor]:
    model = gpt2_tiny()
    x, y = tokens()
    losses, grads = loop(model, lm_loss, x, y, lambda out: out.logits)
    return model, x, y, grads, losses


def test_gpt2_without_a_selector_says_how_to_pass_one(gpt2_case: tuple) -> None:
    model, x, y, *_ = gpt2_case
    with pytest.raises(UnsupportedModelError, match=r"output='logits'") as err:
        per_example_grads(model, lm_loss, x, y)
    assert "CausalLMOutputWithCrossAttentions" in str(err.value)


def test_gpt2_per_example_grads_match_the_loop(gpt2_case: tuple) -> None:
    model, x, y, grads, _ = gpt2_case
    got = per_example_grads(model, lm_loss, x, y, output="logits")
    assert got.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_gpt2_dots_match_the_loop(gpt2_case: tuple, method: str) -> None:
    model, x, y, grads, _ = gpt2_case
    ref = reference_for(model)
    pick: Selector = lambda out: out.logits  # noqa: E731  (the callable form of the selector)
    got = per_example_dots(model, lm_loss, x, y, reference=ref, method=method, output=pick)
    assert_dots(got, grads, ref)


def test_gpt2_probe_batch_matches_the_loop(gpt2_case: tuple) -> None:
    model, x, y, grads, losses = gpt2_case
    ref = reference_for(model)
    probe = probe_batch(model, lm_loss, x, y, reference=ref, output="logits")
    torch.testing.assert_close(probe.losses, losses, rtol=1e-9, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(probe.grad[name], g.mean(0), rtol=1e-9, atol=1e-12)
    assert_dots((probe.dots, probe.sq_norms), grads, ref)
    assert probe.plan.keys() == grads.keys()


def test_the_kv_cache_is_off_while_probing_and_restored_after(gpt2_case: tuple) -> None:
    model, x, y, *_ = gpt2_case
    seen: list[object] = []

    def pick(out: object) -> Tensor:
        seen.append(getattr(out, "past_key_values", None))
        return out.logits  # type: ignore[attr-defined]

    assert model.config.use_cache
    assert model(x).past_key_values is not None  # the model's own default keeps a cache
    per_example_dots(model, lm_loss, x, y, reference=reference_for(model), output=pick)
    mean_grad(model, lm_loss, x, y, output=pick)
    assert seen and all(cache is None for cache in seen)
    assert model.config.use_cache  # restored


def test_gpt2_probed_step_with_remove_aligned(gpt2_case: tuple) -> None:
    model, x, y, *_ = gpt2_case
    model = gpt2_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = remove_aligned()
    state = before.init(dict(model.named_parameters()))
    out = probed_step(
        model,
        opt,
        Objective(lm_loss, x, (y,)),
        Objective(lm_loss, x[:2].flip(1), (y[:2],)),
        before=before,
        before_state=state,
        output="logits",
    )
    for key, value in out.records.items():
        assert torch.isfinite(value).all(), key
    assert out.example_cosine.shape == (4,) and torch.isfinite(out.example_cosine).all()
    assert abs(float(out.records["update_cosine"])) < 1e-9  # the update is orthogonal to g_t
    assert float(out.records["measured_change"]) != 0.0


def test_gpt2_in_training_mode_needs_randomness_from_probed_step() -> None:
    model = gpt2_tiny().train()
    x, y = tokens()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, trait = Objective(lm_loss, x, (y,)), Objective(lm_loss, x[:2], (y[:2],))
    with pytest.raises(UnsupportedModelError, match="randomness='different'"):
        probed_step(model, opt, train, trait, output="logits")
    # With dropout GPT-2's flattened (example, token) axes cannot be checked, so its plan
    # would mix ghost and vmap parameters (dots from two sets of masks); vmap for all is
    # modelled cheaper, so auto takes it (tests/probes/test_cost.py has the refusal).
    auto = probed_step(model, opt, train, trait, output="logits", randomness="different")
    assert torch.isfinite(auto.example_cosine).all()
    out = probed_step(
        model, opt, train, trait, output="logits", randomness="different", method="vmap"
    )
    assert torch.isfinite(out.example_cosine).all()


# --- torchvision ResNet ---------------------------------------------------------------------


def resnet(norm: str) -> nn.Module:
    torch.manual_seed(0)
    norm_layer = (lambda c: nn.GroupNorm(2, c)) if norm == "group" else None
    model = torchvision.models.resnet18(num_classes=10, norm_layer=norm_layer)
    if norm == "batch":  # give eval-mode BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


def images(batch: int = 3, side: int = 32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, side, side, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 10, (batch,), generator=gen)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet18_smoke(norm: str) -> None:
    """Fast (float32, 16x16 images): the probes agree, and a probed step runs."""
    model = resnet(norm).float()
    x, y = images(4, side=16)
    x = x.float()
    ref = {n: r.float() for n, r in reference_for(model).items()}
    grads = per_example_grads(model, F.cross_entropy, x, y)
    dots, sq_norms = per_example_dots(model, F.cross_entropy, x, y, reference=ref)
    for name, g in grads.items():
        flat = g.flatten(start_dim=1)
        torch.testing.assert_close(dots[name], flat @ ref[name].flatten(), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(sq_norms[name], flat.square().sum(1), rtol=1e-3, atol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = remove_aligned()
    out = probed_step(
        model,
        opt,
        Objective(F.cross_entropy, x[:3], (y[:3],)),
        Objective(F.cross_entropy, x[3:], (y[3:],)),
        before=before,
        before_state=before.init(dict(model.named_parameters())),
    )
    for key, value in out.records.items():
        assert torch.isfinite(value).all(), key
    assert abs(float(out.records["update_cosine"])) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet18_matches_the_loop(norm: str) -> None:
    model = resnet(norm)
    x, y = images()
    ref = reference_for(model)
    losses, grads = loop(model, F.cross_entropy, x, y, lambda out: out)
    got = per_example_grads(model, F.cross_entropy, x, y, chunk_size=2)
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12)
    for method in ("auto", "vmap"):
        assert_dots(per_example_dots(model, F.cross_entropy, x, y, reference=ref, method=method),
                    grads, ref)  # fmt: skip
    probe = probe_batch(model, F.cross_entropy, x, y, reference=ref)
    torch.testing.assert_close(probe.losses, losses, rtol=1e-9, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(probe.grad[name], g.mean(0), rtol=1e-9, atol=1e-12)
    assert_dots((probe.dots, probe.sq_norms), grads, ref)


def test_batchnorm_in_training_mode_is_refused_naming_the_fix() -> None:
    model = resnet("batch").float().train()
    x, y = images(2, side=16)
    with pytest.raises(UnsupportedModelError, match=r"model\.eval\(\)"):
        per_example_dots(model, F.cross_entropy, x.float(), y, reference=reference_for(model))


# --- the selector itself ----------------------------------------------------------------------


class Returns(nn.Module):
    """A linear model that returns its logits inside a dict, a tuple or an object."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> object:
        logits = self.lin(x)
        if self.kind == "dict":
            return {"hidden": x, "logits": logits}
        if self.kind == "tuple":
            return (x.sum(1), logits)
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)


@pytest.mark.parametrize(
    ("kind", "output"),
    [("dict", "logits"), ("tuple", 1), ("tuple", -1), ("model_output", "logits"),
     ("model_output", 0), ("dict", lambda out: out["logits"])],
)  # fmt: skip
def test_every_selector_form_gives_the_loops_gradients(kind: str, output: object) -> None:
    torch.manual_seed(0)
    model = Returns(kind).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    pick = {"dict": lambda o: o["logits"], "tuple": lambda o: o[1]}.get(kind, lambda o: o.logits)
    losses, grads = loop(model, F.cross_entropy, x, y, pick)
    got = per_example_grads(model, F.cross_entropy, x, y, output=output)
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12)
    ref = reference_for(model)
    for method in ("auto", "ghost", "vmap"):
        found = per_example_dots(model, F.cross_entropy, x, y, reference=ref, method=method,
                                 output=output)  # fmt: skip
        assert_dots(found, grads, ref)
    with torch.no_grad():
        seen = per_example_losses(F.cross_entropy, model(x), y, output=output)
    torch.testing.assert_close(seen, losses)
    assert ghost_plan(model, x, output=output)["lin.weight"].path == "ghost"


@pytest.mark.parametrize(
    ("kind", "output", "match"),
    [
        ("dict", None, r"keys \['hidden', 'logits'\].*output="),
        ("tuple", None, r"tuple of \['Tensor', 'Tensor'\].*output=0"),
        ("dict", "scores", r"output='scores' names nothing.*keys \['hidden', 'logits'\]"),
        ("tuple", 5, r"output=5 is no index"),
        ("dict", lambda out: (out["logits"],), r"gave a tuple, not a tensor"),
    ],
)
def test_a_wrong_selector_is_named_with_what_the_model_returned(
    kind: str, output: object, match: str
) -> None:
    model = Returns(kind)
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    with pytest.raises(UnsupportedModelError, match=match):
        per_example_grads(model, F.cross_entropy, x, y, output=output)
    with pytest.raises(UnsupportedModelError, match=match):
        probe_batch(model, F.cross_entropy, x, y, reference=reference_for(model), output=output)


def test_a_selector_of_the_wrong_type_is_a_type_error() -> None:
    model = Returns("dict")
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    with pytest.raises(TypeError, match="output must be"):
        per_example_grads(model, F.cross_entropy, x, y, output=1.5)  # type: ignore[arg-type]
