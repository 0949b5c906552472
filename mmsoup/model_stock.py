"""Model Stock: a soup from the geometry of the fine-tuned weights alone, no held-out search (Jang,
Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024).

For every layer (each floating tensor of the state dict), with the pretrained weights w_0 (the
anchor: the weights every ingredient was fine-tuned from) and N fine-tuned weights w_1 .. w_N:

    w_avg = (1/N) · Σ_i w_i                               the fine-tuned models' average
    cos θ = mean over pairs i < j of cos(w_i - w_0, w_j - w_0)
    t     = N · cos θ / (1 + (N - 1) · cos θ)            the interpolation ratio
    w_H   = t · w_avg + (1 - t) · w_0

For N = 2, t = 2·cos θ / (1 + cos θ) puts w_H at the foot of the perpendicular from the centre of
the fine-tuned weights to the plane through w_0, w_1, w_2 (the paper's two-model case); for N
models the paper keeps one angle θ between updates, which we take, as mergekit does, as the mean
of the pairwise cosines. Two choices the paper leaves open, made here and recorded per layer in
the result's `info`: an update of norm 0 counts as orthogonal to every other one (cos 0), and a
layer whose mean cosine is <= 0 (updates that share no direction, where t would turn negative)
keeps the anchor's weights (t clamped to 0; `info["clamped"]` lists them). Non-floating tensors
(counters) are the anchor's. The soup is scored once on the held-out set, for the record only.

Streamed: one pass over the fine-tuned models, with three float64 tensors per key besides the
anchor: Σ w_i, Σ u_i with u_i = (w_i - w_0) / |w_i - w_0|, and Σ |u_i|² (the non-zero updates).
Since |Σ u_i|² = Σ |u_i|² + 2 · Σ_{i<j} u_i · u_j, the mean cosine over the N(N-1)/2 pairs is
(|Σ u_i|² - Σ |u_i|²) / (N(N-1)), without holding the N updates at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmsoup.checkpoints import Ingredient, library_versions, open_ingredient, validate_pool
from mmsoup.errors import MMSoupError
from mmsoup.result import Scorer, SoupResult


def ratio(cos: float, n: int) -> float:
    """t = N·cos θ / (1 + (N-1)·cos θ), clamped to 0 where cos θ <= 0 (Model Stock's ratio)."""
    return 0.0 if cos <= 0 else n * cos / (1 + (n - 1) * cos)


def model_stock(
    anchor: Ingredient, finetuned: Sequence[Ingredient]
) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """The Model Stock weights of `finetuned` around `anchor`, and per layer its cos θ and t."""
    n = len(finetuned)
    if n < 2:
        raise MMSoupError(
            f"Model Stock needs at least two fine-tuned models besides the anchor; got {n}."
        )
    validate_pool([anchor, *finetuned])
    w0 = open_ingredient(anchor)
    keys = [k for k, v in w0.items() if v.is_floating_point()]
    total = {k: torch.zeros(w0[k].shape, dtype=torch.float64) for k in keys}
    units = {k: torch.zeros(w0[k].shape, dtype=torch.float64) for k in keys}
    nonzero = dict.fromkeys(keys, 0)
    for ingredient in finetuned:
        w = open_ingredient(ingredient)
        for k in keys:
            x = w[k].double()
            total[k] += x
            d = x - w0[k].double()
            norm = float(d.norm())
            if norm > 0:
                units[k] += d / norm
                nonzero[k] += 1
        del w  # one fine-tuned model in memory at a time
    state: dict[str, Tensor] = {}
    layers: dict[str, dict[str, float]] = {}
    for k, v in w0.items():
        if k not in total:
            state[k] = v.clone()
            continue
        cos = (float(units[k].square().sum()) - nonzero[k]) / (n * (n - 1))
        t = ratio(cos, n)
        mixed = total[k].div_(n).mul_(t).add_(v.double(), alpha=1 - t)
        state[k] = mixed.to(v.dtype)
        layers[k] = {"cos": cos, "t": t}
    return state, layers


def build(recipe: Any, pool: Any) -> SoupResult:
    """The `Model Stock` recipe (mmsoup.recipes): the pool's anchor and its fine-tuned models."""
    t0 = time.perf_counter()
    at, idx = pool.anchor_index, pool.finetuned
    state, layers = model_stock(pool.anchor, [pool.ingredients[i] for i in idx])
    scorer = Scorer(pool.heldout)
    acc = scorer.state(state, -1, "model_stock")
    weights = {k: _shares(len(pool.ingredients), at, idx, v["t"]) for k, v in layers.items()}
    info = {
        "recipe": "model_stock",
        "layers": layers,
        "clamped": [k for k, v in layers.items() if v["cos"] <= 0],
        "anchor": "ingredient" if at is not None else "init",
        "wall_time_s": time.perf_counter() - t0,
        "versions": library_versions(),
    }
    return SoupResult(
        state_dict=state,
        val_acc=acc,
        ingredients=([] if at is None else [at]) + idx,
        weights=weights,
        n_evals=len(scorer.trace),
        trace=scorer.trace,
        ingredient_val_accs=list(pool.val_accs or []),
        info=info,
    )


def _shares(n: int, anchor: int | None, finetuned: Sequence[int], t: float) -> list[float]:
    """One layer's coefficient per input: t/N for each fine-tuned model, 1 - t for the anchor
    when it is an input (else the anchor's share 1 - t is outside the inputs)."""
    w = [0.0] * n
    for i in finetuned:
        w[i] = t / len(finetuned)
    if anchor is not None:
        w[anchor] = 1 - t
    return w
