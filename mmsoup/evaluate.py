"""Fast held-out evaluation: one live model whose weights are rewritten in place (MMS Alg. 1).

The MMS objective ValAcc(Ψ'(λ)) is evaluated hundreds of times per candidate, so the `Evaluator`
keeps one model instance and the held-out tensors on the device, writes each candidate
Ψ'(λ)^j = λ_j·Ψ^j + (1-λ_j)·θ^j straight into the parameters (no state-dict rebuilding, no
`load_state_dict`, no DataLoader) and runs the forward pass in inference mode. Precision is fp32,
as in the references (Soups' and the MMS author's evaluation), with TF32 off on CUDA so that the
held-out decisions do not depend on the GPU generation; bf16 autocast is an opt-in fast mode
(`amp=True`). Through `mixed_accuracy`, an open_clip ViT restarts its forward at the first stage whose
weights changed since the last evaluation (`mmsoup.reuse`), bit for bit the same accuracy.
Class projections implement Soups' 200-class (ImageNet-R/-A) and ObjectNet evaluations (Soups §3).
The logit ensembles that score on an Evaluator's logits are in `mmsoup.ensembles`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from mmsoup.errors import MMSoupError
from mmsoup.mixing import lerp_
from mmsoup.reuse import PrefixCache, prefix_cache

StateDict = Mapping[str, Tensor]
Components = Mapping[str, Sequence[str]]


@runtime_checkable
class Projection(Protocol):
    """Maps (B, C) logits of the head to (B, C') logits of an evaluation's label space."""

    def __call__(self, logits: Tensor) -> Tensor: ...


class ClassSubset:
    """Logits restricted to a class subset, e.g. ImageNet-R/-A's 200 classes (Soups §3)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        if self.indices.numel() == 0 or self.indices.min() < 0:
            raise MMSoupError(
                "ClassSubset needs a non-empty list of non-negative class indices; check the mapping."
            )
        self._cache: dict[torch.device, Tensor] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes after projection."""
        return self.indices.numel()

    def __call__(self, logits: Tensor) -> Tensor:
        """(B, C) -> (B, C'): the columns of the subset, in subset order (labels index into it)."""
        idx = self._cache.setdefault(logits.device, self.indices.to(logits.device))
        return logits.index_select(-1, idx)


class ClassGroups:
    """ObjectNet-style projection: class score = max over its mapped logits (Soups §3)."""

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        if not groups or any(len(g) == 0 for g in groups):
            raise MMSoupError(
                "ClassGroups needs a non-empty list of non-empty index groups; check the class mapping."
            )
        width = max(len(g) for g in groups)
        # pad each group with its own first index: the max is unchanged, the gather is one op
        self.index = torch.tensor([list(g) + [g[0]] * (width - len(g)) for g in groups])  # (C', L)
        if self.index.min() < 0:
            raise MMSoupError("ClassGroups indices must be non-negative; check the class mapping.")
        self._cache: dict[torch.device, Tensor] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes after projection."""
        return self.index.shape[0]

    def __call__(self, logits: Tensor) -> Tensor:
        """(B, C) -> (B, C'): max over each group's logits."""
        idx = self._cache.setdefault(logits.device, self.index.to(logits.device))
        return logits[:, idx].amax(dim=-1)  # (B, C', L) -> (B, C')


def correct(logits: Tensor, labels: Tensor) -> np.ndarray:
    """Per-example top-1 correctness (bool, (N,)), e.g. for paired bootstrap intervals."""
    if logits.shape[0] != labels.shape[0]:
        raise MMSoupError(
            f"{logits.shape[0]} logits rows but {labels.shape[0]} labels; pass the matching labels."
        )
    return (logits.argmax(dim=-1).cpu() == labels.cpu()).numpy()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of (N, C) logits against (N,) labels."""
    hits = correct(logits, labels)
    return float(hits.mean()) if hits.size else float("nan")


class _Plan:
    """Component -> live parameter tensors, resolved once per `components` mapping."""

    def __init__(self, components: Components, params: Mapping[str, Tensor]) -> None:
        self.source, self.names = components, list(components)
        self.keys: list[str] = []  # every mixed key, flat, so one fused op writes them all
        self.owner: list[int] = []  # component index of each key
        seen: set[str] = set()
        for j, (name, keys) in enumerate(components.items()):
            for key in keys:
                if key not in params or not params[key].is_floating_point():
                    raise MMSoupError(
                        f"Component {name!r} lists {key!r}, which is not a floating parameter of the "
                        "model; build the partition from this model's state dict."
                    )
                if key in seen:
                    raise MMSoupError(
                        f"Key {key!r} is in two components (again in {name!r}); each key must belong to one."
                    )
                self.keys.append(key)
                seen.add(key)
                self.owner.append(j)
        self.outs = [params[k] for k in self.keys]
        mixed = set(self.keys)  # keys outside every component take base's values
        self.rest = [k for k, t in params.items() if k not in mixed and t.is_floating_point()]
        self.rest_outs = [params[k] for k in self.rest]
        self.live = {t.data_ptr() for t in self.outs + self.rest_outs}  # to refuse aliased inputs


# glibc's own variables (the user chose) and mmsoup's opt-out: leave the allocator alone
_MALLOC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
    "MMSOUP_MALLOC_DEFAULTS",
)
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """On glibc, keep freed blocks of up to 32 MB in the heap instead of returning them to the OS.

    Every evaluation allocates and frees the same activation tensors; with glibc's defaults they are
    unmapped and page-faulted in again each time. Fixing the mmap threshold at its maximum (32 MB)
    and the trim threshold at 1 GiB made a tiny-ViT evaluation of 1,000 images 1.74x faster on this
    project's 2-core machine (1532 -> 879 CPU ms median at batch 1,024) and removed the cost of
    keeping prefix activations (benchmarks/bench_allocator.py). Skipped when the user set glibc's own malloc variables or
    MMSOUP_MALLOC_DEFAULTS; returns whether the settings are in effect. The setting holds for the
    whole process, so it is opt-in: the stages that evaluate on CPU (`mmsoup.context.context`,
    `mmsoup distributed`) call it, constructing an `Evaluator` does not.
    """
    global _malloc_tuned
    if _malloc_tuned or any(k in os.environ for k in _MALLOC_ENV):
        return _malloc_tuned
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        _malloc_tuned = bool(
            libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
        )
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        _malloc_tuned = False
    return _malloc_tuned


class Evaluator:
    """Held-out top-1 of one live model whose weights are written in place (MMS Alg. 1 objective)."""

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 1024,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        projection: Projection | None = None,
        amp: bool | None = None,
        reuse: bool = True,
        cache_mb: float = 512.0,
    ) -> None:
        if images.shape[0] == 0:
            raise MMSoupError("The held-out set is empty; pass at least one image to evaluate on.")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise MMSoupError(
                f"Got {images.shape[0]} images but labels of shape {tuple(labels.shape)}; pass one label per image."
            )
        if batch_size < 1:
            raise MMSoupError(f"batch_size must be >= 1, got {batch_size}.")
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.model = model.to(self.device).eval()  # the ONE live instance
        self.images = images.to(self.device)  # prepared once; preprocess runs per batch
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = batch_size
        self.preprocess = preprocess if preprocess is not None else (lambda x: x)
        self.projection = projection
        self.amp = bool(amp)  # None or False: fp32 (the references); True: bf16 autocast
        # key -> live tensor (aliases of the parameters/buffers, written in place)
        self._params = {k: v.detach() for k, v in self.model.state_dict(keep_vars=True).items()}
        self._float_keys = {k for k, v in self._params.items() if v.is_floating_point()}
        self._plan: _Plan | None = None
        # prefix-activation reuse (mmsoup.reuse): built on the first mixed_accuracy call; the
        # budget bounds the cached activations (N x tokens x width per cached block)
        self.reuse, self.cache_mb = reuse, float(cache_mb)
        self._prefix: PrefixCache | None | bool = None  # None: not built; False: plain
        self.num_classes = self._probe_classes()
        top = int(self.labels.max())
        if int(self.labels.min()) < 0:
            raise MMSoupError(
                "Labels must be non-negative class indices; check the held-out labels."
            )
        if self.num_classes < top + 1:
            raise MMSoupError(
                f"The labels go up to {top} but the (projected) head has only {self.num_classes} classes; "
                "use a head or projection that matches the held-out data."
            )

    @property
    def n(self) -> int:
        """Number of held-out examples."""
        return self.images.shape[0]

    @property
    def targets(self) -> Tensor:
        """The labels that the rows of `logits()` align with (all N examples, in order)."""
        return self.labels

    @property
    def cache_key(self) -> tuple:
        """What a cached activation depends on besides the weights (mmsoup.reuse drops it on change)."""
        return (
            self.images,
            self.labels,
            self.preprocess,
            self.projection,
            self.amp,
            self.batch_size,
        )

    def _probe_classes(self) -> int:
        try:
            with torch.inference_mode():
                return int(self.forward(self.images[:1]).shape[-1])
        except (IndexError, RuntimeError) as e:
            raise MMSoupError(
                f"The model or projection fails on the held-out images ({type(e).__name__}: {e}); "
                "check the image shape, preprocess and class indices."
            ) from e

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The precision every forward runs in: bf16 autocast if `amp`, else full fp32 (no TF32)."""
        if self.amp or self.device.type != "cuda":
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                yield
            return
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"  # cuDNN convs default to TF32
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved

    def forward(self, x: Tensor, project: bool = True) -> Tensor:
        """Logits (B, C') of one batch of held-out inputs (raw (B, C) if not `project`)."""
        with self.autocast():
            logits = self.model(self.preprocess(x))
        return self.project(logits) if project else logits

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, labels) of the examples this evaluator runs, in batches: the one walk over them
        (the plain path and the prefix cache both use it)."""
        for i in range(0, self.images.shape[0], self.batch_size):
            yield self.images[i : i + self.batch_size], self.labels[i : i + self.batch_size]

    def project(self, logits: Tensor) -> Tensor:
        """Apply this evaluator's class projection (identity without one)."""
        return self.projection(logits) if self.projection is not None else logits

    def _hits(self) -> Tensor:
        """Number of correct top-1 predictions on this evaluator's batches (no host sync)."""
        hits = torch.zeros((), dtype=torch.long, device=self.device)
        for x, y in self.batches():
            hits += (self.forward(x).argmax(dim=-1) == y).sum()
        return hits

    def _fitting(self, run: Callable[[], Tensor]) -> Tensor:
        """Run a whole pass over the batches; out of device memory, halve the batch and rerun it
        (the device's memory, not the caller, decides the batch size). Counts restart, so results
        stay exact."""
        while True:
            try:
                return run()
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise MMSoupError(
                        f"One image does not fit in the memory of {self.device}; free the device "
                        "or evaluate on a larger one."
                    ) from None
                self.batch_size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(
                    f"Out of memory on {self.device}: evaluating in batches of {self.batch_size}.",
                    stacklevel=3,
                )

    def _mixed_hits(self) -> Tensor:
        """`_hits` through the prefix-activation cache when the model supports it."""
        if self._prefix is None:
            built = prefix_cache(self, self.cache_mb * 2**20) if self.reuse else None
            self._prefix = built if built is not None else False
        return self._fitting(lambda: self._prefix.hits(self) if self._prefix else self._hits())

    @property
    def reuse_stats(self) -> dict[str, int]:
        """Counters of the prefix cache: evaluations, stage runs done and of full forwards."""
        return dict(self._prefix.stats) if self._prefix else {}

    @torch.inference_mode()
    def accuracy(self) -> float:
        """Top-1 accuracy of the current parameters on the held-out set."""
        return self._fitting(self._hits).item() / self.n  # the one host sync per evaluation

    @torch.inference_mode()
    def logits(self, project: bool = True) -> Tensor:
        """(N, C') logits of the current parameters, CPU float32 (raw (N, C) if project=False)."""
        return self._fitting(
            lambda: torch.cat([self.forward(x, project).float().cpu() for x, _ in self.batches()])
        )

    def _check_keys(self, state: StateDict) -> None:
        if state.keys() == self._float_keys:
            return
        missing = sorted(self._float_keys - state.keys())
        extra = sorted(state.keys() - self._params.keys())
        if missing or extra:
            key = (missing or extra)[0]
            raise MMSoupError(
                f"The state dict {'lacks' if missing else 'has the unknown key'} {key!r} "
                f"({len(missing)} missing, {len(extra)} unexpected); it does not fit the evaluator's model."
            )

    @torch.no_grad()
    def load(self, state: StateDict) -> None:
        """Copy a state dict into the live parameters in place."""
        self._check_keys(state)
        for key, value in state.items():
            self._params[key].copy_(value, non_blocking=True)

    def _staged(self, state: StateDict, keys: list[str], outs: list[Tensor]) -> list[Tensor]:
        """state's tensors for `keys` on the device in the parameters' dtypes (no copy if there)."""
        src = [state[k] for k in keys]
        return [
            t if t.device == o.device and t.dtype == o.dtype else t.to(o.device, o.dtype)
            for t, o in zip(src, outs)
        ]

    @torch.no_grad()
    def mix(self, base: StateDict, other: StateDict, components: Components, lambdas) -> None:
        """Write Ψ'(λ)^j = λ_j·base^j + (1-λ_j)·other^j into the parameters in place (MMS Alg. 1)."""
        if self._plan is None or self._plan.source is not components:
            self._plan = _Plan(components, self._params)
        plan = self._plan
        if isinstance(lambdas, Mapping):
            lambdas = [lambdas[name] for name in plan.names]
        lambdas = [float(v) for v in lambdas]
        if len(lambdas) != len(plan.names):
            raise MMSoupError(
                f"Got {len(lambdas)} lambdas for {len(plan.names)} components; pass one per component."
            )
        self._check_keys(base)
        self._check_keys(other)
        b, o = self._staged(base, plan.keys, plan.outs), self._staged(other, plan.keys, plan.outs)
        if any(t.data_ptr() in plan.live for t in b + o):  # writing `other` would overwrite `base`
            raise MMSoupError(
                "base or other shares memory with the evaluator's live model (e.g. its own "
                "state_dict()); pass copies, e.g. {k: v.clone() for k, v in state.items()}."
            )
        lerp_(plan.outs, b, o, [lambdas[j] for j in plan.owner])  # the kernel of mixing.interpolate
        if plan.rest:
            torch._foreach_copy_(plan.rest_outs, self._staged(base, plan.rest, plan.rest_outs))

    def __call__(self, state: StateDict) -> float:
        """Load `state` and return its held-out accuracy: an Evaluator is a val_acc callable."""
        self.load(state)
        return self.accuracy()

    def mixed_accuracy(
        self, base: StateDict, other: StateDict, components: Components, lambdas
    ) -> float:
        """ValAcc(Ψ'(λ)): the MMS objective, mixed in place then evaluated (MMS Alg. 1)."""
        self.mix(base, other, components, lambdas)
        with torch.inference_mode():
            return self._mixed_hits().item() / self.n
