"""Soup recipes: uniform and greedy soups (Soups §2, Recipe 1), the manifold mixing soup (MMS Alg. 1)
and WiSE-FT; the logit ensembles (Soups §2) live in mmsoup.evaluate and are re-exported here.

Ingredients are state dicts or checkpoint paths. Paths are streamed: a recipe opens one ingredient
when it needs it and drops it, keeping running sums, so it holds a constant number of full models
whatever the pool size. `val_acc` is any callable state dict -> accuracy; an `Evaluator` is the fast
path (MMS candidates are mixed into its live model in place instead of being rebuilt).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence

import nevergrad as ng
import numpy as np
import torch
from nevergrad.common.errors import FinishedUnderlyingOptimizerWarning, NevergradWarning
from nevergrad.optimization.recaster import _MessagingThread
from torch import Tensor

from mmsoup import resume
from mmsoup.checkpoints import (
    Ingredient,
    iter_ingredients,
    library_versions,
    open_ingredient,
    validate_pool,
)
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import (  # noqa: F401 (the ensembles are re-exported from here)
    EnsembleResult,
    Evaluator,
    ensemble_logits,
    greedy_ensemble,
    logit_ensemble,
)
from mmsoup.learned import learned_soup  # noqa: F401 (Soups App. I; re-exported as a recipe)
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # sum low-precision weights in float32


def interpolate(base: StateDict, other: StateDict, components, lambdas) -> dict[str, Tensor]:
    """Ψ'(λ)^j = λ_j·base^j + (1-λ_j)·other^j per component; uncovered keys from base (MMS Alg. 1)."""
    keys = [k for ks in components.values() for k in ks]
    weights = [float(lam) for ks, lam in zip(components.values(), lambdas) for _ in ks]
    others = [other[k].to(base[k].device) for k in keys]
    # the fused op of Evaluator.mix: the soup is bit for bit the model that was evaluated
    mixed = torch._foreach_lerp(others, [base[k] for k in keys], weights) if keys else []
    return dict(base) | dict(zip(keys, mixed))


def _mean(
    ingredients: Sequence[Ingredient], dtypes: Mapping[str, torch.dtype]
) -> dict[str, Tensor]:
    total: dict[str, Tensor] = {}
    for i, sd in iter_ingredients(ingredients):
        for k, v in sd.items():
            if i == 0:
                total[k] = v.to(_acc_dtype(v.dtype), copy=True)
            else:
                total[k] += v
        del sd  # drop a streamed ingredient before opening the next
    return {k: v.div_(len(ingredients)).to(dtypes[k]) for k, v in total.items()}  # in place


def uniform_soup(ingredients: Sequence[Ingredient]) -> dict[str, Tensor]:
    """The mean of all ingredients, streamed (Soups §2, uniform soup)."""
    spec = validate_pool(ingredients)
    return _mean(ingredients, {k: dt for k, (_, dt) in spec.items()})


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
    scorer = Scorer(val_acc)
    accs, order = ranked(ingredients, scorer, ingredient_val_accs)
    first = open_ingredient(ingredients[order[0]])
    total = {
        k: v.to(_acc_dtype(v.dtype), copy=True) for k, v in first.items()
    }  # running sum of the soup
    del first
    soup, best, decisions = [order[0]], accs[order[0]], []
    for i in tqdm(order[1:], desc="greedy soup", disable=not progress):
        theta = open_ingredient(ingredients[i])
        n = len(soup) + 1
        cand = {k: ((total[k] + theta[k]) / n).to(dtypes[k]) for k in total}
        acc = scorer.state(cand, i, "greedy")
        del cand
        if acc > best:  # strict: a tie does not enter the soup
            for k in total:
                total[k] += theta[k]  # same sum as in `cand`: the soup is the evaluated model
            soup.append(i)
            best = acc
        decisions.append({"candidate": i, "acc": acc, "accepted": soup[-1] == i})
        del theta
    state = {k: v.div_(len(soup)).to(dtypes[k]) for k, v in total.items()}  # == the evaluated
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


def _optimizer_class(name: str):
    if name not in ng.optimizers.registry:
        raise MMSoupError(
            f"Unknown nevergrad optimizer {name!r}; use a name from nevergrad.optimizers.registry, e.g. 'NGOpt', 'Cobyla', 'CMA'."
        )
    return ng.optimizers.registry[name]


def _concrete_name(opt) -> str:
    """The optimizer that actually ran: descend NGOpt's selection chain (`.optim`)."""
    while isinstance(getattr(opt, "optim", None), ng.optimizers.base.Optimizer):
        opt = opt.optim
    name = opt.name
    return name if len(name) <= 80 else name.split("(")[0]  # portfolios have very long names


def _stop_optimizer_threads(before: set[threading.Thread]) -> None:
    """Stop and join the threads nevergrad started to run scipy or cma optimizers since `before`."""
    for thread in threading.enumerate():
        if thread not in before and isinstance(thread, _MessagingThread):
            thread.stop()  # a thread waiting for its next value raises and ends
            thread.join(timeout=60)


@contextlib.contextmanager
def _optimizer_env(seed: int) -> Iterator[None]:
    """Seed what nevergrad's sub-optimizers draw from outside the parametrization; mute chatter.

    nevergrad runs scipy's and cma's optimizers in threads that outlive an ask/tell; they are
    stopped inside the block, so their warnings (e.g. scipy's COBYLA on nevergrad's settings) stay
    under its filters and no thread draws from numpy's global RNG after its state is restored.
    """
    before = set(threading.enumerate())
    state = np.random.get_state()
    np.random.seed(seed % 2**32)  # e.g. restart points of CmaFmin2 use numpy's global RNG
    try:
        import cma.options_parameters as cma_opts  # cma seeds itself from the clock by default

        cma_seed = cma_opts.cma_default_options["seed"]
        cma_opts.cma_default_options["seed"] = seed % 2**31 + 1  # 0 would mean "time"
    except ImportError:  # pragma: no cover
        cma_opts = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=NevergradWarning)
            warnings.filterwarnings("ignore", module=r"(cma|scipy|nevergrad)(\.|$)")
            warnings.simplefilter("error", FinishedUnderlyingOptimizerWarning)
            try:
                yield
            finally:
                _stop_optimizer_threads(before)
    finally:
        np.random.set_state(state)
        if cma_opts is not None:
            cma_opts.cma_default_options["seed"] = cma_seed


def _mixed(scorer: Scorer, base, other, plan, full, candidate: int, stage: str, lambdas) -> float:
    """Score Ψ'(λ): mixed in place by an Evaluator, else rebuilt by `interpolate`."""
    if isinstance(scorer.val_acc, Evaluator):
        acc = float(scorer.val_acc.mixed_accuracy(base, other, plan, full))
    else:
        acc = float(scorer.val_acc(interpolate(base, other, plan, full)))
    return scorer.log(acc, candidate, stage, lambdas)


class _Search:
    """One candidate's λ search: memoised evaluations of Ψ'(λ), the best point first on ties."""

    def __init__(self, scorer: Scorer, psi, theta, plan, lam0: float, candidate: int, m: int):
        self.scorer, self.psi, self.theta, self.plan = scorer, psi, theta, plan
        self.lam0, self.candidate, self.m, self.stage = lam0, candidate, m, "approx"
        self.memo: dict[bytes, float] = {}  # λ -> accuracy: never pay twice for one point
        self.found: list[tuple[float, np.ndarray]] = []  # in evaluation order

    def full(self, lam: np.ndarray) -> list[float]:
        """λ for every mixed component; uncovered keys (REST) stay at λ0."""
        return [float(v) for v in lam] + [self.lam0] * (len(self.plan) - self.m)

    def __call__(self, lam: np.ndarray) -> float:
        key = lam.tobytes()
        if key not in self.memo:
            args = (self.psi, self.theta, self.plan, self.full(lam), self.candidate, self.stage)
            self.memo[key] = _mixed(self.scorer, *args, lam)
            self.found.append((self.memo[key], lam.copy()))
        return self.memo[key]

    def best(self) -> tuple[float, np.ndarray]:
        return max(self.found, key=lambda r: r[0])  # max keeps the first of equal maxima


def _optimize(opt_cls, search: _Search, init, lo: float, hi: float, budget: int, seed: int) -> str:
    """Minimise 1 - ValAcc(Ψ'(λ)) over λ ∈ [lo, hi]^m in `budget` asks; name the optimizer run."""
    # lower/upper (not set_bounds): sigma follows the bounds, so Cobyla's first steps stay inside
    param = ng.p.Array(init=np.asarray(init, dtype=np.float64), lower=lo, upper=hi)
    param.random_state = np.random.RandomState(seed)
    opt = opt_cls(parametrization=param, budget=budget, num_workers=1)
    stall, patience = 0, 2 * search.m + 20
    with _optimizer_env(seed):
        for _ in range(budget):
            try:
                cand = opt.ask()
            except FinishedUnderlyingOptimizerWarning:  # e.g. scipy's Cobyla returned early
                break
            lam = np.asarray(cand.value, dtype=np.float64)
            stall = stall + 1 if lam.tobytes() in search.memo else 0
            opt.tell(cand, 1.0 - search(lam))
            if stall >= patience:  # only already-evaluated λ for a while: a converged replay
                break
    return _concrete_name(opt)


_VARIANTS = {
    "paper": {
        "bounds": "unit",
        "budget_per_component": None,
        "accept_ties": False,
        "refine": False,
    },
    "author": {"bounds": "author", "budget_per_component": 30, "accept_ties": True, "refine": True},
}


def manifold_mixing_soup(
    ingredients: Sequence[Ingredient],
    val_acc: ValAcc | Evaluator,
    components: Mapping[str, Sequence[str]],
    tau: float = 0.998,
    budget: int = 250,
    optimizer: str = "NGOpt",
    seed: int = 0,
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

    With `state_file` (a `.json` path) the run's state is written atomically after every
    candidate's decision (Ψ beside it as `<stem>.psi-<k>.safetensors`); a rerun with the same
    inputs resumes at the next candidate and returns the same soup, bit for bit, as an
    uninterrupted run. The files are kept after the run (`mmsoup.resume.remove` deletes them).
    A single ingredient is allowed: it is returned as the soup after one evaluation.
    """
    t0 = time.perf_counter()
    if variant not in _VARIANTS:
        raise MMSoupError(f"variant must be 'paper' or 'author', got {variant!r}.")
    opts = dict(_VARIANTS[variant])
    given = dict(
        bounds=bounds,
        budget_per_component=budget_per_component,
        accept_ties=accept_ties,
        refine=refine,
    )
    opts |= {k: v for k, v in given.items() if v is not None}
    if opts["bounds"] not in ("unit", "author"):
        raise MMSoupError(f"bounds must be 'unit' or 'author', got {opts['bounds']!r}.")
    opt_cls = _optimizer_class(optimizer)
    spec = validate_pool(ingredients)
    validate_partition(components, spec, complete=False)  # keys outside it follow λ0
    comps = {str(c): list(keys) for c, keys in components.items()}
    m = len(comps)
    if opts["budget_per_component"] is not None:
        budget = int(opts["budget_per_component"]) * m  # author: 30 per component
    if int(budget) < 1:
        raise MMSoupError(f"budget must be at least 1 evaluation, got {budget}.")
    if not 0.0 <= tau <= 1.0:
        raise MMSoupError(f"tau must lie in [0, 1] (the paper uses 0.998), got {tau}.")
    covered = {k for keys in comps.values() for k in keys}
    rest = [k for k in spec if k not in covered]
    plan = comps | ({REST: rest} if rest else {})  # what gets mixed; REST is fixed at λ0
    ties = bool(opts["accept_ties"])
    better = (lambda a, b: a >= b) if ties else (lambda a, b: a > b)

    params = {"tau": tau, "budget": int(budget), "optimizer": optimizer, "seed": seed}
    params |= {"variant": variant, **opts}
    scorer = Scorer(val_acc)
    device = val_acc.device if isinstance(val_acc, Evaluator) else torch.device("cpu")
    fp = saved = None
    if state_file is not None:
        given = None if ingredient_val_accs is None else [float(a) for a in ingredient_val_accs]
        fp = resume.fingerprint(
            ingredients, comps, val_acc, params | {"ingredient_val_accs": given}
        )
        saved = resume.load(state_file, fp)
    if saved is None:
        accs, order = ranked(ingredients, scorer, ingredient_val_accs)
        first = open_ingredient(ingredients[order[0]])
        psi = {k: v.to(device, copy=True) for k, v in first.items()}  # Ψ ← θ_0 (owned)
        del first
        acc_psi, mixed = accs[order[0]], [order[0]]
        weights = {c: np.eye(len(ingredients))[order[0]] for c in plan}  # one-hot of the best
        ran, decisions, done, elapsed, resumed_at = [], [], 0, 0.0, []
    else:  # resume after the last decided candidate (the ranking is not recomputed)
        accs, scorer.trace = saved.ingredient_val_accs, saved.trace
        order = best_first(accs)  # as `ranked`
        psi = {k: v.to(device, copy=True) for k, v in saved.psi.items()}
        acc_psi, mixed, done = saved.acc_psi, saved.mixed, saved.done
        weights = {c: np.asarray(w, dtype=np.float64) for c, w in saved.weights.items()}
        ran, decisions, elapsed = saved.optimizers, saved.decisions, saved.elapsed_s
        resumed_at = [*saved.resumed_at, done]
        del saved

    def commit(psi_changed: bool) -> None:
        """Write the run's state after a decision (Ψ only if it changed)."""
        if state_file is None:
            return
        state = resume.MMSState(
            done=done,
            psi=psi,
            acc_psi=acc_psi,
            mixed=mixed,
            weights={c: w.tolist() for c, w in weights.items()},
            ingredient_val_accs=accs,
            trace=scorer.trace,
            decisions=decisions,
            optimizers=ran,
            elapsed_s=elapsed + time.perf_counter() - t0,
            finished=done == len(order) - 1,
            resumed_at=resumed_at,
        )
        resume.save(state_file, fp, state, psi_changed)

    if done == 0:
        commit(psi_changed=True)  # the ranking alone costs n evaluations
    label = f"manifold mixing soup ({m} components)"
    bar = dict(desc=label, initial=done, total=len(order) - 1, unit="candidate")
    for i in tqdm(order[1 + done :], disable=not progress, **bar):
        k = len(mixed)
        lam0 = k / (k + 1)
        theta = {key: v.to(device) for key, v in open_ingredient(ingredients[i]).items()}
        search = _Search(scorer, psi, theta, plan, lam0, i, m)
        acc_tilde = search(np.full(m, lam0))  # Ψ̃ = k/(k+1)·Ψ + 1/(k+1)·θ_i, one evaluation
        accepted = False
        if not better(acc_tilde, tau * acc_psi):
            decisions.append({"candidate": i, "decision": "skipped", "approx_acc": acc_tilde})
        else:
            half = 0.5 * (1.0 - lam0)
            lo, hi = (0.0, 1.0) if opts["bounds"] == "unit" else (lam0 - half, lam0 + half)
            passes = [("pass1", np.full(m, lam0), lo, hi)]
            while passes:
                search.stage, init, lo, hi = passes.pop(0)
                name = _optimize(opt_cls, search, init, lo, hi, budget, seed)
                ran.append({"candidate": i, "pass": search.stage, "optimizer": name})
                best_acc, best_lam = search.best()
                if not (opts["refine"] and better(best_acc, acc_psi)):
                    break
                if search.stage == "pass1":  # author: refine in [0.3, 1] from λ*
                    before = best_acc
                    passes.append(("pass2", np.clip(best_lam, 0.3, 1.0), 0.3, 1.0))
                elif search.stage == "pass2" and best_acc >= (1.0 + 0.3 * (1.0 - tau)) * before:
                    passes.append(("pass3", np.clip(best_lam, 0.3, 1.0), 0.3, 1.0))
            accepted = better(best_acc, acc_psi)
            decision = "accepted" if accepted else "rejected"
            decisions.append(
                {
                    "candidate": i,
                    "decision": decision,
                    "approx_acc": acc_tilde,
                    "best_acc": best_acc,
                }
            )
            if accepted:
                full = search.full(best_lam)
                psi = interpolate(psi, theta, plan, full)  # Ψ ← Ψ'(λ*): exactly the evaluated model
                onehot = np.eye(len(ingredients))[i]
                for c, lam in zip(plan, full):  # w_j ← λ_j·w_j + (1-λ_j)·e_i
                    weights[c] = lam * weights[c] + (1.0 - lam) * onehot
                acc_psi = best_acc
                mixed.append(i)
        del theta, search  # drop the streamed candidate before opening the next
        done += 1
        commit(psi_changed=accepted)

    info = {
        "recipe": "manifold_mixing_soup",
        "params": params,
        "n_components": m,
        "uncovered_keys": rest,
        "optimizers": ran,
        "decisions": decisions,
        "wall_time_s": elapsed + time.perf_counter() - t0,
        "versions": library_versions(),
    }
    if resumed_at:
        info["resumed_at"] = resumed_at  # `done` candidates at each resume
    return SoupResult(
        state_dict={k: v.to("cpu") for k, v in psi.items()},
        val_acc=acc_psi,
        ingredients=mixed,
        weights={c: w.tolist() for c, w in weights.items()},
        n_evals=len(scorer.trace),
        trace=scorer.trace,
        ingredient_val_accs=accs,
        info=info,
    )


def mix_from_weights(
    ingredients: Sequence[Ingredient],
    components: Mapping[str, Sequence[str]] | None,
    weights: Mapping[str, Sequence[float]],
) -> dict[str, Tensor]:
    """Rebuild a soup from per-component coefficients Σ_i w_j[i]·θ_i^j (MMS Alg. 1 unrolled), streamed."""
    spec = validate_pool(ingredients, check_finite=False)
    comps = dict(components) if components is not None else {ALL: list(spec)}
    owner = {k: c for c, keys in comps.items() for k in keys}
    for k in spec:
        owner.setdefault(k, REST if REST in weights else ALL)
    missing = {c for c in owner.values() if c not in weights}
    if missing:
        raise MMSoupError(
            f"weights lack component {sorted(missing)[0]!r}; pass the weights of this partition."
        )
    out = {k: torch.zeros(shape, dtype=_acc_dtype(dt)) for k, (shape, dt) in spec.items()}
    for i, sd in iter_ingredients(ingredients):
        for k, v in sd.items():
            w = float(weights[owner[k]][i])
            if w != 0.0:
                out[k].add_(v, alpha=w)
        del sd
    return {k: v.to(spec[k][1]) for k, v in out.items()}


def wise_ft(zeroshot: Ingredient, finetuned: Ingredient, alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: θ(α) = (1-α)·θ_zeroshot + α·θ_finetuned (WiSE-FT, Wortsman et al., CVPR 2022)."""
    validate_pool([zeroshot, finetuned])
    zs, ft = open_ingredient(zeroshot), open_ingredient(finetuned)
    return {k: torch.lerp(zs[k], ft[k], float(alpha)) for k in zs}
