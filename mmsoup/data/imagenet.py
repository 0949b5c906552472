"""ImageNet, its five distribution shifts and the held-out split, read from their published layouts.

The evaluation sets of Soups §3. Every dataset is a list of image files + labels + a class projection of the
1000 ImageNet logits (class order = sorted wnids, as torchvision's ImageFolder):
- ImageNet train/val, ImageNet-Sketch: one folder per wnid; labels are ImageNet indices.
- ImageNet-V2 (matched frequency): folders `0`..`999` named by ImageNet index.
- ImageNet-R, ImageNet-A: wnid folders of a 200-class subset; logits are restricted to the
  classes whose folders are present (`ClassSubset`), labels index into that subset.
- ObjectNet 1.0: `images/<folder>/*.png` + `mappings/`; each class maps to one or more ImageNet
  classes (class score = max over them, `ClassGroups`); images of unmapped folders are dropped.
  Uncropped by default: Soups' ObjectNet class assigns its border-crop transform only after the
  test set is built (model-soups, datasets/objectnet.py), so the published ObjectNet numbers (Soups
  Table/per-model file, MMS Table 1) are of uncropped images. `objectnet_border=2` crops the 2 px
  frame that code intended (the paper profile's `objectnet_border` field).
- ImageNet2p: 26 images per class held out from ImageNet train (Soups' `imagenet_98_idxs.npy`
  when present, else a seeded draw); the rest is the fine-tuning split.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from mmsoup.data.manifest import artifact_path
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import ClassGroups, ClassSubset, Projection
from mmsoup.io import read_json

HELD_OUT_PER_CLASS = 26  # ImageNet2p: 26 x 1000 = 26,000 images (Soups §3)
IMAGENET_TRAIN_SIZE = 1_281_167
OBJECTNET_BORDER = 2  # pixels Soups' ObjectNet `crop` would cut from every side (opt-in)
MASK_NAME = "imagenet_98_idxs"  # manifest row of Soups' held-out mask
# Soups' own consistency check (utils.test_model_on_dataset): the 1001st held-out image.
_MASK_PROBE = (1000, "n01675722_4108.JPEG")


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted, as ImageFolder orders them)."""
    from timm.data import ImageNetInfo  # a table of synsets shipped with timm (a dependency)

    return tuple(ImageNetInfo("imagenet-1k").label_names())


@cache
def _wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


@dataclass(frozen=True, eq=False)
class FolderDataset:
    """Image files + labels + the projection of 1000-class logits onto the label space."""

    name: str
    paths: tuple[str, ...]
    labels: np.ndarray  # (N,) int64, indices into the projected label space
    classes: tuple[str, ...]  # the folder (wnid / index / ObjectNet name) of each label
    projection: Projection | None = None
    border: int = 0  # pixels to crop from every side before the transform (ObjectNet)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray, name: str | None = None) -> FolderDataset:
        """The examples at `indices` (same classes and projection)."""
        indices = np.asarray(indices, dtype=np.int64)
        paths = tuple(self.paths[i] for i in indices)
        return replace(self, name=name or self.name, paths=paths, labels=self.labels[indices])

    def fingerprint(self) -> str:
        """sha256 over the (path, label) list and the border: a cache key for the decoded tensors."""
        digest = hashlib.sha256(f"{self.name}|{self.border}|{len(self)}".encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"{path}\t{label}\n".encode())
        return digest.hexdigest()


def _scan(directory: Path, class_to_idx: dict[str, int], what: str) -> list[tuple[str, int]]:
    """(path, class index) in ImageFolder order: classes by folder name, files sorted."""
    samples = make_dataset(
        str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
    )
    if not samples:
        raise MMSoupError(
            f"{directory} holds no images for {what}; check that it was fully unpacked."
        )
    return samples


def _dataset(
    name: str,
    samples: list[tuple[str, int]],
    classes: Sequence[str],
    projection: Projection | None = None,
    border: int = 0,
) -> FolderDataset:
    paths, labels = zip(*samples)
    return FolderDataset(
        name, paths, np.array(labels, dtype=np.int64), tuple(classes), projection, border
    )


def _folders(directory: str | os.PathLike, what: str) -> list[str]:
    directory = Path(directory)
    if not directory.is_dir():
        raise MMSoupError(
            f"{what} is missing: {directory} is not a folder; see `python -m mmsoup data verify --profile paper`."
        )
    return sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
    )


def _wnid_indices(folders: Sequence[str], directory: Path) -> list[int]:
    unknown = [f for f in folders if f not in _wnid_index()]
    if unknown:
        raise MMSoupError(
            f"{directory} has folders that are not ImageNet-1k wnids ({', '.join(unknown[:3])}); "
            "point it at the dataset folder that holds one folder per wnid."
        )
    return [_wnid_index()[f] for f in folders]


def wnid_dataset(name: str, directory: str | os.PathLike) -> FolderDataset:
    """ImageNet train/val or ImageNet-Sketch: wnid folders, labels = ImageNet class indices."""
    directory = Path(directory)
    folders = _folders(directory, name)
    indices = _wnid_indices(folders, directory)
    return _dataset(name, _scan(directory, dict(zip(folders, indices)), name), imagenet_wnids())


def wnid_subset_dataset(name: str, directory: str | os.PathLike) -> FolderDataset:
    """ImageNet-R / -A: logits restricted to the wnids whose folders are present (as Soups' evaluation)."""
    directory = Path(directory)
    folders = _folders(directory, name)  # sorted wnids = sorted ImageNet indices
    indices = _wnid_indices(folders, directory)
    samples = _scan(directory, {f: k for k, f in enumerate(folders)}, name)
    return _dataset(name, samples, folders, ClassSubset(indices))


def class_index_dataset(name: str, directory: str | os.PathLike) -> FolderDataset:
    """ImageNet-V2: folders named by ImageNet class index (`0`..`999`)."""
    directory = Path(directory)
    folders = _folders(directory, name)
    bad = [f for f in folders if not (f.isdigit() and int(f) < 1000)]
    if bad:
        raise MMSoupError(
            f"{directory} has folders that are not class indices 0..999 ({', '.join(bad[:3])}); "
            "point it at imagenetv2-matched-frequency-format-val."
        )
    return _dataset(name, _scan(directory, {f: int(f) for f in folders}, name), imagenet_wnids())


@cache
def _lemma_index() -> dict[str, int]:
    """ImageNet class name (the full WordNet lemma string) -> class index; ambiguous names dropped."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    lemmas = [info.label_name_to_description(w) for w in imagenet_wnids()]
    return {n: i for i, n in enumerate(lemmas) if lemmas.count(n) == 1}  # "crane" is two classes


def objectnet_dataset(name: str, directory: str | os.PathLike, border: int = 0) -> FolderDataset:
    """ObjectNet 1.0 (Barbu et al., NeurIPS 2019) with its own `mappings/`: 113 classes, max-projection;
    `border` pixels cropped from every side (0: as the published numbers)."""
    directory = Path(directory)
    mappings = directory / "mappings"
    if not mappings.is_dir():
        raise MMSoupError(f"{mappings} does not exist; unpack ObjectNet with its mappings/ folder.")
    folder_to_label = read_json(mappings / "folder_to_objectnet_label.json", "ObjectNet mapping")
    label_to_names = read_json(mappings / "objectnet_to_imagenet_1k.json", "ObjectNet mapping")
    lemma_index = _lemma_index()
    groups: dict[str, list[int]] = {}
    for folder, label in folder_to_label.items():
        if label not in label_to_names:
            continue  # an ObjectNet class without ImageNet counterpart: its images are dropped
        names = label_to_names[label].split("; ")
        missing = [n for n in names if n not in lemma_index]
        if missing:
            raise MMSoupError(
                f"{mappings / 'objectnet_to_imagenet_1k.json'} maps {label!r} to {missing[0]!r}, "
                "which is not an (unambiguous) ImageNet-1k class name; restore the original file."
            )
        groups[folder] = sorted(lemma_index[n] for n in names)
    if not groups:
        raise MMSoupError(
            f"{mappings} maps no ObjectNet folder to ImageNet; restore the original files."
        )
    classes = sorted(groups)  # Soups: labels index the sorted mapped folder names
    images = directory / "images"
    _folders(images, name)  # a clear error if images/ is missing
    samples = _scan(images, {f: k for k, f in enumerate(classes) if (images / f).is_dir()}, name)
    projection = ClassGroups([groups[c] for c in classes])
    return _dataset(name, samples, classes, projection, border)


def held_out_mask(
    train: FolderDataset,
    per_class: int = HELD_OUT_PER_CLASS,
    seed: int = 0,
    mask_file: str | os.PathLike | None = None,
) -> np.ndarray:
    """Boolean (N,) mask of ImageNet2p over `train` in ImageFolder order (Soups' file if given)."""
    if mask_file is not None:
        return _load_mask(Path(mask_file), train)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(train), dtype=bool)
    for c in np.unique(train.labels):
        members = np.flatnonzero(train.labels == c)
        if len(members) <= per_class:
            raise MMSoupError(
                f"Class {train.classes[c]} of {train.name} has only {len(members)} images; "
                f"holding out {per_class} would leave none to fine-tune on, lower per_class."
            )
        mask[rng.choice(members, size=per_class, replace=False)] = True
    return mask


def _load_mask(path: Path, train: FolderDataset) -> np.ndarray:
    # Soups' datasets/imagenet.py: np.load -> 1 = held out (ImageNet2p, `np.where(idxs)`),
    # 0 = fine-tuning (ImageNet98p, `1 - idxs`), over ImageFolder(train).samples order.
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MMSoupError(
            f"Cannot read the held-out mask {path} ({e}); fetch it again or delete it."
        ) from e
    if mask.ndim != 1 or len(mask) != len(train):
        raise MMSoupError(
            f"{path} has {mask.shape} entries but {train.name} has {len(train)} images; the mask fits "
            "only the full ImageNet train folder (delete the mask to draw a seeded split instead)."
        )
    mask = mask.astype(bool)
    i, suffix = _MASK_PROBE
    probe = train.paths[np.flatnonzero(mask)[i]] if len(train) == IMAGENET_TRAIN_SIZE else suffix
    if not probe.endswith(suffix):
        raise MMSoupError(
            f"{path} does not line up with {train.name}: held-out image {i} should be {suffix}; "
            "the train folder must hold the unmodified ILSVRC2012 files, one folder per wnid."
        )
    return mask


def imagenet_splits(
    root: str | os.PathLike | None = None,
    per_class: int = HELD_OUT_PER_CLASS,
    seed: int = 0,
    mask_file: str | os.PathLike | None = None,
    train: FolderDataset | None = None,
) -> tuple[FolderDataset, FolderDataset]:
    """(ImageNet2p held-out split, complementary fine-tuning split) of ImageNet train.

    Uses Soups' mask (`mask_file`, else the manifest's `imagenet_98_idxs` when it exists under the
    data root) so that numbers are comparable; otherwise `per_class` images per class drawn with `seed`.
    """
    train = train if train is not None else load_dataset("ImageNetTrain", root)
    if mask_file is None:
        default = artifact_path(MASK_NAME, root)
        mask_file = default if default.is_file() else None
    mask = held_out_mask(train, per_class, seed, mask_file)
    return (
        train.subset(np.flatnonzero(mask), name="ImageNet2p"),
        train.subset(np.flatnonzero(~mask), name="ImageNet98p"),
    )


# dataset name (the column names of Soups' result files) -> (manifest row, builder)
_DATASETS: dict[str, tuple[str, Callable[[str, Path], FolderDataset]]] = {
    "ImageNetTrain": ("imagenet-train", wnid_dataset),
    "ImageNet": ("imagenet-val", wnid_dataset),
    "ImageNetV2": ("imagenetv2-matched-frequency", class_index_dataset),
    "ImageNetSketch": ("imagenet-sketch", wnid_dataset),
    "ImageNetR": ("imagenet-r", wnid_subset_dataset),
    "ObjectNet": ("objectnet-1.0", objectnet_dataset),
    "ImageNetA": ("imagenet-a", wnid_subset_dataset),
}
TEST_SETS = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetR", "ObjectNet", "ImageNetA")
SHIFTS = TEST_SETS[1:]  # "Avg OOD" = mean top-1 over these five (Soups §3)


def load_dataset(
    name: str, root: str | os.PathLike | None = None, *, objectnet_border: int = 0, **split_kwargs
) -> FolderDataset:
    """A paper dataset by its Soups name (`ImageNet2p`, `ImageNet`, ..., `ImageNetA`) under the data root."""
    if name in ("ImageNet2p", "ImageNet98p"):
        held_out, finetune = imagenet_splits(root, **split_kwargs)
        return held_out if name == "ImageNet2p" else finetune
    if name not in _DATASETS:
        known = ", ".join(["ImageNet2p", "ImageNet98p", *_DATASETS])
        raise MMSoupError(f"Unknown dataset {name!r}; pick one of {known}.")
    row, build = _DATASETS[name]
    if name == "ObjectNet":
        return objectnet_dataset(name, artifact_path(row, root), border=objectnet_border)
    return build(name, artifact_path(row, root))
