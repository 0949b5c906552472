"""Mixing weights: the per-component interpolation of MMS and the weighted sums that rebuild a soup.

One kernel, `lerp_`, writes Ψ'(λ)^j = λ_j·Ψ^j + (1-λ_j)·θ^j (MMS Alg. 1) for a flat list of
tensors. `interpolate` (a new state dict) and `Evaluator.mix` (the live model, in place) both call
it, so the soup MMS keeps is bit for bit the model it evaluated. `mix_from_weights` rebuilds any
soup from its per-component coefficients, Σ_i w_j[i]·θ_i^j (MMS Alg. 1 unrolled; Soups §2 for
uniform and greedy soups, whose coefficients are one per component).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    out = {k: torch.zeros(shape, dtype=acc_dtype(dt)) for k, (shape, dt) in spec_float.items()}
    kept: dict[str, Tensor] = {}
    for i, sd in iter_ingredients(ingredients):
        for k, v in sd.items():
            if k in fixed:
                if i == buffers_from:
                    kept[k] = v.clone()
                continue
            w = float(weights[owner[k]][i])
            if w != 0.0:
                out[k].add_(v, alpha=w)
        del sd
    return {k: kept[k] if k in fixed else out[k].to(spec[k][1]) for k in spec}
