"""Soup recipes: uniform and greedy soups (Soups §2, Recipe 1), the manifold mixing soup (MMS Alg. 1)
and WiSE-FT. Every recipe is importable from here: the learned soup (`mmsoup.learned`), the logit
ensembles (`mmsoup.ensembles`) and the mixing operations (`mmsoup.mixing`) are re-exported.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nevergrad as ng
import numpy as np
import torch
from nevergrad.common.errors import (
    FinishedUnderlyingOptimizerWarning,
    NevergradEarlyStopping,
    NevergradWarning,
)
from nevergrad.optimization.optimizerlib import NGOptBase
from nevergrad.optimization.recaster import RecastOptimizer, _MessagingThread
from torch import Tensor

from mmsoup import resume
from mmsoup.checkpoints import (
    Ingredient,
    buffer_keys,
    iter_ingredients,
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
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator
from mmsoup.learned import learned_soup  # noqa: F401 (Soups App. I; re-exported as a recipe)
from mmsoup.mixing import acc_dtype, interpolate, mix_from_weights  # noqa: F401 (re-exported)
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
    total: dict[str, Tensor] = {}
    kept: dict[
        str, Tensor
    ] = {}  # non-floating buffers: ingredient `buffers_from`'s, never averaged
    for i, sd in iter_ingredients(ingredients):
        for k, v in sd.items():
            if not dtypes[k].is_floating_point:
                if i == buffers_from:
                    kept[k] = v.clone()
            elif i == 0:
                total[k] = v.to(acc_dtype(v.dtype), copy=True)
            else:
                total[k] += v
        del sd  # drop a streamed ingredient before opening the next
    mean = {k: v.div_(len(ingredients)).to(dtypes[k]) for k, v in total.items()}  # in place
    return {k: mean[k] if k in mean else kept[k] for k in dtypes}  # the pool's key order


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
    total = {  # running sum of the soup
        k: v.to(acc_dtype(v.dtype), copy=True) for k, v in first.items() if k not in fixed
    }
    buffers = {k: first[k].clone() for k in fixed}  # the best ingredient's, never averaged
    keys = list(first)
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
            for k in total:
                total[k] += theta[k]  # same sum as in `cand`: the soup is the evaluated model
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


def optimizer_class(name: str):
    """The nevergrad optimizer class registered under `name` (one sentence if there is none)."""
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
def _optimizer_env(seed: int, finished_raises: bool = True) -> Iterator[None]:
    """Seed what nevergrad's sub-optimizers draw from outside the parametrization; mute chatter.

    nevergrad runs scipy's and cma's optimizers in threads that outlive an ask/tell; they are
    stopped inside the block, so their warnings (e.g. scipy's COBYLA on nevergrad's settings) stay
    under its filters and no thread draws from numpy's global RNG after its state is restored.
    With `finished_raises`, an optimizer that finished early raises at its next ask; without, it
    goes on with random points, as in `Optimizer.minimize`.
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
            if finished_raises:
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


def _recommendation(opt):
    """The candidate `opt.minimize` returns after its budget, without the race in `recommend`.

    `NGOptBase.recommend` delegates to the optimizer it selected. A recast optimizer (Cobyla runs
    scipy in a thread) recommends the thread's output if the thread has ended, else nevergrad's
    current best ("minimum" for a deterministic function: of equal losses the later one told wins,
    `Optimizer._update_archive_and_bests`). The thread ends only with the last tell of the budget,
    racing with the caller; its output carries no loss, on which JrsPhase1.py doOptimization
    would have failed (`1.0 - ngParamLambtaOpt.loss`), so every pass of the author's runs took the
    current best. This returns it without racing.
    """
    while isinstance(opt, NGOptBase):
        opt = opt.optim
    if isinstance(opt, RecastOptimizer):
        name = "minimum" if opt.parametrization.function.deterministic else "pessimistic"
        return opt.current_bests[name].parameter
    return opt.recommend()


def _optimize_as_author(
    opt_cls, search: _Search, init, lo: float, hi: float, budget: int, seed: int
) -> tuple[str, float, np.ndarray]:
    """One pass as JrsPhase1.py Context.doOptimization runs it: (optimizer run, accuracy, λ*).

    The same parametrization (`Instrumentation(lambta=Array(init (1, m), lower, upper))`, seeded),
    every one of `budget` asks told (a memoised λ is told its accuracy without a new evaluation),
    λ* the recommendation cast to float32, its accuracy 1 - its loss.
    """
    param = ng.p.Instrumentation(lambta=ng.p.Array(init=np.asarray(init)[None], lower=lo, upper=hi))
    param.random_state.seed(seed)
    opt = opt_cls(parametrization=param, budget=budget, num_workers=1)
    with _optimizer_env(seed, finished_raises=False):
        for _ in range(budget):
            try:
                cand = opt.ask()
            except NevergradEarlyStopping:  # as `Optimizer.minimize`
                break
            opt.tell(cand, 1.0 - search(np.asarray(cand.kwargs["lambta"][0], dtype=np.float64)))
        rec, name = _recommendation(opt), _concrete_name(opt)
    lam = np.asarray(rec.kwargs["lambta"][0], dtype=np.float64)
    acc = 1.0 - rec.loss if rec.loss is not None else search(lam)  # a never-told recommendation
    return name, acc, lam.astype(np.float32)


@dataclass(frozen=True)
class _Variant:
    """How the λ search is run: the paper's description, or the MMS author's released code."""

    bounds: str  # "unit": λ ∈ [0, 1]^m; "author": a window of width 1/(k+1) around λ0
    budget_per_component: int | None  # None: `budget` evaluations per pass
    accept_ties: bool  # accept on >= (author) instead of > (paper)
    refine: bool  # author: up to two more passes in [0.3, 1] after an improving pass
    # author: what JrsPhase1.py does where the paper says nothing (set by the variant's name):
    # its ranking, its λ* (the optimizer's recommendation, float32), a later pass replacing an
    # earlier one, the decision taken on pass 1
    literal: bool = False

    def better(self, a: float, b: float) -> bool:
        return a >= b if self.accept_ties else a > b

    def tries(self, acc_tilde: float, acc_psi: float, tau: float) -> bool:
        """The τ test: optimise λ for θ_i only if ValAcc(Ψ̃) passes τ·ValAcc(Ψ) (MMS Alg. 1)."""
        return self.better(acc_tilde, tau * acc_psi)

    def accepts(self, acc: float, acc_psi: float) -> bool:
        """Ψ ← Ψ'(λ*) if ValAcc(Ψ'(λ*)) improves on ValAcc(Ψ) (MMS Alg. 1)."""
        return self.better(acc, acc_psi)

    def next_pass(self, done: str, acc: float, first: float, tau: float) -> str | None:
        """The pass after an improving pass 1 (JrsPhase1.py Context.run): pass 2 always, pass 3 if
        pass 2 reached (1 + 0.3·(1-τ))·(pass 1's accuracy)."""
        if not self.refine:
            return None
        if done == "pass1":
            return "pass2"
        if done == "pass2" and acc >= (1.0 + 0.3 * (1.0 - tau)) * first:
            return "pass3"
        return None

    def order(self, accs: Sequence[float]) -> list[int]:
        """Ingredients best-first; the author's sort (JrsContext.py sortIngredientModelsByAccuracy,
        as Soups' code) is ascending, then reversed, so ties come in reverse input order."""
        if not self.literal:
            return best_first(accs)
        return sorted(range(len(accs)), key=lambda i: accs[i])[::-1]


_VARIANTS = {
    "paper": _Variant(bounds="unit", budget_per_component=None, accept_ties=False, refine=False),
    "author": _Variant(
        bounds="author", budget_per_component=None, accept_ties=True, refine=True, literal=True
    ),
}
# Evaluations per pass (and seed) when not given. Paper: "roughly 250". Author: 240, the budget
# of every pass of the released C8 run (main.log: "fn_evals = 240", max_func_evals_per_dim 30,
# whose config comment gives 10 as the default); 30 per component for C15/C26 (450/780) would
# not be "roughly 250" (pass budget_per_component=30 for the released config's rule).
_DEFAULT_BUDGET = {"paper": 250, "author": 240}
_DEFAULT_SEED = {"paper": 0, "author": 123456789}  # author: config_manifoldmixms.yaml random_seed


def _variant(name: str, **given) -> _Variant:
    if name not in _VARIANTS:
        raise MMSoupError(f"variant must be 'paper' or 'author', got {name!r}.")
    v = replace(_VARIANTS[name], **{k: x for k, x in given.items() if x is not None})
    if v.bounds not in ("unit", "author"):
        raise MMSoupError(f"bounds must be 'unit' or 'author', got {v.bounds!r}.")
    return v


def _best_lambda(
    search: _Search, v: _Variant, acc_psi: float, run: _Run
) -> tuple[float, np.ndarray, bool]:
    """λ* = argmax ValAcc(Ψ'(λ)) by the optimizer: one pass (paper), or up to three (author);
    returns λ*, its accuracy and whether Ψ'(λ*) is accepted.

    Paper: λ* is the best λ evaluated in all passes (the first of equal maxima). Author
    (JrsPhase1.py Context.run): the decision is taken on pass 1, and each later pass's λ*
    replaces the one before, better or not.
    """
    lam0, tau = search.lam0, run.params["tau"]
    half = 0.5 * (1.0 - lam0)
    lo, hi = (0.0, 1.0) if v.bounds == "unit" else (lam0 - half, lam0 + half)
    stage, init, first = "pass1", np.full(search.m, lam0), None
    while stage is not None:
        search.stage = stage
        budget, seed = run.params["budget"], run.params["seed"]
        if v.literal:
            name, acc, lam = _optimize_as_author(run.opt_cls, search, init, lo, hi, budget, seed)
        else:
            name = _optimize(run.opt_cls, search, init, lo, hi, budget, seed)
            acc, lam = search.best()
        run.state.optimizers.append(
            {"candidate": search.candidate, "pass": stage, "optimizer": name}
        )
        if first is None:
            first = acc
            if not v.accepts(acc, acc_psi):
                break
        stage = v.next_pass(stage, acc, first, tau)
        init, lo, hi = np.clip(lam, 0.3, 1.0), 0.3, 1.0  # later passes: [0.3, 1] from λ*
    return acc, lam, v.accepts(first if v.literal else acc, acc_psi)


@dataclass
class _Run:
    """An MMS run: its inputs, and its state between candidates (resumable, `mmsoup.resume`)."""

    ingredients: Sequence[Ingredient]
    plan: dict[str, list[str]]  # component -> keys; REST (uncovered keys) last, fixed at λ0
    m: int  # components searched (REST excluded)
    params: dict[str, Any]
    opt_cls: Any
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


def mixed_weights(
    weights: Mapping[str, Sequence[float]], i: int, lambdas: Mapping[str, float]
) -> dict[str, list[float]]:
    """Per-component coefficients after mixing θ_i in: w_j ← λ_j·w_j + (1-λ_j)·e_i (MMS Alg. 1
    unrolled; the author's β of JrsPhase1.py convertLambdaToBeta, one column per ingredient)."""
    out = dict(weights)
    for c, lam in lambdas.items():
        onehot = np.eye(len(weights[c]))[i]
        out[c] = (lam * np.asarray(weights[c]) + (1.0 - lam) * onehot).tolist()
    return out


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
    ingredients, val_acc, plan, opt_cls, params, ingredient_val_accs, state_file, t0, v: _Variant
) -> _Run:
    """Ψ ← the best ingredient, or the saved state of an interrupted run with the same inputs."""
    comps = {c: keys for c, keys in plan.items() if c != REST}
    scorer = Scorer(val_acc)
    device = val_acc.device if isinstance(val_acc, Evaluator) else torch.device("cpu")
    run = dict(ingredients=ingredients, plan=plan, m=len(comps), params=params, scorer=scorer)
    run |= dict(opt_cls=opt_cls, device=device, t0=t0)
    fp = saved = None
    if state_file is not None:
        given = None if ingredient_val_accs is None else [float(a) for a in ingredient_val_accs]
        fp = resume.fingerprint(
            ingredients, comps, val_acc, params | {"ingredient_val_accs": given}
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
            order=v.order(saved.ingredient_val_accs),
            elapsed0=saved.elapsed_s,
        )
    accs, order = ranked(ingredients, scorer, ingredient_val_accs)
    order = v.order(accs)
    first = open_ingredient(ingredients[order[0]])
    psi = {k: x.to(device, copy=True) for k, x in first.items()}  # Ψ ← θ_0 (owned)
    acc_psi = accs[order[0]]
    if v.literal and ingredient_val_accs is not None:  # JrsPhase1.py run: ValAcc(A) evaluated
        acc_psi = scorer.state(psi, order[0], "anchor")
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
    mixed component (REST last), so the accepted steps replay the soup (`mms_steps`).
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
    `bounds`, `budget_per_component`, `accept_ties` and `refine` override one choice of a variant.
    """
    t0 = time.perf_counter()
    v = _variant(
        variant,
        bounds=bounds,
        budget_per_component=budget_per_component,
        accept_ties=accept_ties,
        refine=refine,
    )
    opt_cls = optimizer_class(optimizer)
    plan = _plan(ingredients, components)
    m = len(plan) - (REST in plan)
    budget = _DEFAULT_BUDGET[variant] if budget is None else budget
    budget = int(v.budget_per_component * m if v.budget_per_component is not None else budget)
    seed = _DEFAULT_SEED[variant] if seed is None else seed
    if budget < 1:
        raise MMSoupError(f"budget must be at least 1 evaluation, got {budget}.")
    if not 0.0 <= tau <= 1.0:
        raise MMSoupError(f"tau must lie in [0, 1] (the paper uses 0.998), got {tau}.")
    params = {"tau": tau, "budget": budget, "optimizer": optimizer, "seed": seed}
    params |= {"variant": variant} | {k: x for k, x in asdict(v).items() if k != "literal"}
    run = _start(
        ingredients, val_acc, plan, opt_cls, params, ingredient_val_accs, state_file, t0, v
    )
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
        search = _Search(run.scorer, st.psi, theta, run.plan, lam0, i, run.m)
        acc_tilde = search(np.full(run.m, lam0))  # Ψ̃ = k/(k+1)·Ψ + 1/(k+1)·θ_i
        decision = {"candidate": i, "decision": "skipped", "approx_acc": acc_tilde}
        if v.tries(acc_tilde, st.acc_psi, tau):  # else Ψ̃ is far worse than Ψ: skip θ_i
            best_acc, best_lam, accepted = _best_lambda(search, v, st.acc_psi, run)
            lambdas = search.full(best_lam)
            decision |= {"decision": "accepted" if accepted else "rejected"}
            decision |= {"best_acc": best_acc, "lambdas": lambdas}
            if accepted:
                run.accept(i, theta, lambdas, best_acc)  # Ψ ← Ψ'(λ*)
        st.decisions.append(decision)
        del theta, search  # drop the streamed candidate before opening the next
        st.done += 1
        run.commit(psi_changed=decision["decision"] == "accepted")

    info = {
        "recipe": "manifold_mixing_soup",
        "params": params,
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


def mms_steps(info: Mapping[str, Any]) -> list[tuple[int, list[float]]]:
    """(candidate, λ*) of each accepted step of an MMS soup, from its `info` (MMS Alg. 1)."""
    steps = [(d["candidate"], d.get("lambdas")) for d in info["decisions"]]
    steps = [s for s, d in zip(steps, info["decisions"]) if d["decision"] == "accepted"]
    if any(lam is None for _, lam in steps):
        raise MMSoupError(
            "This MMS soup was made by an older mmsoup that did not record λ* per step; "
            "rebuild it (notebook 02) to replay its steps."
        )
    return steps


def most_uneven_step(
    info: Mapping[str, Any], over: Sequence[int] | None = None
) -> tuple[int, float] | None:
    """The accepted MMS step whose λ* differs most between components, and that spread.

    The spread of a step is the standard deviation (population) of its λ* over the components
    `over` (indices into the step's λ*; default: every searched component, REST, held at λ0,
    never counts): 0 when the step mixed every component alike, as a plain average would. Returns
    (index into `mms_steps(info)`, spread); a tie goes to the later step; None when MMS accepted
    no candidate. This is the step the λ explorer opens on (notebook 06).
    """
    steps = mms_steps(info)
    if not steps:
        return None
    idx = list(range(int(info["n_components"]))) if over is None else list(over)
    if not idx:
        raise MMSoupError("most_uneven_step needs at least one component to measure λ* over.")
    spreads = [lambda_spread(lam, idx) for _, lam in steps]
    best = max(range(len(steps)), key=lambda k: (spreads[k], k))
    return best, spreads[best]


def lambda_spread(lam: Sequence[float], over: Sequence[int]) -> float:
    """The standard deviation (population) of λ* over the component indices `over`."""
    return float(np.std([lam[j] for j in over]))


def wise_ft(zeroshot: Ingredient, finetuned: Ingredient, alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: θ(α) = (1-α)·θ_zeroshot + α·θ_finetuned (WiSE-FT, Wortsman et al., CVPR 2022)."""
    spec = validate_pool([zeroshot, finetuned])
    zs, ft = open_ingredient(zeroshot), open_ingredient(finetuned)
    fixed = set(buffer_keys(spec))  # integer buffers: the fine-tuned model's
    return {k: ft[k].clone() if k in fixed else torch.lerp(zs[k], ft[k], float(alpha)) for k in zs}
