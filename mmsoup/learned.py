"""Learned soup (Soups App. I): per-component mixing coefficients trained on held-out cross-entropy.

W_j = sum_i softmax(alpha_j)_i theta_i^j is linear in the ingredients, so
dL/dw_ji = <dL/dW_j, theta_i^j>: one forward/backward of one model gives dL/dW, and streaming the
ingredients once gives the n*m dot products. Memory stays at a constant number of models whatever
the number of ingredients n (the public script holds all 72 models, ~490 GB of RAM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmsoup.checkpoints import Ingredient, iter_ingredients, library_versions, validate_pool
from mmsoup.errors import MMSoupError
from mmsoup.mixing import mix_from_weights, weighted_sum
from mmsoup.partition import validate_partition
from mmsoup.progress import tqdm
from mmsoup.result import REST, Scorer, SoupResult, ranked


def _component_index(components: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Key -> index of its component."""
    return {k: j for j, keys in enumerate(components.values()) for k in keys}


@torch.no_grad()
def mix(
    ingredients: Sequence[Ingredient],
    components: Mapping[str, Sequence[str]],
    weights: torch.Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    fixed: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """W_j = sum_i weights[j, i] theta_i^j, streaming the ingredients (Soups App. I).

    `weights` is (m components, n ingredients). Floating keys in no component (e.g. the inert ones a
    '+live' partition leaves out) get the uniform average, or the tensor given in `fixed` (so
    a training loop averages them once). `dtype=None` keeps the ingredients' dtype.
    """
    comp = _component_index(components)
    fixed = fixed or {}
    n = len(ingredients)
    coefs = weights.detach().double().cpu().tolist()  # python floats: no device sync per key
    s = weighted_sum(
        ingredients,
        lambda i, key: coefs[comp[key]][i] if key in comp else 1.0 / n,
        start="scale",  # c_0·θ_0 first, each θ_i moved to `device` in float32 at least
        summed=lambda key, theta: theta.is_floating_point() and key not in fixed,
        device=device,
    )
    out = {k: v.to(dtype or s.dtypes[k]) for k, v in s.sums.items()}
    return out | {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in fixed.items()}


def _logits(model: nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor):
    """Logits of `model` run with `params` in place of its own tensors (the model is not touched)."""
    return torch.func.functional_call(model, dict(params), (images,))


def soup_gradient(
    alpha: torch.Tensor,
    temperature: torch.Tensor | None,
    ingredients: Sequence[Ingredient],
    components: Mapping[str, Sequence[str]],
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fixed: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor | None]:
    """Loss and gradients (dL/dalpha, dL/dtemperature) of the learned soup on one batch (Soups App. I).

    alpha: (m, n) mixing logits, softmax over ingredients per component. The gradient w.r.t. the
    mixed weights comes from one backward pass; dL/dw_ji = <dL/dW_j, theta_i^j> from streaming the
    ingredients; the softmax chain rule is applied by autograd on the (m, n) weights only.
    `project` maps the logits to the held-out label space (an Evaluator's class projection);
    `fixed` holds the (uniform) tensors of keys in no component, see `mix`.
    """
    device = images.device
    weights = torch.softmax(alpha.detach(), dim=1)
    mixed = mix(ingredients, components, weights, device=device, fixed=fixed)
    comp = _component_index(components)
    # buffers (BatchNorm running statistics) are mixed with their component's weights but are not
    # differentiable: the gradient comes through the parameters
    buffers = {name for name, _ in model.named_buffers()}
    wrt_keys = [k for k in comp if k not in buffers]
    leaves = {k: v.requires_grad_(k in comp and k not in buffers) for k, v in mixed.items()}
    scale = None if temperature is None else temperature.detach().to(device).requires_grad_(True)
    model_was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = _logits(model, leaves, images).float()
            logits = logits if project is None else project(logits)
            loss = F.cross_entropy(logits if scale is None else scale * logits, labels)
            wrt = [leaves[k] for k in wrt_keys] + ([scale] if scale is not None else [])
            grads = torch.autograd.grad(loss, wrt)
    finally:
        model.train(model_was_training)
    del leaves, mixed  # the mixture is no longer needed: keep one model's worth of gradients
    grad_w = dict(zip(wrt_keys, grads[: len(wrt_keys)]))
    comp_ids = torch.tensor([comp[k] for k in grad_w], device=device)

    # dots[j, i] = <dL/dW_j, theta_i^j>, one streamed ingredient at a time. Multiply, then sum
    # the (aligned) product: torch.dot's reduction order follows the data's memory alignment, and
    # memory-mapped tensors are unaligned, so paths and dicts would differ in the last bit.
    m, n = alpha.shape
    dots = torch.zeros(m, n, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, state in iter_ingredients(ingredients):
            per_key = torch.stack([(g * state[k].to(g)).sum() for k, g in grad_w.items()])
            dots[:, i].index_add_(0, comp_ids, per_key.double())
    with torch.enable_grad():
        a = alpha.detach().to(device=device, dtype=torch.float64).requires_grad_(True)
        (grad_alpha,) = torch.autograd.grad(torch.softmax(a, dim=1), a, grad_outputs=dots)
    grad_scale = None if scale is None else grads[-1].to(temperature)
    return loss.item(), grad_alpha.to(alpha), grad_scale


def learned_soup(
    ingredients: Sequence[Ingredient],
    evaluator: Any,
    components: Mapping[str, Sequence[str]],
    *,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 256,
    temperature: bool = True,
    seed: int = 0,
    progress: bool = True,
    ingredient_val_accs: Sequence[float] | None = None,
) -> SoupResult:
    """Learned soup (Soups App. I): softmax mixing coefficients per component and ingredient, trained
    by AdamW on held-out cross-entropy (defaults of the public script: lr 0.05, 5 epochs, a learned
    logit temperature), starting from the uniform soup.

    `evaluator` is an mmsoup Evaluator: its `.model`, `.images`, `.labels`, `.preprocess` are the
    held-out set the coefficients are trained on; calling it gives an accuracy. Each ingredient's
    own accuracy is computed once (unless given) to rank them; `trace` has one row per evaluation,
    `info["steps"]` one row per training step. The soup's state dict is complete, as every recipe's:
    non-floating buffers (`num_batches_tracked`) are the best ingredient's, never averaged; floating
    buffers (BatchNorm running statistics) follow their component's coefficients without a
    gradient of their own.
    """
    spec = validate_pool(ingredients)
    validate_partition(components, spec.keys(), complete=False)
    m, n = len(components), len(ingredients)
    if batch_size < 1 or epochs < 0:
        raise MMSoupError(
            f"learned_soup needs batch_size >= 1 and epochs >= 0, got {batch_size} and {epochs}."
        )
    scorer = Scorer(evaluator)  # the trace rows of every recipe
    accs, best_first = ranked(ingredients, scorer, ingredient_val_accs)
    images, labels = evaluator.images, evaluator.labels
    preprocess = getattr(evaluator, "preprocess", None) or (lambda x: x)
    project = getattr(evaluator, "projection", None)  # e.g. a class subset of the held-out set
    model = evaluator.model
    # floating keys in no component stay at the uniform average: mix them once, not at every step
    covered = _component_index(components)
    uncovered = [k for k, (_, dt) in spec.items() if dt.is_floating_point and k not in covered]
    fixed = {
        k: v
        for k, v in mix(ingredients, {}, torch.empty(0, n), device=evaluator.device).items()
        if k in uncovered
    }

    alpha = torch.zeros(m, n, requires_grad=True)  # softmax -> the uniform soup
    scale = torch.ones((), requires_grad=True)  # the learned temperature: multiplies the logits
    learned_scale = scale if temperature else None
    opt = torch.optim.AdamW([alpha] + ([scale] if temperature else []), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n_held_out = len(labels)
    steps = math.ceil(n_held_out / batch_size)
    log: list[dict[str, Any]] = []
    bar = tqdm(total=epochs * steps, desc="learned soup", disable=not progress, leave=False)
    for epoch in range(epochs):
        order = torch.randperm(n_held_out, generator=gen)
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size].to(labels.device)
            x, y = preprocess(images[idx.to(images.device)]), labels[idx]
            loss, grad_alpha, grad_scale = soup_gradient(
                alpha, learned_scale, ingredients, components, model, x, y, project, fixed
            )
            opt.zero_grad(set_to_none=True)
            alpha.grad = grad_alpha
            if temperature:
                scale.grad = grad_scale
            opt.step()
            log.append({"epoch": epoch, "step": step, "loss": loss, "temperature": scale.item()})
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()

    weights = torch.softmax(alpha.detach(), dim=1)
    coefs = {name: weights[j].tolist() for j, name in enumerate(components)}
    coefs |= {REST: [1.0 / n] * n} if uncovered else {}  # uncovered: uniform
    # the complete state dict, rebuilt from the coefficients as any soup is: integer buffers
    # (num_batches_tracked, ...) are the best ingredient's, never averaged
    state = mix_from_weights(ingredients, components, coefs, buffers_from=best_first[0])
    val_acc = scorer.state(state, -1, "final")
    epoch_loss = [sum(r["loss"] for r in log if r["epoch"] == e) / steps for e in range(epochs)]
    return SoupResult(
        state_dict=state,
        val_acc=val_acc,
        ingredients=best_first,  # all mixed at once
        weights=coefs,
        n_evals=len(scorer.trace),
        trace=scorer.trace,
        ingredient_val_accs=accs,
        info={
            "recipe": "learned_soup",
            "params": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed},
            "temperature": scale.item() if temperature else None,
            "epoch_loss": epoch_loss,
            "steps": log,
            "uncovered_keys": uncovered,
            "versions": library_versions(),
        },
    )
