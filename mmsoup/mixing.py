"""Mixing weights: the per-component interpolation of MMS and the weighted sums that rebuild a soup.

One kernel, `lerp_`, writes Ψ'(λ)^j = λ_j·Ψ^j + (1-λ_j)·θ^j (MMS Alg. 1) for a flat list of
tensors. `interpolate` (a new state dict) and `Evaluator.mix` (the live model, in place) both call
it, so the soup MMS keeps is bit for bit the model it evaluated. `mixed_weights` follows the
per-component coefficients of those steps. `mix_from_weights` rebuilds any soup from them,
Σ_i w_j[i]·θ_i^j (MMS Alg. 1 unrolled; Soups §2 for uniform and greedy soups, whose
coefficients are one per component).

One streamed sum, `weighted_sum`, adds ingredients into float32-at-least accumulators one
state dict at a time; the uniform and greedy soups (`mmsoup.soups`), `mix_from_weights` and the
learned soup's `mmsoup.learned.mix` all sum through it. Each keeps its own arithmetic (`start`),
so each soup is bit for bit what it was: a plain sum (mean = sum / n), and two weighted sums that
differ in their first term (0 + c·θ and c·θ differ in the sign of a zero).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mmsoup.checkpoints import Ingredient, buffer_keys, iter_ingredients, validate_pool
from mmsoup.errors import MMSoupError
from mmsoup.result import ALL, REST, StateDict


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of weights are accumulated in: float32 at least (bf16/fp16 pools)."""
    return torch.promote_types(dtype, torch.float32)


def lerp_(
    outs: Sequence[Tensor],
    base: Sequence[Tensor],
    other: Sequence[Tensor],
    lambdas: Sequence[float],
) -> None:
    """outs[k] ← other[k] + λ_k·(base[k] - other[k]) (torch.lerp's formula), two fused launches."""
    if outs:
        torch._foreach_copy_(outs, other)
        torch._foreach_lerp_(outs, base, [float(v) for v in lambdas])


def interpolate(
    base: StateDict, other: StateDict, components: Mapping[str, Sequence[str]], lambdas
) -> dict[str, Tensor]:
    """Ψ'(λ)^j = λ_j·base^j + (1-λ_j)·other^j per component; uncovered keys from base (MMS Alg. 1)."""
    keys = [k for ks in components.values() for k in ks]
    weights = [float(lam) for ks, lam in zip(components.values(), lambdas) for _ in ks]
    outs = [torch.empty_like(base[k]) for k in keys]
    lerp_(outs, [base[k] for k in keys], [other[k].to(base[k].device) for k in keys], weights)
    return dict(base) | dict(zip(keys, outs))


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


class Sums(NamedTuple):
    """What `weighted_sum` returns."""

    sums: dict[str, Tensor]  # key -> the accumulated sum (float32 at least)
    dtypes: dict[str, torch.dtype]  # key -> the dtype of its first term (the pool's)
    kept: dict[str, Tensor]  # keys not summed: ingredient `buffers_from`'s, cloned


def _floating(key: str, value: Tensor) -> bool:
    return value.is_floating_point()


def weighted_sum(
    ingredients: Sequence[Ingredient],
    coef: Callable[[int, str], float] | None = None,
    *,
    start: str = "copy",
    summed: Callable[[str, Tensor], bool] = _floating,
    buffers_from: int | None = None,
    device: torch.device | str | None = None,
    into: Sums | None = None,
) -> Sums:
    """Σ_i c_i(key)·θ_i[key] over the keys `summed` selects, streaming the ingredients (one
    opened at a time), accumulated in float32 at least (`acc_dtype`); `into` goes on with an
    earlier sum (the greedy soup's running sum). `start` is the arithmetic, one per soup so that
    each stays bit for bit what it was:

    - "copy" (no `coef`): Σ θ_i, its first term copied, then `+= θ_i` (Soups §2: the uniform soup's
      mean and the greedy soup's running sum, divided by their count by the caller);
    - "zero": Σ c_i·θ_i from zeros, `add_(θ_i, alpha=c_i)`, a term with c_i = 0 skipped
      (`mix_from_weights`, MMS Alg. 1 unrolled);
    - "scale": Σ c_i·θ_i, its first term c_0·θ_0, every term first moved to `device` in float32 at
      least (`mmsoup.learned.mix`, Soups App. I).

    Keys not summed are cloned from ingredient `buffers_from` (None: none kept).
    """
    if start not in ("copy", "zero", "scale") or (start == "copy") != (coef is None):
        raise MMSoupError(
            f"weighted_sum takes start 'copy' without coef, or 'zero' or 'scale' with one; got {start!r}."
        )
    out = into if into is not None else Sums({}, {}, {})
    sums, dtypes, kept = out
    for i, sd in iter_ingredients(ingredients):
        for k, v in sd.items():
            if not summed(k, v):
                if i == buffers_from:
                    kept[k] = v.clone()
                continue
            new = k not in sums
            if new:
                dtypes[k] = v.dtype
            if start == "copy":
                if new:
                    sums[k] = v.to(acc_dtype(v.dtype), copy=True)
                else:
                    sums[k] += v
                continue
            w = coef(i, k)
            if start == "zero":
                if new:
                    sums[k] = torch.zeros(v.shape, dtype=acc_dtype(v.dtype), device=device)
                if w != 0.0:
                    sums[k].add_(v, alpha=w)
            else:
                v = v.to(device=device, dtype=acc_dtype(v.dtype))
                if new:
                    sums[k] = v * w
                else:
                    sums[k].add_(v, alpha=w)
        del sd  # drop a streamed ingredient before opening the next
    return out


def mix_from_weights(
    ingredients: Sequence[Ingredient],
    components: Mapping[str, Sequence[str]] | None,
    weights: Mapping[str, Sequence[float]],
    buffers_from: int | None = None,
) -> dict[str, Tensor]:
    """Rebuild a soup from per-component coefficients Σ_i w_j[i]·θ_i^j (MMS Alg. 1 unrolled), streamed.

    Non-floating buffers are copied from ingredient `buffers_from` (default: the one with the
    largest coefficient in the first component, i.e. the best ingredient of a greedy or MMS soup).
    """
    spec = validate_pool(ingredients, check_finite=False)
    fixed = set(buffer_keys(spec))
    spec_float = {k: v for k, v in spec.items() if k not in fixed}
    comps = dict(components) if components is not None else {ALL: list(spec_float)}
    owner = {k: c for c, keys in comps.items() for k in keys}
    for k in spec_float:
        owner.setdefault(k, REST if REST in weights else ALL)
    missing = {c for c in owner.values() if c not in weights}
    if missing:
        raise MMSoupError(
            f"weights lack component {sorted(missing)[0]!r}; pass the weights of this partition."
        )
    if fixed and buffers_from is None:
        first = list(weights.values())[0]
        buffers_from = max(range(len(first)), key=lambda i: (first[i], -i))
    s = weighted_sum(
        ingredients,
        lambda i, k: float(weights[owner[k]][i]),
        start="zero",
        summed=lambda k, v: k not in fixed,
        buffers_from=buffers_from,
    )
    return {k: s.kept[k] if k in fixed else s.sums[k].to(spec[k][1]) for k in spec}
