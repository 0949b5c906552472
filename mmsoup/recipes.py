"""Every recipe once, as data: its name, how it is built, the file it writes, how Figure 2 draws it.

`RECIPES` is the one ordered table. The soup stage builds the recipes in its order, the evaluation
stage scores each by its `kind` (a soup or WiSE-FT is one set of weights; an ensemble is its
members' mean logits, Soups §2), and Table 1 and Figure 2 list them by kind (`SHOWN`), as MMS
Table 1 lists the soups before the ensembles. A name is what Table 1, Figure 2 and `--recipe` show.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from mmsoup.errors import MMSoupError

if TYPE_CHECKING:
    from mmsoup.evaluate import Evaluator

Kind = Literal["soup", "ensemble", "wise"]
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
}


@dataclass(frozen=True)
class Pool:
    """What every recipe is built from: the ingredients and the held-out evaluator (Soups §2)."""

    profile: str
    paths: list[Path]  # model_0 (the LP init) first, then the fine-tuned models
    heldout: Evaluator
    val_accs: list[float]  # each ingredient's own held-out accuracy


@dataclass(frozen=True)
class Recipe:
    """One recipe: `build(recipe, pool, file)` builds it on the held-out split and writes `file`."""

    name: str
    kind: Kind
    build: Callable[[Recipe, Pool, Path], None]
    style: Style
    scheme: str | None = None  # the component partition (mmsoup.partition) it mixes over

    @property
    def file(self) -> str:
        """The file it writes under run_dir/soups: weights, or an ensemble's members as JSON."""
        return slug(self.name) + (".json" if self.kind == "ensemble" else ".safetensors")

    def write(self, pool: Pool, out: Path) -> Path:
        """Build this recipe from `pool` and write it into the folder `out`."""
        file = out / self.file
        self.build(self, pool, file)
        return file


def slug(name: str) -> str:
    """A file name for a method: `MMS-C8` -> `mms_c8`."""
    return name.lower().replace("-", "_").replace(" ", "_")


# -- how each recipe is built ----------------------------------------------------------------------
def _uniform(recipe: Recipe, pool: Pool, file: Path) -> None:
    """The mean of every ingredient's weights (Soups §2, uniform soup)."""
    from mmsoup.checkpoints import save_state_dict
    from mmsoup.soups import uniform_soup

    state = uniform_soup(pool.paths)
    meta = {
        "recipe": "uniform_soup",
        "val_acc": pool.heldout(state),
        "ingredients": list(range(len(pool.paths))),
    }
    save_state_dict(state, file, meta)


def _greedy(recipe: Recipe, pool: Pool, file: Path) -> None:
    """Add ingredients by held-out accuracy while the soup improves (Soups Recipe 1)."""
    from mmsoup.soups import greedy_soup

    greedy_soup(pool.paths, pool.heldout, ingredient_val_accs=pool.val_accs).save(file)


def _mms(recipe: Recipe, pool: Pool, file: Path) -> None:
    """Manifold mixing over `recipe.scheme`'s components (MMS Alg. 1); resumable per candidate."""
    from mmsoup import resume
    from mmsoup.partition import partition
    from mmsoup.profiles import get_profile
    from mmsoup.soups import manifold_mixing_soup

    model = pool.heldout.model
    comps = partition(model.state_dict(), recipe.scheme, model=model)
    state = file.with_suffix(".state.json")  # a killed run resumes at its next candidate
    res = manifold_mixing_soup(
        pool.paths,
        pool.heldout,
        comps,
        budget=get_profile(pool.profile).mms_budget,
        ingredient_val_accs=pool.val_accs,
        state_file=state,
    )
    res.save(file)
    resume.remove(state)


def _learned(recipe: Recipe, pool: Pool, file: Path) -> None:
    """Per-component mixing weights learned by gradient descent on held-out (Soups App. I)."""
    from mmsoup.learned import learned_soup
    from mmsoup.partition import partition

    model = pool.heldout.model
    comps = partition(model.state_dict(), recipe.scheme, model=model)
    learned_soup(pool.paths, pool.heldout, comps, ingredient_val_accs=pool.val_accs).save(file)


def _wise(recipe: Recipe, pool: Pool, file: Path) -> None:
    """WiSE-FT of the best fine-tuned model toward the LP init, α chosen on held-out (WiSE-FT, Wortsman et al., CVPR 2022)."""
    from mmsoup.checkpoints import save_state_dict
    from mmsoup.soups import wise_ft

    paths, accs, ev = pool.paths, pool.val_accs, pool.heldout
    best = max(range(1, len(paths)), key=lambda i: accs[i])  # model_0 is the LP init itself
    scores = {a: ev(wise_ft(paths[0], paths[best], a)) for a in WISE_ALPHAS}
    alpha = max(scores, key=lambda a: (scores[a], -a))  # ties: the one nearer the LP init
    state = wise_ft(paths[0], paths[best], alpha)
    meta = {
        "recipe": "wise_ft",
        "alpha": alpha,
        "finetuned": best,
        "val_acc": scores[alpha],
        "ingredients": [0, best],
        "alphas": scores,
    }
    save_state_dict(state, file, meta)


def _ensemble(recipe: Recipe, pool: Pool, file: Path, greedy: bool) -> None:
    """Every ingredient's logits averaged, or greedily chosen ones' (Soups §2, Table 3)."""
    from mmsoup.soups import greedy_ensemble, logit_ensemble

    (greedy_ensemble if greedy else logit_ensemble)(pool.paths, pool.heldout).save(file)


# -- the table -------------------------------------------------------------------------------------
RECIPES: tuple[Recipe, ...] = (  # in build order
    Recipe("Uniform soup", "soup", _uniform, ("D", PALETTE["blue"], 60, 5)),
    Recipe("Greedy soup", "soup", _greedy, ("*", PALETTE["orange"], 180, 6)),
    # the paper's rows: every component of the partition searched, as MMS Alg. 1 and its Table 1
    Recipe("MMS-C8", "soup", _mms, ("P", PALETTE["red"], 110, 7), scheme="C8"),
    Recipe("MMS-C15", "soup", _mms, ("X", PALETTE["purple"], 90, 6), scheme="C15"),
    Recipe("MMS-C26", "soup", _mms, ("p", PALETTE["brown"], 90, 6), scheme="C26"),
    # mmsoup's ablation: components that cannot change a prediction (the text tower's leftovers)
    # left out of the search (mmsoup.partition.live_components); fewer dimensions for the optimizer
    Recipe("MMS-C8+live", "soup", _mms, ("P", PALETTE["light red"], 55, 4), scheme="C8+live"),
    Recipe("MMS-C15+live", "soup", _mms, ("X", PALETTE["light purple"], 45, 4), scheme="C15+live"),
    Recipe("MMS-C26+live", "soup", _mms, ("p", PALETTE["light brown"], 45, 4), scheme="C26+live"),
    Recipe("Learned soup", "soup", _learned, ("h", PALETTE["green"], 90, 5), scheme="C26+live"),
    Recipe("WiSE-FT", "wise", _wise, ("<", PALETTE["olive"], 75, 5)),
    Recipe(
        "Ensemble",
        "ensemble",
        functools.partial(_ensemble, greedy=False),
        ("^", PALETTE["cyan"], 75, 5),
    ),
    Recipe(
        "Greedy ensemble",
        "ensemble",
        functools.partial(_ensemble, greedy=True),
        ("v", PALETTE["navy"], 75, 5),
    ),
)
NAMES = tuple(r.name for r in RECIPES)
KIND_ORDER: tuple[Kind, ...] = ("soup", "ensemble", "wise")
SHOWN = tuple(sorted(RECIPES, key=lambda r: KIND_ORDER.index(r.kind)))  # Table 1, Figure 2
MMS_SCHEMES = {r.name: r.scheme for r in RECIPES if r.build is _mms}
_BY_NAME = {r.name: r for r in RECIPES}


def recipe(name: str) -> Recipe:
    """The recipe called `name` (e.g. 'MMS-C8'); an unknown name is one sentence listing them."""
    if name not in _BY_NAME:
        raise MMSoupError(f"Unknown recipe {name!r}; pick from {', '.join(NAMES)}.")
    return _BY_NAME[name]
