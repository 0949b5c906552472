"""Decode and preprocess a dataset once into a memory-mapped uint8 tensor cache.

MMS evaluates ValAcc hundreds of times per candidate on the same 26,000 held-out images, so the
images are decoded, resized and cropped exactly once (in parallel DataLoader workers) into
`images.npy` of shape (N, 3, 224, 224) uint8 + `labels.npy`, in a folder keyed by the dataset's
fingerprint and the transform. The float conversion and CLIP normalisation run per batch on the
device (`normalizer`), which reproduces open_clip's validation preprocess bit for bit: uint8/255
is exactly what `ToTensor` computes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from mmsoup.data import imagenet
from mmsoup.data.imagenet import FolderDataset
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Projection
from mmsoup.io import cache_root
from mmsoup.progress import tqdm

if TYPE_CHECKING:
    from mmsoup.profiles import Profile

CLIP_MEAN, CLIP_STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
CACHE_FORMAT = 1  # bump when the file layout changes


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def clip_transform(size: int = 224) -> T.Compose:
    """open_clip's validation transform without ToTensor/Normalize: PIL -> (3, size, size) uint8."""
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),  # shorter side -> size
            T.CenterCrop(size),
            T.Lambda(_to_rgb),  # after the resize, as open_clip does
            T.PILToTensor(),
        ]
    )


def transform_key(size: int = 224) -> str:
    """A name for `clip_transform(size)` in cache folder names."""
    return f"clip{size}-bicubic-center"


class _Decode(torch.utils.data.Dataset):
    """Open, border-crop and transform one image (runs inside the DataLoader workers)."""

    def __init__(self, dataset: FolderDataset, size: int) -> None:
        self.paths, self.border, self.size = dataset.paths, dataset.border, size
        self.transform = clip_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        try:
            with Image.open(self.paths[i]) as im:
                im.load()
                if self.border:  # ObjectNet's frame
                    b = self.border
                    im = im.crop((b, b, im.width - b, im.height - b))
                return self.transform(im)
        except OSError as e:
            raise MMSoupError(
                f"Cannot decode {self.paths[i]} ({e}); re-download the dataset or delete that file."
            ) from e


def decode(dataset: FolderDataset, index: int, size: int = 224) -> Tensor:
    """One image of `dataset` decoded exactly as the cache stores it, (3, size, size) uint8."""
    return _Decode(dataset, size)[index]


@dataclass(eq=False)
class TensorCache:
    """A decoded dataset on disk: uint8 images (N, 3, H, W), int64 labels, the projection."""

    path: Path
    name: str
    images: np.ndarray  # memory-mapped, copy-on-write (the file is never modified)
    labels: np.ndarray
    projection: Projection | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """(images uint8, labels int64) as tensors on `device`; on the CPU they stay memory-mapped."""
        images, labels = torch.from_numpy(self.images), torch.from_numpy(self.labels)
        return images.to(device), labels.to(device)


def _open(path: Path, dataset: FolderDataset) -> TensorCache:
    return TensorCache(
        path,
        dataset.name,
        np.load(path / "images.npy", mmap_mode="c"),
        np.load(path / "labels.npy"),
        dataset.projection,
    )


def build_cache(
    dataset: FolderDataset,
    directory: str | os.PathLike | None = None,
    size: int = 224,
    workers: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> TensorCache:
    """Decode `dataset` once into `<directory>/<name>-<transform>-<fingerprint>/` (reused if there)."""
    directory = cache_root(directory)
    fingerprint = dataset.fingerprint()
    key = f"{dataset.name}-{transform_key(size)}-{fingerprint[:16]}"
    final = directory / key
    if (final / "meta.json").is_file():
        return _open(final, dataset)
    if len(dataset) == 0:
        raise MMSoupError(f"{dataset.name} has no images to cache; check its folder.")
    directory.mkdir(parents=True, exist_ok=True)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=directory))
    try:
        images = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(dataset), 3, size, size)
        )
        loader = torch.utils.data.DataLoader(
            _Decode(dataset, size), batch_size=batch_size, num_workers=workers, shuffle=False
        )
        start = 0
        with tqdm(
            total=len(dataset), desc=f"decode {dataset.name}", unit="img", disable=not progress
        ) as bar:
            try:
                for batch in loader:
                    images[start : start + len(batch)] = batch.numpy()
                    start += len(batch)
                    bar.update(len(batch))
            except MMSoupError as e:  # from a worker: keep the one sentence, not its traceback
                raise MMSoupError(
                    str(e).strip().splitlines()[-1].split("MMSoupError: ")[-1]
                ) from None
        images.flush()
        del images
        np.save(tmp / "labels.npy", dataset.labels.astype(np.int64))
        meta = {
            "format": CACHE_FORMAT,
            "name": dataset.name,
            "n": len(dataset),
            "size": size,
            "transform": transform_key(size),
            "border": dataset.border,
            "fingerprint": fingerprint,
        }
        # meta.json is written last: it marks a complete cache
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, final)  # the cache appears whole or not at all
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(final, dataset)


def normalizer(
    mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> Callable[[Tensor], Tensor]:
    """Per-batch on-device preprocess: uint8 (B, 3, H, W) -> float32 ((x/255 - mean) / std).

    Float32 out (as open_clip's preprocess); under bf16 autocast the model casts it itself.
    """
    consts: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def preprocess(x: Tensor) -> Tensor:
        if x.device not in consts:
            m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            consts[x.device] = (m, s)
        m, s = consts[x.device]
        return (x.float() / 255).sub_(m).div_(s)  # same op order as ToTensor + Normalize

    return preprocess


def eval_set(name: str, profile: Profile) -> tuple[Tensor, Tensor, Callable, Projection | None]:
    """(images, labels, preprocess, projection) of an ImageNet set as the stages evaluate it, cached.

    The loader of mmsoup.datasets' `imagenet` row (here, not in mmsoup.data.imagenet, which this
    module imports). `heldout` is Soups' ImageNet2p (held out of the fine-tuning data); ObjectNet is uncropped unless
    the profile asks (`objectnet_border`: the published numbers are uncropped).
    """
    if name == "heldout":  # Soups' ImageNet2p: held out of the fine-tuning data
        dataset = imagenet.load_dataset("ImageNet2p", per_class=profile.heldout_per_class)
    else:  # ObjectNet uncropped unless the profile asks (the published numbers are uncropped)
        dataset = imagenet.load_dataset(name, objectnet_border=profile.objectnet_border)
    cached = build_cache(dataset)
    images = torch.from_numpy(np.asarray(cached.images))
    return images, torch.from_numpy(np.asarray(cached.labels)), normalizer(), cached.projection
