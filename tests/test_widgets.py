"""The λ explorer driven headlessly: set sliders, read readouts, reset to λ*."""

from __future__ import annotations

import pytest
import torch

from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator
from mmsoup.models import create_classifier
from mmsoup.partition import partition
from mmsoup.soups import interpolate
from mmsoup.widgets import LambdaExplorer


@pytest.fixture(scope="module")
def explorer() -> LambdaExplorer:
    """Two different tiny ViTs mixed over C8+live, scored on two small labelled sets."""
    a, b = create_classifier(seed=1), create_classifier(seed=2)
    gen = torch.Generator().manual_seed(0)
    sets = {
        name: (
            torch.randn(64, 3, 28, 28, generator=gen),
            torch.randint(0, 10, (64,), generator=gen),
        )
        for name in ("heldout", "test")
    }
    model = create_classifier(seed=3)
    evaluators = {n: Evaluator(model, x, y, device="cpu") for n, (x, y) in sets.items()}
    comps = partition(model.state_dict(), "C8+live", model=model)
    return LambdaExplorer(
        a.state_dict(), b.state_dict(), comps, evaluators, lambda_star=[0.7, 0.2, 0.5]
    )


def test_one_slider_per_live_component_starting_at_lambda_star(explorer):
    assert [s.value for s in explorer.sliders] == [0.7, 0.2, 0.5]
    assert len(explorer.sliders) == len(explorer.components) == 3
    assert not explorer.sliders[0].continuous_update  # recompute on release, not on every drag step


def test_readouts_match_a_model_rebuilt_from_the_lambdas(explorer):
    explorer.set_lambdas([1.0, 0.0, 0.3])
    mixed = interpolate(explorer.model_a, explorer.model_b, explorer.components, [1.0, 0.0, 0.3])
    ref = create_classifier(seed=9).eval()
    ref.load_state_dict(mixed)
    ev = explorer.evaluators["test"]
    with torch.inference_mode():
        expected = (ref(ev.images).argmax(1) == ev.labels).float().mean().item()
    got = explorer.readouts().set_index("set")["accuracy"]
    assert got["test"] == pytest.approx(100 * expected)


def test_moving_a_slider_recomputes_and_reset_restores(explorer):
    explorer.reset()
    start = explorer.readouts()
    updates = explorer.n_updates
    explorer.sliders[0].value = 0.0  # as a user releasing the slider
    assert explorer.n_updates == updates + 1
    assert explorer.lambdas[0] == 0.0
    moved = explorer.readouts()
    explorer._reset.click()
    assert [s.value for s in explorer.sliders] == [0.7, 0.2, 0.5]
    assert explorer.readouts().equals(start)
    assert explorer.set_lambdas([0.0, 0.2, 0.5]) == dict(zip(moved["set"], moved["accuracy"]))


def test_bad_lambdas_are_one_clear_error(explorer):
    with pytest.raises(MMSoupError, match="lie in"):
        explorer.set_lambdas([1.5, 0.0, 0.0])
    with pytest.raises(MMSoupError, match="one per component"):
        explorer.set_lambdas([0.5])
