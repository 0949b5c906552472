"""Tiny stand-ins of the paper data in their published layouts (real JPEG/PNG files) and of the
released checkpoints (a random-init open_clip ViT-B-32 classifier saved as Soups saved theirs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN
from open_clip.constants import OPENAI_DATASET_STD as OPENAI_STD
from PIL import Image

from mmsoup.data.imagenet import imagenet_wnids
from mmsoup.data.manifest import artifact_path

WNIDS = imagenet_wnids()


def colour(seed: int) -> np.ndarray:
    """The base colour of a class's stand-in images (a random-init ViT separates them well)."""
    return np.random.default_rng(seed).integers(0, 256, 3)


def images(folder: Path, n: int, suffix: str = ".JPEG", seed: int = 0, size=(40, 30)) -> None:
    """`n` real image files in `folder`: noisy patches of the colour of `seed` (the class index),
    landscape and portrait, so that a classifier can tell classes apart."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = size if i % 2 == 0 else size[::-1]
        noise = np.random.default_rng([seed, i]).normal(0, 30, (h, w, 3))
        pixels = np.clip(colour(seed) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{seed}_{i}{suffix}")


def wnid_tree(root: Path, indices: list[int], n: int = 2, suffix: str = ".JPEG") -> None:
    """ImageNet's layout: one folder per wnid."""
    for k in indices:
        images(root / WNIDS[k], n, suffix, seed=k)


# Images per set in `make_data_root` (ImageNet2p: 2 per class of 3 train classes when drawn).
SIZES = {
    "ImageNet": 6,
    "ImageNetV2": 6,
    "ImageNetSketch": 4,
    "ImageNetR": 6,
    "ObjectNet": 4,
    "ImageNetA": 2,
}


# ObjectNet folder -> the ImageNet class whose colour its images take (analog clock, banana).
OBJECTNET = {"alarm_clock": 409, "banana": 954, "squeegee": 4242}
# Every ImageNet class with stand-in images in `make_data_root`.
CLASSES = (0, 1, 2, 3, 5, 6, 7, 10, 11, 100, 409, 954, 999)


def make_data_root(root: Path) -> Path:
    """A data root with every paper dataset in its published layout (a few images per class)."""
    wnid_tree(artifact_path("imagenet-train", root), [0, 1, 2], n=5)
    wnid_tree(artifact_path("imagenet-val", root), [999, 0, 5])
    wnid_tree(artifact_path("imagenet-sketch", root), [7, 3])
    for k in (10, 2, 0):  # V2: folders named by class index, .jpeg files
        images(artifact_path("imagenetv2-matched-frequency", root) / str(k), 2, ".jpeg", seed=k)
    wnid_tree(artifact_path("imagenet-r", root), [100, 3, 7], suffix=".jpg")
    (artifact_path("imagenet-r", root) / "README.txt").write_text("not a class")  # as in the tar
    wnid_tree(artifact_path("imagenet-a", root), [6, 11], n=1, suffix=".jpg")
    objectnet = artifact_path("objectnet-1.0", root)
    (objectnet / "mappings").mkdir(parents=True)
    (objectnet / "mappings" / "folder_to_objectnet_label.json").write_text(
        json.dumps({"alarm_clock": "Alarm clock", "banana": "Banana", "squeegee": "Squeegee"})
    )
    (objectnet / "mappings" / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Alarm clock": "analog clock; digital clock", "Banana": "banana"})
    )
    for folder, k in OBJECTNET.items():  # squeegee has no ImageNet class
        images(objectnet / "images" / folder, 2, ".png", seed=k)
    return root


def save_released_checkpoints(
    root: Path, n: int, noise: float = 5.0, tower_noise: float = 0.02
) -> list[Path]:
    """model_0..model_{n-1}.pt in the released layout: a torch.save'd state dict of the wrapped
    ViT-B-32 classifier (`model.*` image tower without the text tower, `classification_head.*`).

    model_0 (the "LP init") is a random-init image tower whose head rows for CLASSES are the
    features of each class's colour, so it classifies the stand-ins; model_k adds seeded noise of
    `noise` times the head's spread to the head and `tower_noise` times each tensor's spread to the
    tower: one basin, models of different accuracy, soups that differ from their ingredients.
    """
    from mmsoup.models import PAPER_ARCH, create_classifier

    model = create_classifier(PAPER_ARCH, 1000, seed=0).eval()
    prototypes = torch.stack(
        [torch.from_numpy(np.broadcast_to(colour(k), (224, 224, 3)).copy()) for k in CLASSES]
    )
    mean, std = torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD)
    x = (prototypes.permute(0, 3, 1, 2).float() / 255 - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        model.classification_head.weight[list(CLASSES)] = 20 * model.features(x)
        model.classification_head.bias.zero_()
    base = model.state_dict()
    paths = []
    for k in range(n):
        gen = torch.Generator().manual_seed(k + 1)
        state = {}
        for key, v in base.items():
            if v.is_floating_point() and v.numel() > 1:
                scale = noise if key.startswith("classification_head") else tower_noise
                v = v + scale * v.std() * torch.randn(v.shape, generator=gen)
            state[key] = v.clone()
        path = artifact_path(f"model_{k}", root)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        paths.append(path)
    return paths
