"""The λ explorer driven headlessly: set sliders, read readouts, reset to λ*."""

from __future__ import annotations

import numpy as np
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


# -- which MMS step the explorer opens on (a real pool: small MLPs fine-tuned on sklearn digits) --
@pytest.fixture(scope="module")
def digits_mms(tmp_path_factory):
    """Six fine-tunes of one init saved as files, their held-out evaluator and their MMS soup."""
    from sklearn.datasets import load_digits
    from toy_mlp import COMPS, mlp, train

    from mmsoup.checkpoints import save_state_dict
    from mmsoup.soups import manifold_mixing_soup

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    init = train(mlp(), x[:1200], y[:1200], seed=100, lr=0.05, steps=40)
    folder = tmp_path_factory.mktemp("digits_pool")
    paths = []
    for seed, (lr, steps) in enumerate(
        [(0.05, 40), (0.1, 30), (0.03, 60), (0.08, 40), (0.05, 25), (0.1, 50)]
    ):
        model = mlp()
        model.load_state_dict(init)
        paths.append(folder / f"model_{seed}.safetensors")
        save_state_dict(train(model, x[:1200], y[:1200], seed, lr, steps), paths[-1])
    ev = Evaluator(mlp(), x[1500:], y[1500:], device="cpu")
    # τ = 0: every candidate is optimised, so MMS accepts two (one of them at λ0 for all)
    res = manifold_mixing_soup(paths, ev, COMPS, tau=0.0, budget=60, progress=False)
    meta = {
        "info": res.info,
        "ingredients": res.ingredients,
        "ingredient_val_accs": res.ingredient_val_accs,
    }
    return {"paths": paths, "ev": ev, "comps": COMPS, "meta": meta}


def test_the_explorer_opens_on_the_step_whose_lambda_star_differs_most_between_components(
    digits_mms,
):
    from mmsoup.widgets import explorer_inputs, mms_steps, most_uneven_step

    d = digits_mms
    info = d["meta"]["info"]
    steps = mms_steps(info)
    assert len(steps) >= 2, "the pool should give MMS more than one accepted step to choose from"
    m = len(d["comps"])
    spreads = [float(np.std(lam[:m])) for _, lam in steps]  # REST (λ0, last) does not count
    k, spread = most_uneven_step(info)
    assert spread == max(spreads) and spreads[k] == spread and spread > 0
    assert k < len(steps) - 1, "here the last step mixed every component alike: not shown first"
    assert most_uneven_step(info, over=[0]) == (len(steps) - 1, 0.0)  # one λ: a tie, the later

    a, b, lam, names, (step, n) = explorer_inputs(d["paths"], d["comps"], d["meta"])
    assert (step, n) == (k + 1, len(steps)) and names == ("fused", steps[k][0])
    assert lam == steps[k][1][:m]
    explorer = LambdaExplorer(a, b, d["comps"], {"heldout": d["ev"]}, lambda_star=lam)
    accepted = [x for x in info["decisions"] if x["decision"] == "accepted"]
    # at λ* the panel shows Ψ after that step, exactly (its REST mixed at λ0 as MMS did)
    assert explorer.readouts()["accuracy"][0] == pytest.approx(100 * accepted[k]["best_acc"])


def test_another_step_can_still_be_chosen_and_a_wrong_one_is_one_clear_error(digits_mms):
    from mmsoup.widgets import explorer_inputs, mms_steps

    d = digits_mms
    steps = mms_steps(d["meta"]["info"])
    accepted = [x for x in d["meta"]["info"]["decisions"] if x["decision"] == "accepted"]
    for step in (1, -1):
        a, b, lam, names, (k, n) = explorer_inputs(d["paths"], d["comps"], d["meta"], step)
        assert k == (1 if step == 1 else len(steps)) and names[1] == steps[k - 1][0]
        explorer = LambdaExplorer(a, b, d["comps"], {"heldout": d["ev"]}, lambda_star=lam)
        assert explorer.readouts()["accuracy"][0] == pytest.approx(
            100 * accepted[k - 1]["best_acc"]
        )
    with pytest.raises(MMSoupError, match="accepted step"):
        explorer_inputs(d["paths"], d["comps"], d["meta"], len(steps) + 1)


def test_the_static_figure_draws_accuracy_along_one_lambda_and_leaves_lambda_star(explorer):
    explorer.reset()
    before = explorer.readouts()
    fig = explorer.static_figure(n_components=2, points=5)
    bars, curves = fig.axes[0], fig.axes[1]
    assert [round(p.get_width(), 3) for p in bars.patches] == [0.7, 0.2, 0.5]
    lines = [ln for ln in curves.get_lines() if len(ln.get_xdata()) == 5]
    assert len(lines) == 2  # the two components furthest from the median λ* (0.5): 0.2, 0.7
    short = [
        n.replace("model.visual.", "visual.").replace("model.", "") for n in explorer.components
    ]
    assert {ln.get_label() for ln in lines} == {short[0], short[1]}
    # each curve is the readout of the model mixed at that λ, the others at λ*
    comp = short.index(lines[0].get_label())
    lam = list(explorer.lambda_star)
    lam[comp] = 1.0
    expected = explorer.set_lambdas(lam)["heldout"]
    assert lines[0].get_ydata()[-1] == pytest.approx(expected)
    explorer.reset()
    assert explorer.readouts().equals(before)


def test_the_summary_compares_lambda_star_with_the_plain_average(explorer):
    explorer.reset()
    lines = explorer.summary()
    assert "λ* ranges from 0.200 to 0.700" in lines[1]
    plain = explorer.set_lambdas([0.5, 0.5, 0.5])  # no step: λ0 is the median λ*
    star = explorer.reset()
    expected = f"heldout {star['heldout'] - plain['heldout']:+.2f}"
    assert expected in lines[2]
    assert "2 of 3 components left" in lines[1]
