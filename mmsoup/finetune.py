"""One end-to-end fine-tuning run from the LP init (Soups App. J.2.1, scaled to the tiny ViT).

AdamW, linear warm-up then cosine decay per step, label smoothing and mixup (timm), augmentation
"minimal" (random resized crop of 90-100% of the area) or that crop followed by RandAugment(M, N)
(torchvision.transforms.v2 on uint8 tensors). The run is identified by its `FinetuneConfig`; the
checkpoint is written atomically as safetensors with a JSON sidecar (hyper-parameters, `val_acc` on
the held-out split, wall time, seed), so a killed run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from mmsoup.checkpoints import load_state_dict, read_sidecar, save_state_dict
from mmsoup.data.digits import HELDOUT_IMAGES, MIN_TRAIN, SPLIT_SIZES
from mmsoup.datasets import dataset
from mmsoup.determinism import pinned
from mmsoup.distributed import rank_world
from mmsoup.errors import MMSoupError
from mmsoup.io import sha256_file
from mmsoup.models import TINY_ARCH, ImageClassifier, create_classifier

AUGMENTATIONS = ("minimal", "randaugment")
AUG_GROUP = 8  # images per group sharing one draw of crop/RandAugment parameters (see _augment)
NUM_CLASSES = dataset("digits").num_classes  # the embedded study fine-tunes on the digits
MAX_HELDOUT = HELDOUT_IMAGES + SPLIT_SIZES["train"] - MIN_TRAIN
RANDAUG_BINS = 31  # torchvision's default: magnitudes 0..30


def _is_a(value: Any, kind: type) -> bool:
    """JSON's types: a bool is not a number, an int is also a float."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _known_arch(arch: str) -> bool:
    """Whether open_clip (with mmsoup's configs) can build `arch`."""
    import open_clip

    from mmsoup.models import register_configs

    register_configs()
    return arch in open_clip.list_models()


# Every field of FinetuneConfig: (type, range check, what is allowed). Checked on construction,
# so a config from JSON, a sweep file or a profile is refused before any work starts.
FIELD_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "lr": (float, lambda v: v > 0, "a number > 0, e.g. 0.001"),
    "weight_decay": (float, lambda v: v >= 0, "a number >= 0"),
    "epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    "label_smoothing": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "mixup_alpha": (float, lambda v: v >= 0, "a number >= 0 (0: no mixup)"),
    "augment": (str, lambda v: v in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}"),
    "randaug_m": (int, lambda v: 0 <= v < RANDAUG_BINS, f"an integer in 0..{RANDAUG_BINS - 1}"),
    "randaug_n": (int, lambda v: v >= 0, "an integer >= 0"),
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
    "batch_size": (
        int, lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (mixup pairs images)"
    ),
    "warmup_frac": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train_images": (int, lambda v: v >= 2, "null (the whole split) or an integer >= 2"),
    "arch": (str, _known_arch, f"an open_clip architecture such as {TINY_ARCH!r}"),
    "heldout_images": (
        int, lambda v: HELDOUT_IMAGES <= v <= MAX_HELDOUT, f"an integer in {HELDOUT_IMAGES}..{MAX_HELDOUT}"
    ),
}  # fmt: skip


@dataclass(frozen=True)
class FinetuneConfig:
    """The identity of one fine-tuning run: its hyper-parameters and seed (Soups App. J.2.1)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    epochs: int = 6
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0: no mixup
    augment: str = "minimal"  # "minimal" or "randaugment"
    randaug_m: int = 0  # RandAugment magnitude, torchvision's 0..30 (30 = timm's M10, the max)
    randaug_n: int = 0  # RandAugment number of ops
    seed: int = 0
    batch_size: int = 64
    warmup_frac: float = 0.1  # share of the steps with linear warm-up
    train_images: int | None = None  # None: the whole `train` split; else a fixed random subset
    arch: str = TINY_ARCH
    # Images held out of the digits' fine-tuning data (mmsoup.data.digits.load_split): the
    # held-out set the run is scored on, and what is left of `train` for training.
    heldout_images: int = HELDOUT_IMAGES

    def __post_init__(self) -> None:
        """Refuse a field of the wrong type or out of range (FIELD_RULES), naming what is allowed."""
        for name, (kind, ok, allowed) in FIELD_RULES.items():
            value = getattr(self, name)
            if name == "train_images" and value is None:
                continue
            if not _is_a(value, kind):
                raise MMSoupError(
                    f"{name}={value!r} has the wrong type ({type(value).__name__}); use {allowed}."
                )
            if not ok(value) or (kind is float and not math.isfinite(value)):
                problem = "not known" if kind is str else "out of range"
                raise MMSoupError(f"{name}={value!r} is {problem}; use {allowed}.")

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (`heldout_images` only when not the default: a field
        added later, so that earlier sweeps' configs, keys and checkpoints stay current)."""
        out = dataclasses.asdict(self)
        if out["heldout_images"] == HELDOUT_IMAGES:
            del out["heldout_images"]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str | None = None) -> FinetuneConfig:
        """A checked config from a JSON object; a bad key or value is an MMSoupError naming it (and `where`)."""
        known = [f.name for f in dataclasses.fields(cls)]
        try:
            if not isinstance(data, dict):
                raise MMSoupError(
                    f'a run config must be a JSON object such as {{"lr": 0.001}}, not {data!r}.'
                )
            unknown = sorted(set(data) - set(known))
            if unknown:
                raise MMSoupError(
                    f"unknown fine-tuning hyper-parameter {unknown[0]!r}; valid ones are {', '.join(sorted(known))}."
                )
            return cls(**data)
        except MMSoupError as e:
            if where is None:
                raise
            raise MMSoupError(f"In {where}, {e}") from None

    def key(self) -> str:
        """A short stable hash of the config (names runs given without a name)."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr at `step`: linear warm-up then cosine decay to 0 (Soups App. J.2.1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def soft_targets(
    labels: torch.Tensor, num_classes: int, label_smoothing: float, lam: float = 1.0
) -> torch.Tensor:
    """Smoothed (and, for lam < 1, mixed with the flipped batch) one-hot targets (timm's rule)."""
    from timm.data.mixup import mixup_target  # timm's import costs seconds: only when training

    return mixup_target(labels, num_classes, lam=lam, smoothing=label_smoothing)


def make_augment(config: FinetuneConfig) -> v2.Transform:
    """The per-image augmentation of a run, on uint8 (B, 1, H, W) tensors (Soups App. J.2.1).

    Magnitudes are torchvision's 31 bins: M=30 is the strongest (rotate 30 deg, shear 0.3,
    translate 45%), the level that Soups' timm "rand-mM-nN" reaches at M >= 10 (timm saturates
    there), so timm's M is torchvision's min(3M, 30).
    """
    crop = v2.RandomResizedCrop(28, scale=(0.9, 1.0), antialias=True)
    if config.augment == "minimal" or config.randaug_n == 0:
        return crop
    magnitude = min(max(config.randaug_m, 0), RANDAUG_BINS - 1)
    randaug = v2.RandAugment(config.randaug_n, magnitude, num_magnitude_bins=RANDAUG_BINS)
    return v2.Compose([crop, randaug])


def _augment(transform: v2.Transform, images: torch.Tensor) -> torch.Tensor:
    """Augment uint8 (B, H, W) images in groups of AUG_GROUP, each group with its own random draw.

    torchvision draws one set of parameters per call; calling it per image costs ~8x more Python
    overhead, calling it once per batch would give every image of a batch the same crop.
    """
    x = images.unsqueeze(1)  # (B, 1, H, W) uint8
    return torch.cat([transform(g) for g in x.split(AUG_GROUP)]).squeeze(1)


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world) for one run; under torchrun (WORLD_SIZE > 1) a gloo process group (the
    fine-tuning runs on CPU) is set up for the run and torn down after it (DDP)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        yield rank_world()
        return
    dist.init_process_group("gloo")
    try:
        yield rank_world()
    finally:
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed torch (model, torchvision transforms), numpy (timm's Mixup draws) and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500
) -> float:
    """Top-1 accuracy (a fraction) of `model` on preprocessed images (N, 3, H, W)."""
    was = model.training
    model.eval()
    correct = sum(
        int((model(x).argmax(-1) == y).sum())
        for x, y in zip(images.split(batch), labels.split(batch))
    )
    model.train(was)
    return correct / max(1, len(labels))


def load_classifier(path: str | os.PathLike, arch: str = TINY_ARCH) -> ImageClassifier:
    """A 10-class classifier of `arch` with the weights of checkpoint `path` (e.g. the LP init)."""
    model = create_classifier(arch, NUM_CLASSES, seed=None)
    state = load_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise MMSoupError(
            f"{path} does not fit a {NUM_CLASSES}-class {arch} classifier ({str(e).splitlines()[0]}); "
            "pass the LP init written by `python -m mmsoup pretrain`."
        ) from e
    return model


def train(
    model: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig,
    on_step: Callable[[int, int, float], None] | None = None,
) -> ImageClassifier:
    """Fine-tune `model` end to end in place on uint8 images (N, 28, 28) (Soups App. J.2.1).

    Deterministic for a fixed `config.seed` and thread count: every random draw (order, crops,
    RandAugment, mixup) comes from generators seeded here. Inside a torch.distributed group of K
    processes (`torchrun`, see `process_group`) the model is wrapped in DistributedDataParallel and
    each global batch of `config.batch_size` is split into K equal slices, one per rank, so the
    averaged gradient is that of the whole batch; the order is shared, augmentation and mixup draws
    are seeded per rank.
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from mmsoup.data import digits

    rank, world = rank_world()
    if config.batch_size % (2 * world):
        raise MMSoupError(
            f"batch_size {config.batch_size} does not split into {world} even per-rank batches; "
            f"use a multiple of {2 * world} or fewer processes."
        )
    seed_everything(config.seed + rank)
    order_gen = torch.Generator().manual_seed(config.seed)  # the same order on every rank
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the CLIP leftovers outside the image tower (logit_scale, text embeddings) get no gradient
        net = DistributedDataParallel(model, find_unused_parameters=True)
    n = len(labels)
    # drop the last partial batch (a different one each epoch): mixup needs even batches
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch == 0:
        raise MMSoupError(
            f"{n} training images are fewer than one batch of {config.batch_size}; use more images."
        )
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_frac * total))
    # AdamW on all parameters with decoupled weight decay, as the Soups fine-tuning script.
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    mixup = (
        Mixup(
            mixup_alpha=config.mixup_alpha,
            label_smoothing=config.label_smoothing,
            num_classes=NUM_CLASSES,
        )
        if config.mixup_alpha > 0
        else None
    )
    loss_fn = SoftTargetCrossEntropy()
    transform = make_augment(config)
    model.train()
    step = 0
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=order_gen)
        for b in range(steps_per_epoch):
            idx = perm[b * config.batch_size : (b + 1) * config.batch_size].chunk(world)[rank]
            x = digits.to_tensor(_augment(transform, images[idx]))  # (B, 3, 28, 28) float
            y = labels[idx]
            if mixup is not None:
                x, target = mixup(x, y)
            else:
                target = soft_targets(y, NUM_CLASSES, config.label_smoothing)
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(step, total, warmup)
            loss = loss_fn(net(x), target)  # DDP: gradients averaged over ranks in backward
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None and rank == 0:
                on_step(step, total, loss.item())
            step += 1
    model.eval()
    return model


def run_finetune(
    config: FinetuneConfig,
    init: str | os.PathLike,
    out: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    name: str | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune from checkpoint `init`, measure held-out accuracy, save `out` + sidecar; return the meta."""
    from mmsoup.data import digits

    out = Path(out)
    start = time.perf_counter()
    with pinned(threads), process_group() as (rank, world):
        held = config.heldout_images
        images, labels = digits.load_split("train", held, cache_dir=digits_cache(cache_dir))
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if config.train_images is not None:  # the split is ordered by class: subsample at random
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            images, labels = (
                images[keep[: config.train_images]],
                labels[keep[: config.train_images]],
            )
        model = load_classifier(init, config.arch)
        train(model, images, labels, config, on_step=on_step)
        train_time = time.perf_counter() - start
        held_images, held_labels = digits.load_split(
            "heldout", held, cache_dir=digits_cache(cache_dir)
        )
        val_acc = accuracy(model, digits.to_tensor(held_images), torch.as_tensor(held_labels))
        meta = {
            "kind": "finetune",
            "name": name or f"run-{config.key()}",
            "config": config.to_json(),
            "val_acc": val_acc,  # top-1 on the held-out split, a fraction
            "seed": config.seed,
            "train_images": len(labels),
            "init": str(init),
            "init_sha256": sha256_file(init),  # exactly which init the run started from
            "train_seconds": round(train_time, 2),
            "wall_seconds": round(time.perf_counter() - start, 2),
            "threads": torch.get_num_threads(),
            "processes": world,
        }
        if rank == 0:  # one writer; the others wait until the checkpoint exists
            save_state_dict(model.state_dict(), out, meta)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    return meta


def is_done(path: str | os.PathLike) -> bool:
    """Whether a run's checkpoint and sidecar both exist (the sidecar is written last)."""
    path = Path(path)
    return path.is_file() and "val_acc" in read_sidecar(path)


def digits_cache(cache_dir: str | os.PathLike | None) -> Path | None:
    """The digits folder under a cache root (None: mmsoup.data.digits' default, $MMSOUP_CACHE/digits)."""
    return None if cache_dir is None else Path(cache_dir) / "digits"
