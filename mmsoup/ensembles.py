"""Logit ensembles (Soups §2): K forward passes at inference, scored on each member's cached logits.

The ensemble averages its members' raw logits, then applies the evaluation's class projection; the
greedy ensemble adds members best-first while the held-out accuracy strictly improves (the rule of
Soups Recipe 1, applied to logits). Each ingredient runs one forward pass on the held-out set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from mmsoup.checkpoints import (
    Ingredient,
    iter_ingredients,
    library_versions,
    provenance,
    validate_pool,
    write_sidecar,
)
from mmsoup.evaluate import Evaluator, accuracy
from mmsoup.result import best_first


@dataclass
class EnsembleResult:
    """A logit ensemble: members, held-out accuracy and mean projected logits (Soups §2)."""

    ingredients: list[int]
    val_acc: float
    logits: Tensor  # (N, C') mean logits of the members, CPU float32
    ingredient_val_accs: list[float]
    n_evals: int  # held-out forward passes
    trace: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the members, accuracies, trace and info as JSON with provenance (as SoupResult's
        sidecar; an ensemble has no fused weights, it keeps its members)."""
        meta = {k: getattr(self, k) for k in ("val_acc", "ingredients", "n_evals")}
        meta |= {"ingredient_val_accs": self.ingredient_val_accs, "trace": self.trace}
        write_sidecar(path, provenance(**meta, info=self.info))
        return Path(path)


def _member_logits(ingredients, evaluator: Evaluator) -> Iterator[tuple[int, Tensor]]:
    """Raw (N, C) held-out logits of each ingredient, one forward pass each."""
    for i, sd in iter_ingredients(ingredients):
        evaluator.load(sd)
        yield i, evaluator.logits(project=False)


def ensemble_logits(ingredients: Sequence[Ingredient], evaluator: Evaluator) -> Tensor:
    """Projected mean logits of the ingredients on an evaluator's data (Soups §2, ensemble)."""
    validate_pool(ingredients, check_finite=False)
    total = None
    for _, z in _member_logits(ingredients, evaluator):
        total = z if total is None else total + z
    return evaluator.project(total / len(ingredients))


def _ensemble(ingredients, evaluator: Evaluator, greedy: bool) -> EnsembleResult:
    t0 = time.perf_counter()
    validate_pool(ingredients, check_finite=False)
    labels, raw, accs, trace = evaluator.targets.cpu(), [], [], []
    for i, z in _member_logits(ingredients, evaluator):  # each model's logits, computed once
        raw.append(z)
        accs.append(accuracy(evaluator.project(z), labels))
        trace.append({"eval": len(trace), "candidate": i, "stage": "ingredient", "acc": accs[-1]})
    order = best_first(accs)
    members, total = [order[0]], raw[order[0]].clone()
    best = accs[order[0]]
    for i in order[1:]:
        cand = total + raw[i]
        acc = accuracy(evaluator.project(cand / (len(members) + 1)), labels)
        if greedy:
            trace.append({"eval": len(trace), "candidate": i, "stage": "greedy", "acc": acc})
        if not greedy or acc > best:  # greedy rule (strict), applied to logit ensembles
            members.append(i)
            total, best = cand, acc
    logits = evaluator.project(total / len(members))
    info = {
        "recipe": "greedy_ensemble" if greedy else "logit_ensemble",
        "wall_time_s": time.perf_counter() - t0,
    }
    return EnsembleResult(
        ingredients=members,
        val_acc=accuracy(logits, labels),
        logits=logits,
        ingredient_val_accs=accs,
        n_evals=len(raw),
        trace=trace,
        info=info | {"versions": library_versions()},
    )


def logit_ensemble(ingredients: Sequence[Ingredient], evaluator: Evaluator) -> EnsembleResult:
    """Average the logits of all ingredients: K forward passes at inference (Soups §2, ensemble)."""
    return _ensemble(ingredients, evaluator, greedy=False)


def greedy_ensemble(ingredients: Sequence[Ingredient], evaluator: Evaluator) -> EnsembleResult:
    """Greedy rule of Soups Recipe 1 applied to logit ensembles (Soups §2, greedy ensemble)."""
    return _ensemble(ingredients, evaluator, greedy=True)
