"""The λ search of the manifold mixing soup: λ* = argmax_λ ValAcc(Ψ'(λ)) by a nevergrad optimizer
(MMS §3, Alg. 1), as the paper describes it or as the author's released code runs it.

`LambdaSearch` holds a run's rules (`_Variant`: "paper" or "author"), optimizer, budget and seed;
`mmsoup.soups.manifold_mixing_soup` asks it, per candidate θ_i, whether to search (the τ test),
for λ* and whether Ψ'(λ*) is accepted, without knowing which variant runs. The author variant
emulates JrsPhase1.py (Context.run, Context.doOptimization) where the paper says nothing: its
ranking, its bounds and passes, its λ* (nevergrad's recommendation, float32).

nevergrad runs scipy's and cma's optimizers in threads and draws from numpy's and cma's global
random state; `_optimizer_env` seeds both for one search and stops the threads before it returns.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import nevergrad as ng
import numpy as np
from nevergrad.common.errors import (
    FinishedUnderlyingOptimizerWarning,
    NevergradEarlyStopping,
    NevergradWarning,
)
from nevergrad.optimization.optimizerlib import NGOptBase
from nevergrad.optimization.recaster import RecastOptimizer, _MessagingThread

from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator
from mmsoup.mixing import interpolate
from mmsoup.result import Scorer, StateDict, best_first


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
    """Stop and join the threads nevergrad started to run scipy or cma optimizers since `before`.

    nevergrad has no public way to end them: a recast optimizer (nevergrad/optimization/recaster.py,
    `SequentialRecastOptimizer`, e.g. Cobyla, SQP, CmaFmin2) runs its library in a
    `_MessagingThread` that blocks for the next loss; only `RecastOptimizer.__del__` and
    `MessagingThread.__del__` post its stop message, when the optimizer (possibly deep inside
    NGOpt's selection or a portfolio) is garbage-collected, and nothing joins the thread
    (nevergrad issues #180 and #325, open). So the threads are found by their class, told to
    stop with `_MessagingThread.stop` (nevergrad's own stop message) and joined here.
    """
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

    The cma patch stays: nevergrad's CmaFmin2 (nevergrad/optimization/recastlib.py,
    `NonObjectOptimizer`) calls `cma.fmin` with options of its own and no seed, so cma seeds
    itself from the clock (its default option seed='time'); nevergrad offers no way to pass one.
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


@dataclass(frozen=True)
class LambdaSearch:
    """The λ search of one MMS run: a variant's rules, a nevergrad optimizer, its budget and seed.

    `configure` checks the variant and the optimizer (before the pool is read); `sized` fixes the
    budget for m searched components and checks it and τ. `params` is what the run records.
    """

    variant: str
    rules: _Variant
    opt_cls: Any
    optimizer: str
    m: int = 0
    tau: float = 0.998
    budget: int = 0
    seed: int = 0

    @classmethod
    def configure(cls, variant: str, optimizer: str, **overrides) -> LambdaSearch:
        """The rules of `variant` ("paper" or "author"), each override not None replacing one."""
        return cls(variant, _variant(variant, **overrides), optimizer_class(optimizer), optimizer)

    def sized(self, m: int, tau: float, budget: int | None, seed: int | None) -> LambdaSearch:
        """The search for m components: the variant's budget and seed unless given."""
        v = self.rules
        budget = _DEFAULT_BUDGET[self.variant] if budget is None else budget
        budget = int(v.budget_per_component * m if v.budget_per_component is not None else budget)
        seed = _DEFAULT_SEED[self.variant] if seed is None else seed
        if budget < 1:
            raise MMSoupError(f"budget must be at least 1 evaluation, got {budget}.")
        if not 0.0 <= tau <= 1.0:
            raise MMSoupError(f"tau must lie in [0, 1] (the paper uses 0.998), got {tau}.")
        return replace(self, m=m, tau=tau, budget=budget, seed=seed)

    @property
    def params(self) -> dict[str, Any]:
        """The run's parameters, as recorded in `info["params"]` (and its resume fingerprint)."""
        params = {"tau": self.tau, "budget": self.budget, "optimizer": self.optimizer}
        params |= {"seed": self.seed, "variant": self.variant}
        return params | {k: x for k, x in asdict(self.rules).items() if k != "literal"}

    def order(self, accs: Sequence[float]) -> list[int]:
        """The ingredients best-first (the author's ties: reverse input order)."""
        return self.rules.order(accs)

    def first_acc(
        self, scorer: Scorer, psi: StateDict, best: int, acc: float, given: bool
    ) -> float:
        """ValAcc(Ψ) of Ψ ← the best ingredient: its ranked accuracy; the author's run
        (JrsPhase1.py run: ValAcc(A) evaluated) evaluates Ψ when the accuracies were given."""
        return scorer.state(psi, best, "anchor") if self.rules.literal and given else acc

    def objective(self, scorer: Scorer, psi, theta, plan, lam0: float, candidate: int) -> _Search:
        """λ -> ValAcc(Ψ'(λ)) for candidate θ_i, memoised; `objective(np.full(m, λ0))` is Ψ̃."""
        return _Search(scorer, psi, theta, plan, lam0, candidate, self.m)

    def tries(self, acc_tilde: float, acc_psi: float) -> bool:
        """The τ test (MMS Alg. 1): search λ only if ValAcc(Ψ̃) passes τ·ValAcc(Ψ)."""
        return self.rules.tries(acc_tilde, acc_psi, self.tau)

    def best(
        self, search: _Search, acc_psi: float, log: list[dict[str, Any]]
    ) -> tuple[float, np.ndarray, bool]:
        """λ* = argmax ValAcc(Ψ'(λ)) by the optimizer: one pass (paper), or up to three (author);
        returns λ*'s accuracy, λ* and whether Ψ'(λ*) is accepted; each pass's optimizer is
        appended to `log`.

        Paper: λ* is the best λ evaluated in all passes (the first of equal maxima). Author
        (JrsPhase1.py Context.run): the decision is taken on pass 1, and each later pass's λ*
        replaces the one before, better or not.
        """
        v, lam0, tau = self.rules, search.lam0, self.tau
        half = 0.5 * (1.0 - lam0)
        lo, hi = (0.0, 1.0) if v.bounds == "unit" else (lam0 - half, lam0 + half)
        stage, init, first = "pass1", np.full(search.m, lam0), None
        while stage is not None:
            search.stage = stage
            budget, seed = self.budget, self.seed
            if v.literal:
                name, acc, lam = _optimize_as_author(
                    self.opt_cls, search, init, lo, hi, budget, seed
                )
            else:
                name = _optimize(self.opt_cls, search, init, lo, hi, budget, seed)
                acc, lam = search.best()
            log.append({"candidate": search.candidate, "pass": stage, "optimizer": name})
            if first is None:
                first = acc
                if not v.accepts(acc, acc_psi):
                    break
            stage = v.next_pass(stage, acc, first, tau)
            init, lo, hi = np.clip(lam, 0.3, 1.0), 0.3, 1.0  # later passes: [0.3, 1] from λ*
        return acc, lam, v.accepts(first if v.literal else acc, acc_psi)
