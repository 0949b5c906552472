"""The image classifier of both papers: a CLIP image encoder, L2-normalised features, a linear head.

The wrapper mirrors Soups' `ModelWrapper` (mlfoundations/model-soups): attributes `model` (the
open_clip CLIP model with its text transformer deleted) and `classification_head`, so a state dict
has the released checkpoints' layout (`model.*` + `classification_head.*`) and the
same partitions apply to CLIP ViT-B/32 and to the embedded tiny ViT.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mmsoup.errors import MMSoupError

TINY_ARCH = "mmsoup-tiny-vit"  # 4-block, width-96 ViT on 28x28 digits (the embedded default)
PAPER_ARCH = "ViT-B-32-quickgelu"  # the architecture of the 72 released CLIP checkpoints
_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_configs() -> None:
    """Make mmsoup's model configs (JSON files named after the model) known to open_clip."""
    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


class ImageClassifier(nn.Module):
    """CLIP image encoder -> L2-normalised features -> linear head (Soups §3, App. J.2.1)."""

    def __init__(self, clip_model: nn.Module, num_classes: int) -> None:
        super().__init__()
        if hasattr(clip_model, "transformer"):  # the text transformer is never used (as in Soups)
            delattr(clip_model, "transformer")
        self.model = clip_model
        feature_dim = clip_model.visual.output_dim
        self.classification_head = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        """Number of classes of the linear head."""
        return self.classification_head.out_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features, (B, D)."""
        return F.normalize(self.model.encode_image(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, 3, H, W)."""
        return self.classification_head(self.features(images))


class _NoWeightsNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" warning: a random init is intended here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Mute open_clip's notice for the block only (and keep it from configuring logging)."""
    root = logging.getLogger()
    notice, placeholder = _NoWeightsNotice(), logging.NullHandler()
    bare = not root.handlers  # `logging.warning` would add a stderr handler to a bare root
    root.addFilter(notice)
    if bare:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(notice)
        if bare:
            root.removeHandler(placeholder)


def create_classifier(
    arch: str = TINY_ARCH, num_classes: int = 10, seed: int | None = 0
) -> ImageClassifier:
    """Build a randomly initialised classifier of an open_clip architecture (no weights fetched).

    With a `seed` the weights are drawn from torch's RNG seeded with it, inside `fork_rng`, so the
    caller's RNG state is the same afterwards; `seed=None` draws from the caller's RNG.
    """
    register_configs()
    if arch not in open_clip.list_models():
        raise MMSoupError(
            f"Unknown architecture {arch!r}; pick one of open_clip.list_models(), e.g. {TINY_ARCH!r} or {PAPER_ARCH!r}."
        )
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, _quiet_random_init():
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # the CPU generator the init draws from
        clip_model = open_clip.create_model(arch, pretrained=None)
        return ImageClassifier(clip_model, num_classes)
