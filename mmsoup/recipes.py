"""Every recipe once, as data: its name, how it is built, what it needs, how Figure 2 draws it.

`REGISTRY` is the one table of recipes, for the study (`pipeline.soup_stage`, Table 1, Figure 2,
the replicate study), for your own checkpoints (`mmsoup soup --config`, `mmsoup.own`) and for
`mmsoup distributed`: each of them makes a `Pool` and calls `Recipe.build(pool)`, which returns a
`SoupResult` (one set of weights) or an `EnsembleResult` (members' mean logits, Soups §2). No other
module lists recipes or branches on a recipe's name.

`RECIPES` are the rows the study builds, in build order; Table 1 and Figure 2 list them by kind
(`SHOWN`), as MMS Table 1 lists the soups before the ensembles. One vocabulary names a recipe
everywhere: its name ("MMS-C8", what Table 1 shows), its key ("mms_c8", the file name of
`soup --config`) or a short alias ("mms", "uniform").

Adding a recipe: write its builder `build(recipe, pool) -> SoupResult` in its own module, and add
one `Recipe` row here (`needs` says which parts of the pool it uses; `study=True` puts it in the
study, Table 1, Figure 2 and the replicate study). `mmsoup/model_stock.py` is the example.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mmsoup.errors import MMSoupError

if TYPE_CHECKING:
    from mmsoup.checkpoints import Ingredient
    from mmsoup.ensembles import EnsembleResult
    from mmsoup.result import SoupResult

Kind = Literal["soup", "ensemble", "wise"]
Need = Literal["evaluator", "anchor", "components"]
Style = tuple[str, str, float, int]  # Figure 2: marker, colour, size in pt^2, z-order
WISE_ALPHAS = tuple(round(a, 2) for a in np.linspace(0.1, 1.0, 10))
PALETTE = {  # seaborn "colorblind"
    "blue": "#0173b2",
    "orange": "#de8f05",
    "green": "#029e73",
    "red": "#d55e00",
    "purple": "#cc78bc",
    "brown": "#ca9161",
    "pink": "#fbafe4",
    "grey": "#949494",
    "yellow": "#ece133",
    "navy": "#1f3a93",
    "cyan": "#56b4e9",
    "olive": "#8c8c00",
    "light red": "#f4a582",
    "light purple": "#e6bde0",
    "light brown": "#e3c9a8",
    "teal": "#17becf",
}


@dataclass
class Pool:
    """What every recipe is built from: the ingredients, the held-out scorer and, for the recipes
    that need them, the anchor and the components (Soups §2; MMS Alg. 1).

    The study, `soup --config` and `distributed` each make one; a recipe reads only these fields.
    """

    ingredients: Sequence[Ingredient]
    heldout: Callable[[Mapping[str, Any]], float]  # an Evaluator, or any state dict -> accuracy
    val_accs: list[float] | None = None  # each ingredient's own held-out accuracy, when known
    anchor: Ingredient | None = None  # the weights fine-tuning started from (model_0, `init:`)
    scheme: str | None = None  # the partition of a recipe that does not fix its own
    partition: Callable[[str], Mapping[str, Sequence[str]]] | None = None  # scheme -> components
    mms: Mapping[str, Any] = field(default_factory=dict)  # manifold_mixing_soup's options
    learned: Mapping[str, Any] = field(default_factory=dict)  # learned_soup's options
    progress: bool = True
    state_dir: Path | None = None  # where a resumable recipe keeps its state (the study's soups/)

    @property
    def evaluator(self) -> Any:
        """The held-out Evaluator (tensors and a model), or None for a plain callable."""
        from mmsoup.evaluate import Evaluator

        return self.heldout if isinstance(self.heldout, Evaluator) else None

    @property
    def best(self) -> int:
        """The best ingredient by held-out accuracy (the first of equal maxima), else 0."""
        return int(np.argmax(self.val_accs)) if self.val_accs else 0

    @property
    def anchor_index(self) -> int | None:
        """The anchor's position among the ingredients (the study's model_0), or None."""
        import os

        def where(x: Any) -> Any:
            return os.path.abspath(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else id(x)

        return (
            next(
                (i for i, p in enumerate(self.ingredients) if where(p) == where(self.anchor)), None
            )
            if self.anchor is not None
            else None
        )

    @property
    def finetuned(self) -> list[int]:
        """The ingredients other than the anchor (the fine-tuned models)."""
        return [i for i in range(len(self.ingredients)) if i != self.anchor_index]

    @functools.cached_property
    def _components(self) -> dict[str, Mapping[str, Sequence[str]]]:
        return {}

    def components(self, scheme: str | None) -> Mapping[str, Sequence[str]]:
        """The components of `scheme` (or of the pool's own scheme), computed once per scheme."""
        scheme = scheme or self.scheme
        if scheme not in self._components:
            self._components[scheme] = self.partition(scheme)
        return self._components[scheme]


Result = Any  # SoupResult | EnsembleResult


@dataclass(frozen=True)
class Recipe:
    """One recipe: `builder(recipe, pool)` returns its result (a `SoupResult` or an ensemble's)."""

    name: str
    kind: Kind
    builder: Callable[[Recipe, Pool], Result]
    style: Style
    scheme: str | None = None  # the component partition it mixes over (None: the pool's)
    needs: frozenset[Need] = frozenset()
    aliases: tuple[str, ...] = ()
    study: bool = True  # built by the study (Table 1, Figure 2, the replicate study)
    record: Callable[[SoupResult], dict[str, Any]] | None = None  # a compact study sidecar

    @property
    def key(self) -> str:
        """Its short name in `soup --config` (files, results): the first alias, else the slug."""
        return self.aliases[0] if self.aliases else slug(self.name)

    @property
    def file(self) -> str:
        """The file it writes under run_dir/soups: weights, or an ensemble's members as JSON."""
        return slug(self.name) + (".json" if self.kind == "ensemble" else ".safetensors")

    def check(self, pool: Pool, where: str = "") -> None:
        """One sentence if `pool` lacks what this recipe needs (before any work)."""
        if "evaluator" in self.needs and pool.evaluator is None:
            raise MMSoupError(
                f"Recipe {self.name!r} needs the held-out tensors (an Evaluator){where}, not an accuracy callable; drop it from the recipes."
            )
        if "anchor" in self.needs and pool.anchor is None:
            raise MMSoupError(
                f"Recipe {self.name!r} needs the weights fine-tuning started from{where}: give `init:` in the config (--init for distributed)."
            )
        if "components" in self.needs and (
            pool.partition is None or not (self.scheme or pool.scheme)
        ):
            raise MMSoupError(f"Recipe {self.name!r} needs a partition scheme{where}.")

    def build(self, pool: Pool) -> Result:
        """Build this recipe from `pool` on its held-out scorer."""
        self.check(pool)
        return self.builder(self, pool)

    def state_file(self, out: Path) -> Path:
        """Where a resumable build keeps its state under `out` (MMS: one file per candidate)."""
        return out / (slug(self.name) + ".state.json")

    def write(self, pool: Pool, out: Path) -> Path:
        """Build this recipe from `pool` and write it into the study's folder `out`."""
        from mmsoup import resume
        from mmsoup.checkpoints import save_state_dict

        file = out / self.file
        result = self.build(pool)
        if self.record is not None:
            save_state_dict(result.state_dict, file, self.record(result))
        else:
            result.save(file)
        resume.remove(self.state_file(out))  # a finished build's resume state (if any)
        return file


def slug(name: str) -> str:
    """A file name for a method: `MMS-C8` -> `mms_c8`."""
    return name.lower().replace("-", "_").replace(" ", "_")


# -- how each recipe is built ----------------------------------------------------------------------
def _uniform(recipe: Recipe, pool: Pool) -> SoupResult:
    """The mean of every ingredient's weights (Soups §2, uniform soup)."""
    from mmsoup.result import ALL, Scorer, SoupResult
    from mmsoup.soups import uniform_soup

    t0, n = time.perf_counter(), len(pool.ingredients)
    scorer = Scorer(pool.heldout)
    state = uniform_soup(pool.ingredients, buffers_from=pool.best)
    acc = scorer.state(state, -1, "uniform")
    info = {"recipe": "uniform_soup", "wall_time_s": time.perf_counter() - t0}
    accs = list(pool.val_accs or [])
    return SoupResult(state, acc, list(range(n)), {ALL: [1 / n] * n}, 1, scorer.trace, accs, info)


def _greedy(recipe: Recipe, pool: Pool) -> SoupResult:
    """Add ingredients by held-out accuracy while the soup improves (Soups Recipe 1)."""
    from mmsoup.soups import greedy_soup

    return greedy_soup(
        pool.ingredients, pool.heldout, ingredient_val_accs=pool.val_accs, progress=pool.progress
    )


def mms_warning(n: int | None, tau: float, best_acc: float) -> str | None:
    """The τ test cannot pass once mixing loses a single held-out image when one image (1/n) is
    worth more than τ allows below the best model ((1 - τ)·acc): MMS then keeps only candidates
    that lose nothing, and likely returns the best checkpoint alone. None when it can (or when
    the held-out size `n` is unknown: an accuracy callable)."""
    import math

    if n is None or best_acc <= 0:
        return None
    allowed = (1.0 - tau) * best_acc
    if 1.0 / n <= allowed:
        return None
    fix = (
        f"use at least {math.ceil(1.0 / allowed)} held-out images or a lower tau (at most "
        f"{math.floor((1.0 - 1.0 / (n * best_acc)) * 1000) / 1000:g} for these {n})"
        if tau < 1
        else "lower tau (tau = 1 allows no loss at all)"
    )
    return (
        f"MMS will likely return the best checkpoint alone: one held-out image is 1/{n} = "
        f"{1.0 / n:.4f} of accuracy, more than tau = {tau:g} allows below the best model "
        f"((1 - tau)·acc = {allowed:.4f} at acc {best_acc:.4f}), so only a candidate whose mix "
        f"loses no held-out image is tried; {fix}."
    )


def _mms(recipe: Recipe, pool: Pool) -> SoupResult:
    """Manifold mixing over the recipe's components (MMS Alg. 1); resumable per candidate when
    the pool has a `state_dir`. With `pool.mms["warn"]`, first one warning sentence on stderr
    when one held-out image is worth more than τ allows (`mms_warning`)."""
    import inspect

    from mmsoup.soups import manifold_mixing_soup

    options = dict(pool.mms)
    warning = None
    if options.pop("warn", False) and pool.val_accs:
        tau = options.get("tau", inspect.signature(manifold_mixing_soup).parameters["tau"].default)
        n = None if pool.evaluator is None else pool.evaluator.n
        warning = mms_warning(n, tau, pool.val_accs[pool.best])
    if warning:  # before the search: what it will likely return, and why
        print(f"mmsoup: warning: {warning}", file=sys.stderr, flush=True)
    state = None if pool.state_dir is None else recipe.state_file(pool.state_dir)
    res = manifold_mixing_soup(
        pool.ingredients,
        pool.heldout,
        pool.components(recipe.scheme),
        ingredient_val_accs=pool.val_accs,
        progress=pool.progress,
        state_file=state,
        **options,
    )
    if warning:
        res.info["warning"] = warning
    return res


def _learned(recipe: Recipe, pool: Pool) -> SoupResult:
    """Per-component mixing weights learned by gradient descent on held-out (Soups App. I)."""
    from mmsoup.learned import learned_soup

    return learned_soup(
        pool.ingredients,
        pool.heldout,
        pool.components(recipe.scheme),
        ingredient_val_accs=pool.val_accs,
        progress=pool.progress,
        **pool.learned,
    )


def _wise(recipe: Recipe, pool: Pool) -> SoupResult:
    """WiSE-FT of the best fine-tuned model toward the anchor, α chosen on held-out (WiSE-FT,
    Wortsman et al., CVPR 2022): θ(α) = (1-α)·θ_0 + α·θ_ft for α in 0.1 .. 1.0."""
    from mmsoup.result import ALL, Scorer, SoupResult
    from mmsoup.soups import wise_ft

    t0, paths, scorer = time.perf_counter(), pool.ingredients, Scorer(pool.heldout)
    if pool.val_accs is None:
        from mmsoup.result import ranked

        pool.val_accs, _ = ranked(paths, scorer, None)
    accs = pool.val_accs
    best = max(pool.finetuned, key=lambda i: accs[i])  # the first of equal maxima
    scores = {
        a: scorer.state(wise_ft(pool.anchor, paths[best], a), best, "wise", [a])
        for a in WISE_ALPHAS
    }
    alpha = max(scores, key=lambda a: (scores[a], -a))  # ties: the one nearer the anchor
    at = pool.anchor_index
    weights = [0.0] * len(paths)
    weights[best] += alpha
    if at is not None:
        weights[at] += 1 - alpha
    info = {
        "recipe": "wise_ft",
        "alpha": alpha,
        "finetuned": best,
        "alphas": scores,
        "wall_time_s": time.perf_counter() - t0,
    }
    return SoupResult(
        state_dict=wise_ft(pool.anchor, paths[best], alpha),
        val_acc=scores[alpha],
        ingredients=([] if at is None else [at]) + [best],
        weights={ALL: weights},
        n_evals=len(scorer.trace),
        trace=scorer.trace,
        ingredient_val_accs=list(accs),
        info=info,
    )


def _wise_record(res: SoupResult) -> dict[str, Any]:
    """The study's WiSE-FT sidecar: α, the fine-tuned model, held-out accuracy per α."""
    i = res.info
    meta = {"recipe": "wise_ft", "alpha": i["alpha"], "finetuned": i["finetuned"]}
    return meta | {"val_acc": res.val_acc, "ingredients": res.ingredients, "alphas": i["alphas"]}


def _uniform_record(res: SoupResult) -> dict[str, Any]:
    """The study's uniform-soup sidecar: no search to record."""
    return {"recipe": "uniform_soup", "val_acc": res.val_acc, "ingredients": res.ingredients}


def _ensemble(recipe: Recipe, pool: Pool, greedy: bool) -> EnsembleResult:
    """Every ingredient's logits averaged, or greedily chosen ones' (Soups §2, Table 3)."""
    from mmsoup.ensembles import greedy_ensemble, logit_ensemble

    return (greedy_ensemble if greedy else logit_ensemble)(pool.ingredients, pool.evaluator)


def builder(target: str) -> Callable[[Recipe, Pool], Result]:
    """A builder in its own module, imported when first called: 'mmsoup.model_stock:build'."""

    def build(recipe: Recipe, pool: Pool) -> Result:
        import importlib

        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(recipe, pool)

    return build


# -- the table -------------------------------------------------------------------------------------
_MMS = frozenset({"components"})
REGISTRY: tuple[Recipe, ...] = (  # the study builds its rows in this order
    Recipe("Uniform soup", "soup", _uniform, ("D", PALETTE["blue"], 60, 5), aliases=("uniform",), record=_uniform_record),
    Recipe("Greedy soup", "soup", _greedy, ("*", PALETTE["orange"], 180, 6), aliases=("greedy",)),
    # MMS over the pool's partition (`partition:` of a config, --scheme of distributed)
    Recipe("MMS", "soup", _mms, ("P", PALETTE["red"], 110, 7), needs=_MMS, aliases=("mms",), study=False),
    # the paper's rows: every component of the partition searched, as MMS Alg. 1 and its Table 1
    Recipe("MMS-C8", "soup", _mms, ("P", PALETTE["red"], 110, 7), scheme="C8", needs=_MMS),
    Recipe("MMS-C15", "soup", _mms, ("X", PALETTE["purple"], 90, 6), scheme="C15", needs=_MMS),
    Recipe("MMS-C26", "soup", _mms, ("p", PALETTE["brown"], 90, 6), scheme="C26", needs=_MMS),
    # mmsoup's ablation: components that cannot change a prediction (the text tower's leftovers)
    # left out of the search (mmsoup.partition.live_components); fewer dimensions for the optimizer
    Recipe("MMS-C8+live", "soup", _mms, ("P", PALETTE["light red"], 55, 4), scheme="C8+live", needs=_MMS),
    Recipe("MMS-C15+live", "soup", _mms, ("X", PALETTE["light purple"], 45, 4), scheme="C15+live", needs=_MMS),
    Recipe("MMS-C26+live", "soup", _mms, ("p", PALETTE["light brown"], 45, 4), scheme="C26+live", needs=_MMS),
    # the pool's partition: the study's is STUDY_SCHEME
    Recipe("Learned soup", "soup", _learned, ("h", PALETTE["green"], 90, 5), needs=frozenset({"components", "evaluator"}), aliases=("learned",)),
    # no held-out search: the ratio to the anchor from the angle between updates (Jang et al. 2024)
    Recipe("Model Stock", "soup", builder("mmsoup.model_stock:build"), ("d", PALETTE["teal"], 80, 5), needs=frozenset({"anchor"})),
    Recipe("WiSE-FT", "wise", _wise, ("<", PALETTE["olive"], 75, 5), needs=frozenset({"anchor"}), aliases=("wise",), record=_wise_record),
    Recipe("Ensemble", "ensemble", functools.partial(_ensemble, greedy=False), ("^", PALETTE["cyan"], 75, 5), needs=frozenset({"evaluator"}), aliases=("ensemble",)),
    Recipe("Greedy ensemble", "ensemble", functools.partial(_ensemble, greedy=True), ("v", PALETTE["navy"], 75, 5), needs=frozenset({"evaluator"}), aliases=("greedy_ensemble",)),
)  # fmt: skip
STUDY_SCHEME = "C26+live"  # the study's partition for a recipe that fixes none (the learned soup)
ABLATION = ("Uniform soup", "Greedy soup", "MMS-C8")  # the conditions ablation's (chapter 09)
RECIPES = tuple(r for r in REGISTRY if r.study)  # the study's, in build order
NAMES = tuple(r.name for r in RECIPES)
KIND_ORDER: tuple[Kind, ...] = ("soup", "ensemble", "wise")
SHOWN = tuple(sorted(RECIPES, key=lambda r: KIND_ORDER.index(r.kind)))  # Table 1, Figure 2
MMS_SCHEMES = {r.name: r.scheme for r in RECIPES if r.builder is _mms}
_BY_NAME = {
    spelling.lower(): r for r in REGISTRY for spelling in (r.name, slug(r.name), *r.aliases)
}


def vocabulary() -> str:
    """The recipes as `--recipe` and `recipes:` accept them: name (key), one per recipe."""
    return ", ".join(f"{r.name} ({r.key})" for r in REGISTRY)


def recipe(name: str) -> Recipe:
    """The recipe called `name` ('MMS-C8', 'mms_c8', 'mms'; any case); an unknown name is one
    sentence listing them."""
    found = _BY_NAME.get(str(name).lower())
    if found is None:
        raise MMSoupError(f"Unknown recipe {name!r}; pick from {vocabulary()}.")
    return found
