"""The analyses of Soups §3.2 and its appendices on a real pool: small MLPs fine-tuned on digits."""

import math

import matplotlib
import pytest
import torch
from sklearn.datasets import load_digits
from toy_mlp import mlp as _mlp
from toy_mlp import train as _train

from mmsoup import analysis, plots
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator, accuracy
from mmsoup.soups import greedy_soup, uniform_soup

LRS = [0.02, 0.05, 0.1, 0.2]


@pytest.fixture(scope="module")
def toy(one_thread):
    """θ_0 (a short pretraining) then four fine-tunes of it; evaluators on two digit splits."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    init = _train(_mlp(), x[:1200], y[:1200], seed=100, lr=0.05, steps=30)
    pool = [init]
    for seed, lr in enumerate(LRS):
        model = _mlp()
        model.load_state_dict(init)
        pool.append(_train(model, x[:1200], y[:1200], seed, lr, steps=30))
    heldout = Evaluator(_mlp(), x[1200:1500], y[1200:1500], device="cpu")
    test = Evaluator(_mlp(), x[1500:], y[1500:], device="cpu")
    return {"pool": pool, "ev": heldout, "test": test}


def _close(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_plane_basis_is_orthonormal_and_reproduces_the_three_models(toy):
    theta0, a, b = toy["pool"][:3]
    p = analysis.plane(theta0, a, b)
    assert float(p.u.norm()) == pytest.approx(1.0)
    assert float(p.v.norm()) == pytest.approx(1.0)
    assert float(torch.dot(p.u, p.v)) == pytest.approx(0.0, abs=1e-12)
    assert _close(p.point(0.0, 0.0), theta0, atol=0)
    for model in (a, b):
        assert _close(p.point(*p.coords(model)), model)
    xa, ya = p.coords(a)
    assert ya == pytest.approx(0.0, abs=1e-9)  # u is along θ_a - θ_0
    assert xa == pytest.approx(float(analysis.flat_update(theta0, a).norm()))


def test_a_plane_through_collinear_models_is_refused(toy):
    theta0, a = toy["pool"][:2]
    double = {k: theta0[k] + 2 * (a[k] - theta0[k]) for k in a}
    with pytest.raises(MMSoupError, match="one line"):
        analysis.plane(theta0, a, double)


def test_the_error_landscape_marks_the_models_at_their_own_accuracy(toy):
    pool, ev = toy["pool"], toy["ev"]
    land = analysis.error_landscape(pool[0], pool[1], pool[2], ev, grid=3, progress=False)
    assert (land["point"] == "grid").sum() == 9
    marks = land[land["point"] != "grid"].set_index("point")
    assert marks.loc["θ_0", "acc"] == pytest.approx(100 * ev(pool[0]))
    assert marks.loc["θ_a", "acc"] == pytest.approx(100 * ev(pool[1]))
    assert marks.loc["average", "acc"] == pytest.approx(100 * ev(uniform_soup(pool[1:3])), abs=0.5)
    grid = land[land["point"] == "grid"]
    assert grid["x"].min() < 0 < grid["x"].max()  # the lattice covers θ_0 with a margin
    assert (land["error"] == 100 - land["acc"]).all()


def test_the_angle_of_an_update_with_itself_is_0_and_with_its_opposite_180(toy):
    theta0, a, b = toy["pool"][:3]
    opposite = {k: 2 * theta0[k] - a[k] for k in a}
    assert analysis.update_angle(theta0, a, a) == pytest.approx(0.0, abs=1e-3)
    assert analysis.update_angle(theta0, a, opposite) == pytest.approx(180.0, abs=1e-3)
    ua, ub = analysis.flat_update(theta0, a), analysis.flat_update(theta0, b)
    by_hand = math.degrees(math.acos(float(ua @ ub / (ua.norm() * ub.norm()))))
    assert analysis.update_angle(theta0, a, b) == pytest.approx(by_hand)


def test_the_angle_to_an_unchanged_model_is_refused(toy):
    theta0, a = toy["pool"][:2]
    with pytest.raises(MMSoupError, match="undefined"):
        analysis.update_angle(theta0, a, theta0)


def test_pair_table_matches_a_hand_computation(toy):
    pool, ev = toy["pool"], toy["ev"]
    pairs = analysis.pair_table(pool, ev, lr=[float("nan"), *LRS], progress=False)
    assert len(pairs) == 6 and "model_0" not in set(pairs["a"]) | set(pairs["b"])
    row = pairs[(pairs["a"] == "model_1") & (pairs["b"] == "model_3")].iloc[0]
    acc1, acc3 = ev(pool[1]), ev(pool[3])
    mid = ev({k: (pool[1][k] + pool[3][k]) / 2 for k in pool[1]})
    assert row["acc_a"] == pytest.approx(100 * acc1)
    assert row["soup"] == pytest.approx(100 * mid)
    assert row["advantage"] == pytest.approx(100 * (mid - (acc1 + acc3) / 2))
    ev.load(pool[1])
    z1 = ev.logits()
    ev.load(pool[3])
    z3 = ev.logits()
    assert row["ensemble"] == pytest.approx(100 * accuracy((z1 + z3) / 2, ev.labels))
    assert row["angle"] == pytest.approx(analysis.update_angle(pool[0], pool[1], pool[3]))
    assert row["pair_lr"] == pytest.approx(math.sqrt(LRS[0] * LRS[2]))


def test_random_order_ends_at_the_uniform_and_greedy_soup_of_all(toy):
    pool, ev, test = toy["pool"], toy["ev"], toy["test"]
    curves = analysis.random_order_soups(pool, ev, seeds=(0, 1), test_acc=test, progress=False)
    assert len(curves) == 2 * len(pool)
    last = curves[curves["k"] == len(pool)]
    assert (last["uniform"] == 100 * ev(uniform_soup(pool))).all()
    assert (last["uniform_test"] == 100 * test(uniform_soup(pool))).all()
    greedy = greedy_soup(pool, ev, progress=False)
    assert last["greedy"].tolist() == pytest.approx([100 * greedy.val_acc] * 2)
    assert (last["greedy_size"] == len(greedy.ingredients)).all()
    for _, c in curves.groupby("seed"):
        assert sorted(c["added"]) == [f"model_{i}" for i in range(len(pool))]  # a permutation
        assert (c["greedy"] >= c["best"]).all()  # held-out: greedy never falls below its start
        assert c["best"].is_monotonic_increasing


def test_random_order_is_deterministic_for_a_seed_and_varies_across_seeds(toy):
    pool, ev = toy["pool"], toy["ev"]
    one = analysis.random_order_soups(pool, ev, seeds=(3,), progress=False)
    again = analysis.random_order_soups(pool, ev, seeds=(3,), progress=False)
    other = analysis.random_order_soups(pool, ev, seeds=(4,), progress=False)
    assert one.equals(again)
    assert list(one["added"]) != list(other["added"])


def test_wise_curves_start_at_the_init_and_end_at_each_model(toy):
    pool, ev, test = toy["pool"], toy["ev"], toy["test"]
    models = {"model_1": pool[1], "model_4": pool[4]}
    sets = {"test": test, "heldout": ev}
    wise = analysis.wise_curves(
        pool[0],
        models,
        sets,
        alphas=(0.5,),
        soups={"Uniform soup": uniform_soup(pool)},
        progress=False,
    )
    curves = wise[wise["kind"] == "WiSE-FT"]
    assert sorted(curves["alpha"].unique()) == [0.0, 0.5, 1.0]
    for name, model in models.items():
        c = curves[curves["curve"] == name].set_index("alpha")
        assert c.loc[0.0, "ID"] == pytest.approx(100 * test(pool[0]))
        assert c.loc[1.0, "ID"] == 100 * test(model)
        assert c.loc[1.0, "OOD"] == 100 * ev(model)  # the other set(s), averaged
        half = {k: torch.lerp(pool[0][k], model[k], 0.5) for k in model}
        assert c.loc[0.5, "ID"] == pytest.approx(100 * test(half))
    soup = wise[wise["kind"] == "soup"].iloc[0]
    assert soup["ID"] == pytest.approx(100 * test(uniform_soup(pool)))


def test_subset_evaluates_a_seeded_subset_on_the_same_model(toy):
    ev = toy["ev"]
    sub = analysis.subset(ev, 100, seed=1)
    assert sub.n == 100 and sub.model is ev.model
    assert torch.equal(sub.labels, analysis.subset(ev, 100, seed=1).labels)
    assert analysis.subset(ev, None) is ev


def test_every_plot_is_a_figure_that_renders(toy, tmp_path):
    pool, ev, test = toy["pool"], toy["ev"], toy["test"]
    pairs = analysis.pair_table(pool, ev, lr=[float("nan"), *LRS], progress=False)
    land = analysis.error_landscape(pool[0], pool[1], pool[2], ev, grid=3, progress=False)
    curves = analysis.random_order_soups(pool, ev, seeds=(0,), test_acc=test, progress=False)
    wise = analysis.wise_curves(
        pool[0], {"model_1": pool[1]}, {"test": test, "h": ev}, (0.5,), progress=False
    )
    figs = [
        plots.plot_error_landscape(land),
        plots.plot_interpolation_advantage(pairs),
        plots.plot_ensemble_vs_soup(pairs),
        plots.plot_ensemble_vs_soup(pairs.drop(columns=["pair_lr"])),
        plots.plot_random_order(curves),
        plots.plot_wise_curves(wise),
    ]
    for i, fig in enumerate(figs):
        assert isinstance(fig, matplotlib.figure.Figure)
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").stat().st_size > 5000
