"""Prefix-activation reuse for the MMS objective: recompute a ViT from its first changed stage.

Cobyla's first m+1 evaluations (MMS Alg. 1) move one λ coordinate each, and
components outside the image tower (the released checkpoints' text leftovers) change nothing. For
an open_clip ViT classifier the forward is cut into stages in forward order: stem (patch embedding,
class/positional embeddings, ln_pre), each transformer block, pool (ln_post, proj, L2 norm) and the
linear head. `PrefixCache` keeps, per held-out batch, the input of selected stages (the residual
stream after the stem and after blocks, the pooled features) and the batch's hit count for the
weights last evaluated; a bitwise snapshot of each stage's parameters tells which stage changed
first, and the forward restarts from the nearest cached input at or before it. Same modules, same
batches, same kernels: accuracies are bit for bit those of a full forward (checked on a probe).

The cache sees its evaluator only through `Source`, the public part of `mmsoup.evaluate.Evaluator`
(its model, batches, preprocessing, projection, precision and plain forward); it imports nothing
from `mmsoup.evaluate`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Stage = Callable[[Tensor], Tensor]
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Source(Protocol):
    """What the cache needs from an evaluator (`mmsoup.evaluate.Evaluator` provides it)."""

    model: nn.Module
    device: torch.device

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]: ...  # (inputs, labels), in order
    def preprocess(self, x: Tensor) -> Tensor: ...
    def project(self, logits: Tensor) -> Tensor: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def forward(self, x: Tensor) -> Tensor: ...  # the plain (projected) forward, for the probe

    @property
    def cache_key(self) -> tuple: ...  # what the cached values depend on besides the weights


def _bits(t: Tensor) -> Tensor:
    """The tensor's raw bits (floats viewed as same-width ints): -0.0 != 0.0 and NaN == NaN."""
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def _vit_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(visual, head) of an mmsoup ImageClassifier over a plain open_clip ViT, else None."""
    try:
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transformer import Transformer, VisionTransformer

        from mmsoup.models import ImageClassifier
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(model, ImageClassifier) or type(model).forward is not ImageClassifier.forward:
        return None
    if type(model).features is not ImageClassifier.features:
        return None
    encode = getattr(type(model.model), "encode_image", None)
    if encode not in (CLIP.encode_image, CustomTextCLIP.encode_image):
        return None
    visual = getattr(model.model, "visual", None)
    if type(visual) is not VisionTransformer or visual.attn_pool is not None:
        return None  # attention pooling / subclasses: a forward we do not re-stage
    if type(visual.transformer).forward is not Transformer.forward:
        return None
    return visual, model.classification_head


class PrefixCache:
    """Per-batch stage inputs of the last evaluated weights; restarts at the first changed stage."""

    def __init__(self, model: nn.Module, budget_bytes: float) -> None:
        parts = _vit_parts(model)
        if parts is None:
            raise ValueError("not an mmsoup ImageClassifier over an open_clip VisionTransformer")
        visual, head = parts
        self.budget = float(budget_bytes)
        blocks = list(visual.transformer.resblocks)
        batch_first = visual.transformer.batch_first
        n_blocks = len(blocks)

        def stem(x: Tensor) -> Tensor:  # (B, 3, H, W) preprocessed -> (B, T, W) residual stream
            h = visual._embeds(x)
            return h if batch_first else h.transpose(0, 1).contiguous()

        def block(r: nn.Module) -> Stage:
            return lambda h: r(h, attn_mask=None)

        def pool(h: Tensor) -> Tensor:  # (B, T, W) -> (B, D) L2-normalised features
            if not batch_first:
                h = h.transpose(0, 1)
            pooled, _ = visual._pool(h)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
            return F.normalize(pooled, dim=-1)

        self.stages: list[Stage] = [stem, *[block(r) for r in blocks], pool, head]
        self.n_stages = len(self.stages)  # slot s = input of stage s; slot n_stages = hit count
        self.residual = range(1, n_blocks + 2)  # stem output .. last block output
        self.feature_slot = n_blocks + 2
        # live tensors of each stage (aliases of parameters/buffers); keys outside every stage
        # (e.g. text-tower leftovers) are never used by the image classifier's forward
        owned: list[list[Tensor]] = [[] for _ in self.stages]
        for key, t in visual.state_dict(keep_vars=True).items():
            if key.startswith("transformer.resblocks."):
                owned[1 + int(key.split(".")[2])].append(t.detach())
            elif key.startswith(("ln_post.", "proj")):
                owned[n_blocks + 1].append(t.detach())
            else:  # conv1, class/positional embedding, ln_pre, anything unknown: the earliest stage
                owned[0].append(t.detach())
        owned[-1] = [t.detach() for t in head.state_dict(keep_vars=True).values()]
        self.params = owned
        self.snapshot: list[list[Tensor]] | None = None
        self.slots: set[int] | None = None  # which stage inputs are kept (decided on first fill)
        self.acts: list[dict[int, Any]] = []  # per batch: slot -> tensor (or hit count)
        self.context: tuple | None = None
        self.stats = {"evaluations": 0, "stage_runs": 0, "stage_runs_full": 0, "reused": 0}

    def first_changed(self) -> int:
        """Index of the first stage whose parameters differ bitwise from the snapshot (n_stages: none)."""
        if self.snapshot is None:
            return 0
        for s, (live, snap) in enumerate(zip(self.params, self.snapshot)):
            if any(not torch.equal(_bits(a), _bits(b)) for a, b in zip(live, snap)):
                return s
        return self.n_stages

    def _choose_slots(self, per_image: dict[int, int], n: int) -> set[int]:
        """Stage inputs to keep within the byte budget: features first, then evenly spaced blocks."""
        slots, left = {self.n_stages}, self.budget  # hit counts: a few bytes per batch
        feat = per_image[self.feature_slot] * n
        if feat <= left:
            slots.add(self.feature_slot)
            left -= feat
        size = per_image[self.residual[0]] * n
        k = min(len(self.residual), int(left // size) if size else len(self.residual))
        if k >= len(self.residual):
            slots.update(self.residual)
        elif k > 0:  # evenly spaced checkpoints over the depth
            span = len(self.residual) + 1
            slots.update(round((i + 1) * span / (k + 1)) for i in range(k))
        return slots

    def _check(self, ev: Source, probe: Tensor) -> bool:
        """The staged forward must equal ev's plain forward bit for bit on a probe batch."""
        with ev.autocast():
            h, sizes = ev.preprocess(probe), {}
            for s, stage in enumerate(self.stages):
                h = stage(h)
                sizes[s + 1] = h.element_size() * h[0].numel()
        staged = ev.project(h)
        plain = ev.forward(probe)
        self._per_image = sizes
        return staged.dtype == plain.dtype and torch.equal(_bits(staged), _bits(plain))

    @torch.inference_mode()
    def hits(self, ev: Source) -> Tensor:
        """Held-out hit count of ev's live weights, recomputing only from the first changed stage."""
        batches = list(ev.batches())
        context = ev.cache_key  # a change drops the whole cache
        if self.context is None or any(a is not b for a, b in zip(context, self.context)):
            self.snapshot, self.slots, self.acts, self.context = None, None, [], context
        start = self.first_changed()
        if self.slots is None:
            n = sum(x.shape[0] for x, _ in batches)
            self.slots = self._choose_slots(self._per_image, n)
            self.acts = [{} for _ in batches]
        restart = max([s for s in self.slots if s <= start] + [0])
        hits = torch.zeros((), dtype=torch.long, device=ev.device)
        snapshot, self.snapshot = self.snapshot, None  # an interrupted pass leaves no stale cache
        with ev.autocast():
            for (x, y), acts in zip(batches, self.acts):
                if restart == self.n_stages:
                    hits += acts[restart]
                    continue
                h = ev.preprocess(x) if restart == 0 else acts[restart]
                for s in [s for s in acts if s > restart]:  # stale: free before recomputing
                    del acts[s]
                for s in range(restart, self.n_stages):
                    h = self.stages[s](h)
                    if s + 1 in self.slots and s + 1 < self.n_stages:
                        acts[s + 1] = h  # the tensor itself: same strides for the next run
                batch_hits = (ev.project(h).argmax(dim=-1) == y).sum()
                acts[self.n_stages] = batch_hits
                hits += batch_hits
        self.snapshot = snapshot
        self._refresh(start)
        self.stats["evaluations"] += 1
        self.stats["stage_runs"] += (self.n_stages - restart) * len(batches)
        self.stats["stage_runs_full"] += self.n_stages * len(batches)
        self.stats["reused"] += restart > 0
        return hits

    @torch.no_grad()
    def _refresh(self, start: int) -> None:
        """Snapshot the live parameters of every stage from `start` on (earlier ones are equal)."""
        if self.snapshot is None:
            self.snapshot = [[t.clone() for t in ts] for ts in self.params]
            return
        for s in range(start, self.n_stages):
            torch._foreach_copy_(self.snapshot[s], self.params[s])


def prefix_cache(ev: Source, budget_bytes: float) -> PrefixCache | None:
    """A prefix cache for ev's model, or None (plain path) if the model or probe does not fit."""
    try:
        cache = PrefixCache(ev.model, budget_bytes)
    except ValueError:
        return None
    probe = next(iter(ev.batches()), (None, None))[0]
    if probe is None:  # an empty shard (a rank without batches): nothing to cache
        return None
    with torch.inference_mode():
        ok = cache._check(ev, probe[: min(32, probe.shape[0])])
    if not ok:
        warnings.warn(
            "Prefix-activation reuse disabled: the staged ViT forward differs from the model's "
            "forward on a probe batch; evaluating every candidate in full.",
            stacklevel=3,
        )
        return None
    return cache
