"""What every soup recipe shares: the result record, the scorer that runs, counts and traces each
held-out evaluation, and the best-first ranking of the ingredients (Soups Recipe 1, MMS Alg. 1).

A leaf module: the recipes (`mmsoup.soups`, `mmsoup.learned`) import it, it imports no recipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from mmsoup.checkpoints import Ingredient, iter_ingredients, save_state_dict
from mmsoup.errors import MMSoupError

StateDict = Mapping[str, Tensor]
ValAcc = Callable[[StateDict], float]
ALL = "all"  # the single component of a whole-model recipe (uniform/greedy weights)
REST = (
    "_uncovered"  # keys in no component: MMS mixes them at λ0 = k/(k+1), the learned soup uniformly
)


@dataclass
class SoupResult:
    """A fused model, its held-out accuracy and how it was made (any soup recipe)."""

    state_dict: dict[str, Tensor]
    val_acc: float
    ingredients: list[int]  # indices into the inputs, in mixing order (best model first)
    weights: dict[str, list[float]]  # component -> one coefficient per input, summing to 1
    n_evals: int  # every val_acc evaluation, the ingredients' own included
    trace: list[dict[str, Any]]  # one row per evaluation
    ingredient_val_accs: list[float]
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fused state dict (.safetensors) with weights, trace and info in the sidecar."""
        meta = {k: getattr(self, k) for k in ("val_acc", "ingredients", "weights", "n_evals")}
        meta |= {"ingredient_val_accs": self.ingredient_val_accs, "trace": self.trace}
        return save_state_dict(self.state_dict, path, meta={**meta, "info": self.info})


class Scorer:
    """Runs, counts and traces every real val_acc evaluation (one trace row each)."""

    def __init__(self, val_acc: ValAcc) -> None:
        self.val_acc = val_acc
        self.trace: list[dict[str, Any]] = []

    def log(
        self, acc: float, candidate: int, stage: str, lambdas: Sequence[float] | None = None
    ) -> float:
        """Record one evaluation's accuracy and return it."""
        lam = None if lambdas is None else [float(v) for v in lambdas]
        row = dict(eval=len(self.trace), candidate=candidate, stage=stage, lambdas=lam, acc=acc)
        self.trace.append(row)
        return acc

    def state(
        self, state: StateDict, candidate: int, stage: str, lambdas: Sequence[float] | None = None
    ) -> float:
        """Evaluate and record a state dict."""
        return self.log(float(self.val_acc(state)), candidate, stage, lambdas)


def best_first(accs: Sequence[float]) -> list[int]:
    """Indices by decreasing accuracy; ties keep the input order (a stable sort)."""
    return sorted(range(len(accs)), key=lambda i: -accs[i])


def ranked(
    ingredients: Sequence[Ingredient], scorer: Scorer, given: Sequence[float] | None
) -> tuple[list[float], list[int]]:
    """Each ingredient's own accuracy (computed once unless `given`) and the order best-first."""
    if given is not None:
        if len(given) != len(ingredients):
            raise MMSoupError(
                f"ingredient_val_accs has {len(given)} entries for {len(ingredients)} ingredients; pass one per ingredient."
            )
        accs = [float(a) for a in given]
    else:
        accs = [scorer.state(sd, i, "ingredient") for i, sd in iter_ingredients(ingredients)]
    return accs, best_first(accs)
