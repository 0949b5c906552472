"""`manifold_mixing_soup(variant="author")` against the MMS author's code and the author's run.

1. A literal port of the author's loop (tests/author_port.py, from JrsPhase1.py) and mmsoup, on
   small MLP pools with a C8-shaped partition (8 components, 5 of them inert as in C8), with real
   nevergrad (NGOpt picks Cobyla): the same decisions, passes, ingredients and fused weights.
2. The released C8 run (tests/fixtures/author_c8_run.json, numbers from the author's main.log and
   phase1_results.json): the decision rules the loop runs, fed the logged accuracies, take the
   logged decisions and passes; its β matrix, as mmsoup per-component weights, rebuilds the model
   the author's code builds from it (JrsPhase1.py getFusedModelStateDictFromBeta).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from author_port import AuthorPhase1, group_state_dict_keys_by_level
from sklearn.datasets import load_digits
from toy_mlp import mlp, train

from mmsoup import lambda_search
from mmsoup.mixing import mix_from_weights, mixed_weights
from mmsoup.partition import partition
from mmsoup.soups import manifold_mixing_soup

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "author_c8_run.json").read_text())
INERT = ["text.positional_embedding", "text.text_projection", "text.logit_scale"]


def _c8_toy(n: int, std: float, seed: int = 7):
    """n noisy copies of one fine-tuned MLP, with inert tensors in C8's order (positional
    embedding, text projection, logit scale, image layer, ..., ln_final, head weight, head bias);
    accuracy on 300 held-out digits (many ties)."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    base = train(mlp(), x[:1200], y[:1200], seed=100, lr=0.05, steps=100)
    g = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(n):
        sd = {k: v + std * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()}
        inert = {k: torch.randn(3, generator=g) for k in INERT}
        ln = {"text.ln_final.weight": torch.randn(4, generator=g)}
        pool.append({**inert, "0.weight": sd["0.weight"], "0.bias": sd["0.bias"], **ln})
        pool[-1] |= {"2.weight": sd["2.weight"], "2.bias": sd["2.bias"]}
    net, xv, yv = mlp(), x[1200:1500], y[1200:1500]

    def val_acc(state) -> float:
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("text.")})
        with torch.no_grad():
            return float((net(xv).argmax(1) == yv).sum()) / len(yv)

    return pool, val_acc


@pytest.mark.filterwarnings("ignore:COBYLA")  # scipy's, in the port's optimizer threads
@pytest.mark.parametrize(
    ("n", "std", "seed", "tau", "stages"),
    [
        (8, 0.05, 7, 0.998, {"pass1", "pass2"}),  # ties: ranked in reverse input order, accepted
        (5, 0.3, 1, 0.99, {"pass1", "pass2", "pass3"}),
    ],
)
def test_author_variant_gives_the_author_loops_fused_model(n, std, seed, tau, stages):
    """Same evaluations, so the same optimizer path, decisions and λ*. Mixing differs in the last
    bit (mmsoup's lerp, the author's λ·A + (1-λ)·C), which can flip a prediction on a decision
    boundary and send Cobyla elsewhere: these pools are ones where no evaluation differs."""
    pool, val_acc = _c8_toy(n, std, seed)
    accs = [val_acc(sd) for sd in pool]
    names = [f"model_{i}" for i in range(n)]
    port = AuthorPhase1(
        dict(zip(names, pool)), dict(zip(names, accs)), val_acc, tau=tau, max_func_evals_per_dim=10
    )
    port.run().close()
    comps = dict(group_state_dict_keys_by_level(pool[0], 1)[0])  # C8-shaped: 8 components
    assert len(comps) == 8
    res = manifold_mixing_soup(
        pool, val_acc, comps, tau, variant="author", budget_per_component=10, progress=False
    )
    as_input = [int(port.sortedIngredientModels[s].split("_")[1]) for s in port.ingredientIndices]
    assert res.ingredients == as_input and len(as_input) >= 2
    decisions = [e[0] for e in port.log if e[0] in ("accepted", "rejected", "skipped")]
    assert [d["decision"] for d in res.info["decisions"]] == decisions
    assert [r["optimizer"] for r in res.info["optimizers"]] == port.optimizer_names
    assert set(port.optimizer_names) == {"Cobyla"}
    assert {r["pass"] for r in res.info["optimizers"]} == stages
    assert res.val_acc == port.accuracyA  # 1 - the recommendation's loss, as the author
    eps = torch.finfo(torch.float32).eps
    for key in pool[0]:  # float32 precision: lerp vs λ·A + (1-λ)·C, Σ β·θ vs the running mix
        scale = max(float(sd[key].abs().max()) for sd in pool)  # a few ulps per mixing step
        atol = 4 * len(as_input) * eps * scale
        torch.testing.assert_close(res.state_dict[key], port.finalAccumA[key], rtol=0, atol=atol)
        torch.testing.assert_close(
            res.state_dict[key], port.fusedModelStateDict[key], rtol=0, atol=atol
        )
    beta = [[res.weights[c][i] for c in comps] for i in as_input]  # rows in mixing order
    np.testing.assert_allclose(beta, port.beta, rtol=0, atol=1e-6)
    # a memoised λ is told again without an evaluation: fewer evaluations than the author's
    approx = len(res.info["decisions"])
    assert res.n_evals - n - approx < port.n_evals


def _exact(logged: float) -> float:
    """A logged accuracy (6 digits) as the run computed it: correct / 26,000 held-out images."""
    return round(logged * FIXTURE["n_heldout"]) / FIXTURE["n_heldout"]


def test_the_decision_rules_replay_the_released_c8_run(monkeypatch):
    """The real loop, its evaluations replaced by the logged accuracies: same ranking, same 71
    decisions after the anchor (6 accepted, 21 rejected, 44 skipped), same 33 passes."""
    cands = FIXTURE["candidates"]
    ids = FIXTURE["model_ids_in_file_order"]
    sorted_ids = FIXTURE["sorted_model_ids"]
    assert ids == list(range(72)) and len(cands) == 71
    pool = [{"w": torch.full((2,), float(i))} for i in ids]  # stand-ins: only decisions matter
    # what the Scorer evaluates, in order: ValAcc(A) of the anchor, then each Ψ̃ (the optimizer
    # passes are replayed below; the approximate average is the only other evaluation)
    queue = [_exact(FIXTURE["first_acc"])] + [_exact(c["approx_acc"]) for c in cands]
    passes = {sorted_ids[c["index"]]: [_exact(a) for a in c["pass_accs"]] for c in cands}
    calls = []

    def val_acc(state):
        return queue.pop(0)

    def replay(opt_cls, search, init, lo, hi, budget, seed):
        """A pass as the log records it: accuracy = 1 - loss of the recommendation."""
        calls.append((search.candidate, search.stage, budget, seed, lo, hi))
        acc = passes[search.candidate].pop(0)
        return "Cobyla", 1.0 - (1.0 - acc), np.full(search.m, 0.5, dtype=np.float32)

    monkeypatch.setattr(lambda_search, "_optimize_as_author", replay)
    res = manifold_mixing_soup(
        pool,
        val_acc,
        {"w": ["w"]},
        variant="author",
        ingredient_val_accs=FIXTURE["file_val_accs"],
        progress=False,
    )
    assert not queue and not any(passes.values())  # every logged number used, no more
    order = [d["candidate"] for d in res.info["decisions"]]
    assert [sorted_ids[0], *order] == sorted_ids  # the author's ranking (ties reversed)
    got = [d["decision"] for d in res.info["decisions"]]
    assert got == [c["decision"] for c in cands]
    counts = FIXTURE["counts"]
    assert (
        [got.count(x) for x in ("accepted", "rejected", "skipped")]
        == [
            counts["accepted"],
            counts["rejected"],
            counts["skipped"],
        ]
        == [6, 21, 44]
    )
    assert len(res.info["optimizers"]) == len(calls) == counts["passes"] == 33
    assert [c[1] for c in calls].count("pass2") == 6 and not [c for c in calls if c[1] == "pass3"]
    assert {c[2] for c in calls} == set(FIXTURE["budget_per_pass"]) == {240}
    assert {c[3] for c in calls} == {123456789}
    mixed = [sorted_ids[s] for s in FIXTURE["ingredient_indices"]]
    assert res.ingredients == mixed == [43, 44, 63, 32, 47, 50, 30]
    # Ψ's accuracy before each candidate is the logged ValAcc(A): pass 2 replaced pass 1
    acc_psi, logged = _exact(FIXTURE["first_acc"]), []
    for c, d in zip(cands, res.info["decisions"]):
        logged.append((round(acc_psi, 6), c["acc_psi"]))
        acc_psi = d["best_acc"] if d["decision"] == "accepted" else acc_psi
    assert all(a == b for a, b in logged)
    assert round(res.val_acc, 6) == 0.839731
    # the rules alone, on the two numbers the run came closest to (half an image from τ)
    v = lambda_search._variant("author")
    assert not v.tries(_exact(0.834923), _exact(0.836615), 0.998)  # candidate 3: skipped
    assert v.tries(_exact(0.835385), _exact(0.837038), 0.998)  # candidate 7: optimised
    assert v.next_pass("pass2", 0.8370, 0.8365, 0.998) is None
    assert v.next_pass("pass2", 0.8371, 0.8365, 0.998) == "pass3"


# the released checkpoints' keys (state dicts of Soups' wrapped CLIP ViT-B/32 classifier: the
# image tower under model.visual, the text tower's leftovers, the head), a few per component
RELEASED_KEYS = {
    "model.positional_embedding": (4, 3),
    "model.text_projection": (3, 2),
    "model.logit_scale": (),
    "model.visual.class_embedding": (3,),
    "model.visual.positional_embedding": (5, 3),
    "model.visual.proj": (3, 2),
    "model.visual.conv1.weight": (3, 3, 2, 2),
    "model.visual.ln_pre.weight": (3,),
    "model.visual.transformer.resblocks.0.attn.in_proj_weight": (9, 3),
    "model.visual.transformer.resblocks.11.mlp.c_proj.bias": (3,),
    "model.visual.ln_post.bias": (3,),
    "model.token_embedding.weight": (6, 3),
    "model.ln_final.weight": (3,),
    "model.ln_final.bias": (3,),
    "classification_head.weight": (10, 2),
    "classification_head.bias": (10,),
}


def test_the_released_beta_rebuilds_the_authors_fused_model(tmp_path):
    """β (rows in mixing order, columns in C8 order) as mmsoup weights (one coefficient per
    ingredient and component): mix_from_weights == getFusedModelStateDictFromBeta, on 72 stand-in
    checkpoints model_<k>.pt in the released layout."""
    paths = []
    for k in range(72):
        g = torch.Generator().manual_seed(k)
        state = {key: torch.randn(shape, generator=g) for key, shape in RELEASED_KEYS.items()}
        paths.append(tmp_path / f"model_{k}.pt")
        torch.save(state, paths[-1])
    comps = partition(list(RELEASED_KEYS), "C8")
    names = [f"model_{k}" for k in range(72)]
    port = AuthorPhase1(
        {n: torch.load(p) for n, p in zip(names, paths)},
        dict(zip(names, FIXTURE["file_val_accs"])),
        val_acc=None,
    )
    assert list(port.components) == list(comps)  # the author's C8 is mmsoup's C8, in order
    assert port.sortedIngredientModels == [f"model_{k}" for k in FIXTURE["sorted_model_ids"]]
    beta = np.asarray(FIXTURE["beta"])
    assert beta.shape == (7, 8)
    np.testing.assert_allclose(beta.sum(axis=0), 1.0, atol=1e-6)  # convex per component
    mixed = [FIXTURE["sorted_model_ids"][s] for s in FIXTURE["ingredient_indices"]]
    weights = {c: [0.0] * 72 for c in comps}
    for row, k in zip(beta, mixed):
        for c, b in zip(comps, row):
            weights[c][k] = float(b)
    rebuilt = mix_from_weights(paths, comps, weights)
    # as JrsPhase1.py loadResultsFromJson + getFusedModelStateDictFromBeta (β in float32)
    author = port.getFusedModelStateDictFromBeta(FIXTURE["ingredient_indices"], beta.astype("f4"))
    for key in RELEASED_KEYS:
        torch.testing.assert_close(rebuilt[key], author[key], rtol=1e-6, atol=1e-6)
    # the same weights from λ*: β_0 = Π λ_r, β_j = (1-λ_{j-1})·Π_{r>=j} λ_r, inverted, then
    # mixed in by mmsoup's rule w ← λ·w + (1-λ)·e_i (the update the MMS loop applies)
    lams, tail = [], np.ones(8)
    for j in range(6, 0, -1):
        lams.insert(0, 1.0 - beta[j] / tail)
        tail = tail * lams[0]
    np.testing.assert_allclose(tail, beta[0], rtol=1e-9)
    w = {c: np.eye(72)[mixed[0]].tolist() for c in comps}
    for k, lam in zip(mixed[1:], lams):
        w = mixed_weights(w, k, dict(zip(comps, lam)))
    np.testing.assert_allclose([w[c] for c in comps], [weights[c] for c in comps], atol=1e-12)
