"""Soup recipes: uniform and greedy soups (Soups §2, Recipe 1), the manifold mixing soup (MMS Alg. 1)
and WiSE-FT. Every recipe is importable from here: the learned soup (`mmsoup.learned`), the logit
ensembles (`mmsoup.ensembles`) and the mixing operations (`mmsoup.mixing`) are re-exported.

Ingredients are state dicts or checkpoint paths. Paths are streamed: a recipe opens one ingredient
when it needs it and drops it, keeping running sums, so it holds a constant number of full models
whatever the pool size. `val_acc` is any callable state dict -> accuracy; an `Evaluator` is the fast
path (MMS candidates are mixed into its live model in place instead of being rebuilt).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsoup import resume
from mmsoup.checkpoints import (
    Ingredient,
    buffer_keys,
    library_versions,
    open_ingredient,
    validate_pool,
)
from mmsoup.ensembles import (  # noqa: F401 (re-exported: every recipe is importable from here)
    EnsembleResult,
    ensemble_logits,
    greedy_ensemble,
    logit_ensemble,
)
from mmsoup.errors import MMSoupError  # noqa: F401 (re-exported)
from mmsoup.evaluate import Evaluator
from mmsoup.lambda_search import LambdaSearch, optimizer_class  # noqa: F401 (re-exported)
from mmsoup.learned import learned_soup  # noqa: F401 (Soups App. I; re-exported as a recipe)
from mmsoup.mixing import (  # noqa: F401 (re-exported)
    acc_dtype,
    interpolate,
    mix_from_weights,
    mixed_weights,
    weighted_sum,
)
from mmsoup.partition import validate_partition
from mmsoup.progress import tqdm
from mmsoup.result import (  # noqa: F401 (SoupResult and the types are re-exported from here)
    ALL,
    REST,
    Scorer,
    SoupResult,
    StateDict,
    ValAcc,
    best_first,
    ranked,
)


def _mean(
    ingredients: Sequence[Ingredient], dtypes: Mapping[str, torch.dtype], buffers_from: int = 0
) -> dict[str, Tensor]:
    """Σ θ_i / n, streamed; non-floating buffers are ingredient `buffers_from`'s, never averaged."""
    s = weighted_sum(
        ingredients, summed=lambda k, v: dtypes[k].is_floating_point, buffers_from=buffers_from
    )
    mean = {k: v.div_(len(ingredients)).to(dtypes[k]) for k, v in s.sums.items()}  # in place
    return {k: mean[k] if k in mean else s.kept[k] for k in dtypes}  # the pool's key order


def uniform_soup(ingredients: Sequence[Ingredient], *, buffers_from: int = 0) -> dict[str, Tensor]:
    """The mean of all ingredients, streamed (Soups §2, uniform soup).

    Non-floating buffers (e.g. `num_batches_tracked`) are taken from ingredient `buffers_from`
    (pass the best one's index), never averaged.
    """
    spec = validate_pool(ingredients)
    return _mean(ingredients, {k: dt for k, (_, dt) in spec.items()}, buffers_from)


def greedy_soup(
    ingredients: Sequence[Ingredient],
    val_acc: ValAcc | Evaluator,
    *,
    components: Mapping[str, Sequence[str]] | None = None,
    ingredient_val_accs: Sequence[float] | None = None,
    progress: bool = True,
) -> SoupResult:
    """Add ingredients best-first while the uniform average strictly improves (Soups Recipe 1)."""
    t0 = time.perf_counter()
    spec = validate_pool(ingredients)
    dtypes = {k: dt for k, (_, dt) in spec.items()}
    fixed = set(buffer_keys(spec))
    scorer = Scorer(val_acc)
    accs, order = ranked(ingredients, scorer, ingredient_val_accs)
    first = open_ingredient(ingredients[order[0]])
    keys = list(first)
    # the running sum of the soup; non-floating buffers are the best ingredient's, never averaged
    running = weighted_sum([first], summed=lambda k, v: k not in fixed, buffers_from=0)
    total, buffers = running.sums, running.kept
    del first
    soup, best, decisions = [order[0]], accs[order[0]], []
    for i in tqdm(order[1:], desc="greedy soup", disable=not progress):
        theta = open_ingredient(ingredients[i])
        n = len(soup) + 1
        cand = {
            k: ((total[k] + theta[k]) / n).to(dtypes[k]) if k in total else buffers[k] for k in keys
        }
        acc = scorer.state(cand, i, "greedy")
        del cand
        if acc > best:  # strict: a tie does not enter the soup
            # the same sum as in `cand`: the soup is the evaluated model
            weighted_sum([theta], summed=lambda k, v: k not in fixed, into=running)
            soup.append(i)
            best = acc
        decisions.append({"candidate": i, "acc": acc, "accepted": soup[-1] == i})
        del theta
    mean = {k: v.div_(len(soup)).to(dtypes[k]) for k, v in total.items()}  # == the evaluated
    state = {k: mean[k] if k in mean else buffers[k] for k in keys}
    w = [1.0 / len(soup) if i in soup else 0.0 for i in range(len(ingredients))]
    names = list(components) if components is not None else [ALL]
    info = {
        "recipe": "greedy_soup",
        "decisions": decisions,
        "wall_time_s": time.perf_counter() - t0,
    }
    return SoupResult(
        state_dict=state,
        val_acc=best,
        ingredients=soup,
        weights={c: list(w) for c in names},
        n_evals=len(scorer.trace),
        trace=scorer.trace,
        ingredient_val_accs=accs,
        info=info | {"versions": library_versions()},
    )


@dataclass
class _Run:
    """An MMS run: its inputs, and its state between candidates (resumable, `mmsoup.resume`)."""

    ingredients: Sequence[Ingredient]
    plan: dict[str, list[str]]  # component -> keys; REST (uncovered keys) last, fixed at λ0
    m: int  # components searched (REST excluded)
    search: LambdaSearch  # how λ* is found (paper or author variant), its budget and seed
    scorer: Scorer
    device: torch.device
    state: resume.MMSState
    order: list[int]  # ingredients best-first
    state_file: Path | None = None
    fp: dict[str, Any] | None = None
    t0: float = field(default_factory=time.perf_counter)
    elapsed0: float = 0.0  # wall time of earlier attempts (resumed runs)

    def commit(self, psi_changed: bool) -> None:
        """Write the run's state after a decision (Ψ only if it changed)."""
        if self.state_file is None:
            return
        st = self.state
        st.elapsed_s = self.elapsed0 + time.perf_counter() - self.t0
        st.finished = st.done == len(self.order) - 1
        resume.save(self.state_file, self.fp, st, psi_changed)

    def accept(self, i: int, theta: StateDict, lambdas: list[float], acc: float) -> None:
        """Ψ ← Ψ'(λ*), the evaluated model (author: at λ* cast to float32, as JrsPhase1.py)."""
        st = self.state
        st.psi = interpolate(st.psi, theta, self.plan, lambdas)
        st.weights = mixed_weights(st.weights, i, dict(zip(self.plan, lambdas)))
        st.acc_psi = acc
        st.mixed.append(i)


def _plan(ingredients, components) -> dict[str, list[str]]:
    """Component -> keys, checked against the pool; keys in no component form REST, last."""
    spec = validate_pool(ingredients)
    fixed = set(buffer_keys(spec))  # integer buffers stay Ψ's (the best ingredient's)
    floating = [k for k in spec if k not in fixed]
    validate_partition(components, floating, complete=False)  # keys outside it follow λ0
    comps = {str(c): list(keys) for c, keys in components.items()}
    covered = {k for keys in comps.values() for k in keys}
    rest = [k for k in floating if k not in covered]
    return comps | ({REST: rest} if rest else {})


def _start(
    ingredients, val_acc, plan, search: LambdaSearch, ingredient_val_accs, state_file, t0
) -> _Run:
    """Ψ ← the best ingredient, or the saved state of an interrupted run with the same inputs."""
    comps = {c: keys for c, keys in plan.items() if c != REST}
    scorer = Scorer(val_acc)
    device = val_acc.device if isinstance(val_acc, Evaluator) else torch.device("cpu")
    run = dict(ingredients=ingredients, plan=plan, m=len(comps), search=search, scorer=scorer)
    run |= dict(device=device, t0=t0)
    fp = saved = None
    if state_file is not None:
        given = None if ingredient_val_accs is None else [float(a) for a in ingredient_val_accs]
        fp = resume.fingerprint(
            ingredients, comps, val_acc, search.params | {"ingredient_val_accs": given}
        )
        saved = resume.load(state_file, fp)
    run |= dict(state_file=None if state_file is None else Path(state_file), fp=fp)
    if saved is not None:  # resume after the last decided candidate (the ranking is kept)
        scorer.trace = saved.trace
        saved.psi = {k: x.to(device, copy=True) for k, x in saved.psi.items()}
        saved.resumed_at = [*saved.resumed_at, saved.done]
        return _Run(
            **run,
            state=saved,
            order=search.order(saved.ingredient_val_accs),
            elapsed0=saved.elapsed_s,
        )
    accs, _ = ranked(ingredients, scorer, ingredient_val_accs)
    order = search.order(accs)
    first = open_ingredient(ingredients[order[0]])
    psi = {k: x.to(device, copy=True) for k, x in first.items()}  # Ψ ← θ_0 (owned)
    acc_psi = search.first_acc(
        scorer, psi, order[0], accs[order[0]], ingredient_val_accs is not None
    )
    state = resume.MMSState(
        done=0,
        psi=psi,
        acc_psi=acc_psi,
        mixed=[order[0]],
        weights={c: np.eye(len(ingredients))[order[0]].tolist() for c in plan},  # one-hot
        ingredient_val_accs=accs,
        trace=scorer.trace,
        decisions=[],
        optimizers=[],
        elapsed_s=0.0,
    )
    out = _Run(**run, state=state, order=order)
    out.commit(psi_changed=True)  # the ranking alone costs n evaluations
    return out


def manifold_mixing_soup(
    ingredients: Sequence[Ingredient],
    val_acc: ValAcc | Evaluator,
    components: Mapping[str, Sequence[str]],
    tau: float = 0.998,
    budget: int | None = None,
    optimizer: str = "NGOpt",
    seed: int | None = None,
    *,
    variant: str = "paper",
    bounds: str | None = None,
    budget_per_component: int | None = None,
    accept_ties: bool | None = None,
    refine: bool | None = None,
    ingredient_val_accs: Sequence[float] | None = None,
    progress: bool = True,
    state_file: str | os.PathLike | None = None,
) -> SoupResult:
    """Mix candidates best-first, one λ per component, found by a nevergrad optimizer (MMS Alg. 1).

    Each decision is recorded in `info["decisions"]`; an optimised candidate's holds λ* for every
    mixed component (REST last), so the accepted steps replay the soup (`widgets.mms_steps`).
    With `state_file` (a `.json` path) the run's state is written atomically after every
    candidate's decision (Ψ beside it as `<stem>.psi-<k>.safetensors`); a rerun with the same
    inputs resumes at the next candidate and returns the same soup, bit for bit, as an
    uninterrupted run. The files are kept after the run (`mmsoup.resume.remove` deletes them).
    A single ingredient is allowed: it is returned as the soup after one evaluation.

    `variant="paper"` (default) follows MMS §3 and Alg. 1: λ ∈ [0, 1]^m, 250 evaluations, strict
    improvement, λ* the best point evaluated. `variant="author"` follows the author's released
    code (JrsPhase1.py, with the released run's configuration): λ within λ0 ± (1-λ0)/2, accept on
    >=, up to two more passes in [0.3, 1], λ* nevergrad's recommendation after the whole budget
    (in float32), a later pass replacing an earlier one, ties ranked as the author sorts, 240
    evaluations per pass and seed 123456789 unless given. It returns the model the author's code
    returns, while a λ evaluated before is told to the optimizer without a new evaluation.
    `bounds`, `budget_per_component`, `accept_ties` and `refine` override one choice of a variant
    (`mmsoup.lambda_search`).
    """
    t0 = time.perf_counter()
    search = LambdaSearch.configure(
        variant,
        optimizer,
        bounds=bounds,
        budget_per_component=budget_per_component,
        accept_ties=accept_ties,
        refine=refine,
    )
    plan = _plan(ingredients, components)
    search = search.sized(len(plan) - (REST in plan), tau, budget, seed)
    run = _start(ingredients, val_acc, plan, search, ingredient_val_accs, state_file, t0)
    st = run.state

    # MMS Alg. 1: Ψ is the best ingredient; every other candidate θ_i, best-first, is
    # mixed in with the per-component λ* that maximises the held-out accuracy, if it improves Ψ.
    bar = dict(desc=f"manifold mixing soup ({run.m} components)", unit="candidate")
    for i in tqdm(
        run.order[1 + st.done :],
        initial=st.done,
        total=len(run.order) - 1,
        disable=not progress,
        **bar,
    ):
        k = len(st.mixed)
        lam0 = k / (k + 1)
        theta = {key: x.to(run.device) for key, x in open_ingredient(ingredients[i]).items()}
        psi_prime = search.objective(run.scorer, st.psi, theta, run.plan, lam0, i)  # λ -> ValAcc
        acc_tilde = psi_prime(np.full(run.m, lam0))  # Ψ̃ = k/(k+1)·Ψ + 1/(k+1)·θ_i
        decision = {"candidate": i, "decision": "skipped", "approx_acc": acc_tilde}
        if search.tries(acc_tilde, st.acc_psi):  # else Ψ̃ is far worse than Ψ: skip θ_i
            best_acc, best_lam, accepted = search.best(psi_prime, st.acc_psi, st.optimizers)
            lambdas = psi_prime.full(best_lam)
            decision |= {"decision": "accepted" if accepted else "rejected"}
            decision |= {"best_acc": best_acc, "lambdas": lambdas}
            if accepted:
                run.accept(i, theta, lambdas, best_acc)  # Ψ ← Ψ'(λ*)
        st.decisions.append(decision)
        del theta, psi_prime  # drop the streamed candidate before opening the next
        st.done += 1
        run.commit(psi_changed=decision["decision"] == "accepted")

    info = {
        "recipe": "manifold_mixing_soup",
        "params": search.params,
        "n_components": run.m,
        "uncovered_keys": run.plan.get(REST, []),
        "optimizers": st.optimizers,
        "decisions": st.decisions,
        "wall_time_s": run.elapsed0 + time.perf_counter() - run.t0,
        "versions": library_versions(),
    }
    if st.resumed_at:
        info["resumed_at"] = st.resumed_at  # `done` candidates at each resume
    return SoupResult(
        state_dict={k: x.to("cpu") for k, x in st.psi.items()},
        val_acc=st.acc_psi,
        ingredients=st.mixed,
        weights=st.weights,
        n_evals=len(run.scorer.trace),
        trace=run.scorer.trace,
        ingredient_val_accs=st.ingredient_val_accs,
        info=info,
    )


def wise_ft(zeroshot: Ingredient, finetuned: Ingredient, alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: θ(α) = (1-α)·θ_zeroshot + α·θ_finetuned (WiSE-FT, Wortsman et al., CVPR 2022)."""
    spec = validate_pool([zeroshot, finetuned])
    zs, ft = open_ingredient(zeroshot), open_ingredient(finetuned)
    fixed = set(buffer_keys(spec))  # integer buffers: the fine-tuned model's
    return {k: ft[k].clone() if k in fixed else torch.lerp(zs[k], ft[k], float(alpha)) for k in zs}
