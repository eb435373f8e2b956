"""Support-restricted removal and the matched-support control beyond the shared properties.

The case they were built for: a training gradient that is exactly zero on some
rows (logits the loss never reads), and a reference that is not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from gradlens.errors import GradlensError
from gradlens.transforms import per_model, remove_aligned, remove_random, scale_aligned


def class_rows() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``g`` zero on the output layer's first 3 rows; ``r`` dense; float64."""
    gen = torch.Generator().manual_seed(1)
    g = {
        "0.weight": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "1.weight": torch.randn(5, 4, generator=gen, dtype=torch.float64),
    }
    g["1.weight"][:3] = 0.0
    r = {name: torch.randn(v.shape, generator=gen, dtype=torch.float64) for name, v in g.items()}
    return g, r


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def test_global_removal_writes_into_the_zero_rows_and_support_removal_does_not() -> None:
    g, r = class_rows()
    tx, on = remove_aligned(), remove_aligned(on_support=True)
    plain, _ = tx.update(g, tx.init(g), reference=r)
    support, state = on.update(g, on.init(g), reference=r)
    scale = float(dot(g, g).sqrt() * dot(r, r).sqrt())
    for out in (plain, support):
        assert abs(float(dot(out, r))) <= 1e-12 * scale  # both exactly orthogonal to r
    assert plain["1.weight"][:3].abs().min() > 0
    assert torch.equal(support["1.weight"][:3], torch.zeros(3, 4, dtype=torch.float64))
    restricted = {"0.weight": r["0.weight"], "1.weight": r["1.weight"].clone()}
    restricted["1.weight"][:3] = 0.0
    c = dot(g, r) / dot(restricted, restricted)
    assert_close(state.coef, c)
    assert_close(support, {n: g[n] - c * restricted[n] for n in g})


def test_a_reference_with_nothing_on_the_support_leaves_the_gradient() -> None:
    g = {"w": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)}
    r = {"w": torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)}
    for tx in (scale_aligned(-1.0, on_support=True), remove_random(0, on_support=True)):
        out, state = tx.update(g, tx.init(g), reference=r)
        assert torch.equal(out["w"], g["w"])
        assert float(state.acted) == 0.0


def test_sign_permuted_control_matches_support_magnitudes_and_removed_norm() -> None:
    g, r = class_rows()
    control = remove_random(3, direction="sign_permuted", on_support=True)
    removal = remove_aligned(on_support=True)
    out, state = control.update(g, control.init(g), reference=r)
    removed, _ = removal.update(g, removal.init(g), reference=r)
    step = {n: g[n] - out[n] for n in g}
    true_step = {n: g[n] - removed[n] for n in g}
    for name in g:  # the same magnitude in every entry, so the same support and norm
        assert_close(step[name].abs(), true_step[name].abs())
    assert not torch.allclose(step["0.weight"], true_step["0.weight"])  # but other signs
    assert_close(state.removed_norm, dot(true_step, true_step).sqrt())
    again, _ = control.update(g, control.init(g), reference=r)
    assert torch.equal(again["0.weight"], out["0.weight"])
    later, _ = control.update(g, state, reference=r)
    assert not torch.equal(later["0.weight"], out["0.weight"])


def test_unknown_direction_is_refused() -> None:
    with pytest.raises(ValueError, match="direction must be one of"):
        remove_random(0, direction="uniform")  # type: ignore[arg-type]


def test_sign_permuted_under_vmap_is_refused_with_the_fix() -> None:
    g = {"w": torch.ones(3, 4)}
    tx = per_model(remove_random(0, direction="sign_permuted"))
    with pytest.raises(GradlensError, match=r"vectorize=False"):
        tx.update(g, tx.init(g), reference=g)


def test_the_causal_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "causal.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/causal.md", "exec"), {"__name__": "docs_causal"})
    printed = [float(v) for v in capsys.readouterr().out.split()]
    assert printed[0] > 0 and printed[1] == 0.0  # global writes into the zero rows; support not
