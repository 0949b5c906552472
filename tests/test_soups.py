"""Soup recipes on a real pool: small MLPs fine-tuned from one init on sklearn digits."""

import os

import nevergrad as ng
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from toy_mlp import COMPS
from toy_mlp import mlp as _mlp
from toy_mlp import train as _train

from mmsoup import lambda_search, soups, widgets
from mmsoup.checkpoints import read_sidecar, save_state_dict
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator, accuracy
from mmsoup.soups import (
    ensemble_logits,
    greedy_ensemble,
    greedy_soup,
    logit_ensemble,
    manifold_mixing_soup,
    mix_from_weights,
    uniform_soup,
    wise_ft,
)


@pytest.fixture(scope="module")
def digits():
    """A pretrained init, six fine-tunes of it (different seeds/lr/steps), a held-out evaluator."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    xtr, ytr = x[:1200], y[:1200]
    init = _train(_mlp(), xtr, ytr, seed=100, lr=0.05, steps=40)
    pool = []
    for seed, (lr, steps) in enumerate(
        [(0.05, 40), (0.1, 30), (0.03, 60), (0.08, 40), (0.05, 25), (0.1, 50)]
    ):
        model = _mlp()
        model.load_state_dict(init)
        pool.append(_train(model, xtr, ytr, seed, lr, steps))
    ev = Evaluator(_mlp(), x[1200:1500], y[1200:1500], device="cpu")
    return {"init": init, "pool": pool, "ev": ev, "x": x[1200:1500], "y": y[1200:1500]}


def _plain_acc(digits):
    """A reference val_acc: a fresh model, load_state_dict, a plain forward."""

    def val_acc(state):
        model = _mlp()
        model.load_state_dict(state)
        with torch.no_grad():
            return accuracy(model(digits["x"]), digits["y"])

    return val_acc


def _noisy(state: dict, std: float) -> dict:
    """A ruined ingredient (a diverged run): big fixed noise on every weight."""
    g = torch.Generator().manual_seed(7)
    return {k: v + std * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uniform_soup_is_the_mean(digits):
    pool = digits["pool"]
    soup = uniform_soup(pool)
    for k in soup:
        assert torch.allclose(soup[k], torch.stack([p[k] for p in pool]).mean(0), atol=1e-7)
        assert soup[k].dtype == pool[0][k].dtype


def test_greedy_soup_never_accepts_a_non_improving_candidate(digits):
    pool, ev = digits["pool"], digits["ev"]
    accs = [ev(p) for p in pool]
    best = int(np.argmax(accs))
    noisy = _noisy(pool[0], 2.0)
    res = greedy_soup(pool + [dict(pool[best]), noisy], ev, progress=False)  # + a duplicate
    assert res.ingredients[0] == best and len(res.ingredients) > 1  # something real was added
    assert len(pool) not in res.ingredients  # the duplicate ties the best: strict > rejects it
    assert len(pool) + 1 not in res.ingredients
    running = res.ingredient_val_accs[best]
    for row in (r for r in res.trace if r["stage"] == "greedy"):
        assert (row["candidate"] in res.ingredients) == (row["acc"] > running)
        running = max(running, row["acc"])
    assert res.val_acc == running == ev(res.state_dict)
    mean = uniform_soup([pool[i] for i in res.ingredients])
    assert all(torch.allclose(res.state_dict[k], mean[k], atol=1e-7) for k in mean)
    assert res.n_evals == len(res.trace) == 2 * (len(pool) + 2) - 1


def test_mms_skips_a_candidate_failing_the_tau_test_after_one_evaluation(digits):
    pool, ev = digits["pool"], digits["ev"]
    noisy = _noisy(pool[0], 3.0)
    res = manifold_mixing_soup(pool + [noisy], ev, COMPS, budget=40, progress=False)
    rows = [r for r in res.trace if r["candidate"] == len(pool) and r["stage"] != "ingredient"]
    assert len(rows) == 1 and rows[0]["stage"] == "approx"
    assert len(pool) not in res.ingredients
    assert res.n_evals == len(res.trace)


def test_mms_soup_is_rebuilt_from_its_weights_and_beats_the_best_ingredient(digits):
    pool, ev = digits["pool"], digits["ev"]
    res = manifold_mixing_soup(pool, ev, COMPS, budget=60, progress=False)
    assert len(res.ingredients) >= 2 and res.val_acc > max(res.ingredient_val_accs)
    assert res.ingredients[0] == int(np.argmax(res.ingredient_val_accs))
    assert set(res.weights) == set(COMPS) | {"_uncovered"}
    for w in res.weights.values():
        assert len(w) == len(pool) and sum(w) == pytest.approx(1.0, abs=1e-12)
        assert all(w[i] == 0 for i in range(len(pool)) if i not in res.ingredients)
    rebuilt = mix_from_weights(pool, COMPS, res.weights)
    assert all(torch.allclose(rebuilt[k], res.state_dict[k], atol=1e-6) for k in rebuilt)
    assert ev(res.state_dict) == res.val_acc  # the returned model is the evaluated one
    assert max(r["acc"] for r in res.trace) == res.val_acc
    seen = [(r["candidate"], tuple(r["lambdas"])) for r in res.trace if r["lambdas"]]
    assert len(seen) == len(set(seen))  # memoised: Cobyla's first ask (λ0) is not paid twice
    assert res.info["optimizers"][0]["optimizer"] == "Cobyla"  # NGOpt's pick at m=3, budget 60


def test_mms_records_lambda_star_per_step_and_replaying_the_steps_rebuilds_the_soup(digits):
    """MMS Alg. 1 replayed: Ψ ← best; Ψ ← Ψ'(λ*) for each accepted candidate, bit for bit."""
    pool, ev = digits["pool"], digits["ev"]
    res = manifold_mixing_soup(pool, ev, COMPS, budget=60, progress=False)
    steps = widgets.mms_steps(res.info)
    assert [c for c, _ in steps] == res.ingredients[1:] and len(steps) >= 1
    plan = dict(COMPS) | {
        "_uncovered": [k for k in pool[0] if all(k not in v for v in COMPS.values())]
    }
    psi = dict(pool[res.ingredients[0]])
    for k, (candidate, lam) in enumerate(steps, start=1):
        assert len(lam) == len(plan) and lam[-1] == k / (k + 1)  # REST stays at λ0
        psi = soups.interpolate(psi, pool[candidate], plan, lam)
    assert _equal(psi, res.state_dict)
    rejected = [d for d in res.info["decisions"] if d["decision"] == "rejected"]
    assert all(len(d["lambdas"]) == len(plan) and d["best_acc"] <= res.val_acc for d in rejected)
    old = {
        "decisions": [{k: v for k, v in d.items() if k != "lambdas"} for d in res.info["decisions"]]
    }
    with pytest.raises(MMSoupError, match="did not record λ\\* per step; rebuild it"):
        widgets.mms_steps(old)


def test_mms_fast_path_equals_plain_load_state_dict_path(digits):
    pool = digits["pool"]
    kw = dict(budget=30, optimizer="Cobyla", progress=False)
    fast = manifold_mixing_soup(pool, digits["ev"], COMPS, **kw)
    slow = manifold_mixing_soup(pool, _plain_acc(digits), COMPS, **kw)
    assert [r["acc"] for r in fast.trace] == [r["acc"] for r in slow.trace]
    assert _equal(fast.state_dict, slow.state_dict) and fast.ingredients == slow.ingredients


def test_mms_is_bit_identical_on_repeat(digits):
    pool, ev = digits["pool"], digits["ev"]
    comps = COMPS | {"fc2.b": ["2.bias"]}  # m=4, budget 250: NGOpt runs a CMA-based MetaModel
    runs = [manifold_mixing_soup(pool[:4], ev, comps, seed=3, progress=False) for _ in range(2)]
    assert "CmaFmin2" in runs[0].info["optimizers"][0]["optimizer"]
    assert _equal(runs[0].state_dict, runs[1].state_dict)
    assert runs[0].trace == runs[1].trace and runs[0].weights == runs[1].weights


def test_streamed_paths_give_the_same_soups_as_dicts(digits, tmp_path):
    pool, ev = digits["pool"][:4], digits["ev"]
    paths = [save_state_dict(p, tmp_path / f"model_{i}.safetensors") for i, p in enumerate(pool)]
    assert _equal(uniform_soup(paths), uniform_soup(pool))
    assert _equal(
        greedy_soup(paths, ev, progress=False).state_dict,
        greedy_soup(pool, ev, progress=False).state_dict,
    )
    kw = dict(budget=20, progress=False)
    a, b = manifold_mixing_soup(paths, ev, COMPS, **kw), manifold_mixing_soup(pool, ev, COMPS, **kw)
    assert _equal(a.state_dict, b.state_dict) and a.weights == b.weights
    assert _equal(
        mix_from_weights(paths, COMPS, a.weights), mix_from_weights(pool, COMPS, a.weights)
    )
    out = a.save(tmp_path / "soup.safetensors")
    side = read_sidecar(out)
    assert side["weights"] == a.weights and len(side["trace"]) == a.n_evals
    assert side["info"]["versions"]["nevergrad"]


def test_author_variant_accepts_ties_refines_and_bounds_lambda(digits):
    pool, ev = digits["pool"], digits["ev"]
    best = int(np.argmax([ev(p) for p in pool]))
    twins = [pool[best], dict(pool[best])]  # every mix of identical twins ties the best
    paper = manifold_mixing_soup(twins, ev, COMPS, budget=10, progress=False)
    author = manifold_mixing_soup(twins, ev, COMPS, variant="author", progress=False)
    # the author ranks ties in reverse input order (JrsContext.py sortIngredientModelsByAccuracy)
    assert paper.ingredients == [0] and author.ingredients == [1, 0]
    passes = [r["pass"] for r in author.info["optimizers"]]
    assert passes[:2] == ["pass1", "pass2"] and author.info["params"]["budget"] == 240
    res = manifold_mixing_soup(pool[:4], ev, COMPS, variant="author", refine=False, progress=False)
    lam0 = {r["candidate"]: r["lambdas"][0] for r in res.trace if r["stage"] == "approx"}
    rows = [r for r in res.trace if r["stage"] == "pass1"]
    assert rows and not [r for r in res.trace if r["stage"] == "pass2"]
    for row in rows:  # λ0 ± 0.5·(1 - λ0)
        lo, hi = 1.5 * lam0[row["candidate"]] - 0.5, 0.5 * lam0[row["candidate"]] + 0.5
        assert all(lo - 1e-9 <= v <= hi + 1e-9 for v in row["lambdas"])


def test_given_ingredient_accuracies_are_reused_not_recomputed(digits):
    pool, ev = digits["pool"], digits["ev"]
    accs = [ev(p) for p in pool]
    res = manifold_mixing_soup(pool, ev, COMPS, budget=5, ingredient_val_accs=accs, progress=False)
    assert res.ingredient_val_accs == accs
    assert not [r for r in res.trace if r["stage"] == "ingredient"]


def test_single_ingredient_is_returned_and_bad_arguments_raise(digits):
    pool, ev = digits["pool"], digits["ev"]
    res = manifold_mixing_soup(pool[:1], ev, COMPS, progress=False)
    assert _equal(res.state_dict, pool[0]) and res.ingredients == [0] and res.n_evals == 1
    calls = []
    with pytest.raises(MMSoupError, match="Unknown nevergrad optimizer"):
        manifold_mixing_soup(pool, lambda s: calls.append(1) or 0.5, COMPS, optimizer="NoSuchOpt")
    assert not calls  # refused before any evaluation
    with pytest.raises(MMSoupError, match="empty"):
        manifold_mixing_soup([], ev, COMPS)
    with pytest.raises(MMSoupError, match="names key"):
        manifold_mixing_soup(pool, ev, {"x": ["no.such.key"]})


def test_other_optimizer_names_run(digits):
    pool, ev = digits["pool"][:3], digits["ev"]
    res = manifold_mixing_soup(pool, ev, COMPS, budget=25, optimizer="TwoPointsDE", progress=False)
    assert {r["optimizer"] for r in res.info["optimizers"]} <= {"TwoPointsDE"}
    assert res.val_acc >= max(res.ingredient_val_accs)


def _toy_pool(m: int, n: int = 2):
    """n ingredients of 30 keys around a target, a quantised 'accuracy', m components."""
    g = torch.Generator().manual_seed(m)
    target = torch.randn(30, 2, generator=g)
    probes = torch.randn(64, 60, generator=g)
    truth = probes @ target.flatten() > 0
    pool = [
        {f"p{j:02d}": target[j] + 0.8 * torch.randn(2, generator=g) for j in range(30)}
        for _ in range(n)
    ]

    def val_acc(state):  # (hits + 1) / 65 is never 0, so tau = 0 always lets the optimizer run
        w = torch.cat([state[f"p{j:02d}"] for j in range(30)])
        return float(((probes @ w > 0) == truth).sum() + 1) / 65

    chunks = np.array_split(np.arange(30), m)
    comps = {f"c{c}": [f"p{j:02d}" for j in chunk] for c, chunk in enumerate(chunks)}
    return pool, val_acc, comps


SLOW = os.environ.get("MMSOUP_SLOW_TESTS") == "1"  # NGOpt portfolios: ~15-40 s per 5000 asks
GRID = [(m, b) for m in (1, 2, 3, 4, 5, 29, 30) for b in (1, 2, 250)] + [(1, 5000), (30, 5000)]
GRID += [
    pytest.param(m, 5000, marks=pytest.mark.skipif(not SLOW, reason="slow"))
    for m in (2, 3, 4, 5, 29)
]


@pytest.mark.parametrize(("m", "budget"), GRID)
def test_every_recipe_handles_1_to_30_components_and_budgets_1_to_5000(m, budget):
    pool, val_acc, comps = _toy_pool(m)
    res = manifold_mixing_soup(pool, val_acc, comps, tau=0.0, budget=budget, progress=False)
    assert 3 <= res.n_evals <= 3 + budget and res.info["optimizers"]
    assert res.val_acc >= max(res.ingredient_val_accs) and res.val_acc == val_acc(res.state_dict)
    assert all(sum(w) == pytest.approx(1.0, abs=1e-12) for w in res.weights.values())
    rebuilt = mix_from_weights(pool, comps, res.weights)
    assert all(torch.allclose(rebuilt[k], res.state_dict[k], atol=1e-6) for k in rebuilt)
    greedy = greedy_soup(pool, val_acc, components=comps, progress=False)
    assert set(greedy.weights) == set(comps) and greedy.val_acc == val_acc(greedy.state_dict)


def test_cobyla_finishing_early_neither_crashes_nor_spins(monkeypatch):
    """scipy's Cobyla returns long before a budget of 5000: the loop stops asking (counted asks)."""
    asks = []
    cobyla = ng.optimizers.registry["Cobyla"]

    def counting(**kwargs):
        opt = cobyla(**kwargs)
        ask = opt.ask
        opt.ask = lambda: asks.append(1) or ask()
        return opt

    monkeypatch.setattr(lambda_search, "optimizer_class", lambda name: counting)
    pool, val_acc, comps = _toy_pool(2)
    res = manifold_mixing_soup(
        pool, val_acc, comps, tau=0.0, budget=5000, optimizer="Cobyla", progress=False
    )
    candidates = len(pool) - 1
    assert res.n_evals < 300 and 0 < len(asks) < 150 * candidates  # never 5000 per candidate


def test_logit_and_greedy_ensembles(digits):
    pool, ev = digits["pool"], digits["ev"]
    best = int(np.argmax([ev(p) for p in pool]))
    ens = logit_ensemble(pool, ev)
    manual = torch.stack([(ev.load(p), ev.logits())[1] for p in pool]).mean(0)
    assert torch.allclose(ens.logits, manual, atol=1e-6) and ens.val_acc == accuracy(
        manual, ev.labels
    )
    assert sorted(ens.ingredients) == list(range(len(pool))) and ens.n_evals == len(pool)
    greedy = greedy_ensemble(pool + [dict(pool[best])], ev)
    assert greedy.ingredients[0] == best and len(pool) not in greedy.ingredients
    members = [pool[i] for i in greedy.ingredients]
    assert torch.allclose(ensemble_logits(members, ev), greedy.logits, atol=1e-6)
    assert greedy.val_acc >= max(greedy.ingredient_val_accs)


def test_an_ensemble_saves_like_a_soup(digits, tmp_path):
    """Members, accuracies, trace, info and provenance in one JSON file (no fused weights)."""
    import json

    res = greedy_ensemble(digits["pool"], digits["ev"])
    path = res.save(tmp_path / "greedy_ensemble.json")
    saved = json.loads(path.read_text())
    assert saved["ingredients"] == res.ingredients and saved["val_acc"] == res.val_acc
    assert saved["trace"] == res.trace and saved["n_evals"] == len(digits["pool"])
    assert saved["info"]["recipe"] == "greedy_ensemble" and "torch" in saved["versions"]
    assert "machine" not in saved and "wall_time_s" not in saved["info"]
    assert read_sidecar(path, timings=True)["machine"]["cores"] >= 1


def test_wise_ft_interpolates_between_zeroshot_and_finetuned(digits):
    zs, ft = digits["init"], digits["pool"][0]
    assert _equal(wise_ft(zs, ft, 0.0), zs) and _equal(wise_ft(zs, ft, 1.0), ft)
    half = wise_ft(zs, ft, 0.5)
    assert all(torch.allclose(half[k], (zs[k] + ft[k]) / 2, atol=1e-7) for k in zs)
