"""The study's datasets, one object each, in one registry: what a profile's `dataset` name means.

A `Dataset` holds everything the stages ask of a benchmark (Soups §3: a held-out split of the
fine-tuning data, an ID test set, five distribution shifts): its class count, its sets in the order
the study reports them, where its files live, and the module that loads them. Code resolves a
profile's `dataset` through `dataset(name)`; nothing outside this module compares dataset names.

To add a dataset: write its loader module under `mmsoup/data/` with `eval_set(name, profile)`
returning (images, labels, preprocess, projection) as `mmsoup.context.load_set` does (and
`to_tensor(images)` if an .npz of raw images should work with `mmsoup distributed --test`), then
add one `Dataset` row to `DATASETS` below (and its files to data_manifest.csv if it has any). A
profile in `mmsoup.profiles` names the row to run the study on it.

A leaf module: it imports no torch and no loader until a set is loaded (mmsoup.profiles reads it;
`mmsoup.profiles.dataset_of(spec)` is the dataset a profile spec runs on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from types import MappingProxyType, ModuleType
from typing import Any

from mmsoup.errors import MMSoupError


@dataclass(frozen=True)
class Dataset:
    """One benchmark: its sets (held-out, ID test, shifts), its classes and its loader module."""

    name: str  # what `Profile.dataset` says
    title: str  # how sentences name it ("not for ImageNet")
    num_classes: int  # the classifier head's outputs
    heldout: str  # the loader's name of the held-out split (the stages call it "heldout")
    id_set: str  # the in-distribution test set
    shifts: tuple[str, ...]  # the distribution shifts, in the order the study reports them
    splits: tuple[str, ...]  # the fine-tuning data's other splits that `load` also serves
    source: str  # the loader module: eval_set(name, profile) [, to_tensor(images), DESCRIPTIONS]
    manifest_profile: str  # the data_manifest.csv rows that list its files
    in_cache: bool  # its files are built under the cache root ($MMSOUP_CACHE), not $MMSOUP_DATA
    papers_report: bool  # the papers report on it: their Table 1 is drawn beside ours
    # Held-out images a profile may ask for (`heldout_images`, 1,000 upwards); None: fixed here,
    # sized per class instead (`heldout_per_class`).
    max_heldout_images: int | None = None

    @property
    def sets(self) -> tuple[str, ...]:
        """Every set `load` accepts (`mmsoup distributed --test`): splits, held-out, test sets."""
        return tuple(dict.fromkeys((*self.splits, "heldout", self.heldout, *self.test_sets)))

    @property
    def test_sets(self) -> tuple[str, ...]:
        """ID test set first, then the shifts (the columns of Table 1)."""
        return (self.id_set, *self.shifts)

    def module(self) -> ModuleType:
        """The loader module (imported on first use)."""
        return import_module(self.source)

    def load(self, name: str, profile: Any) -> tuple[Any, Any, Callable | None, Any]:
        """(images, labels, preprocess, projection) of set `name` ("heldout" or a test set).

        `profile`: the mmsoup.profiles.Profile whose fields size the sets (`heldout_images`, ...).
        """
        return self.module().eval_set(name, profile)

    def to_tensor(self, images: Any) -> Any:
        """Raw images of an .npz (N, H, W) as the model's input tensors."""
        convert = getattr(self.module(), "to_tensor", None)
        if convert is None:
            raise MMSoupError(
                f"An .npz for the {self.title} dataset must hold model-ready (N, 3, H, W) images, "
                f"not {getattr(images, 'shape', '?')}."
            )
        return convert(images)

    def descriptions(self) -> Mapping[str, str]:
        """Set name -> one line on how it was made (empty where the loader has none)."""
        return getattr(self.module(), "DESCRIPTIONS", {})


DATASETS: MappingProxyType[str, Dataset] = MappingProxyType(
    {
        "digits": Dataset(
            name="digits",
            title="digits",
            num_classes=10,
            heldout="heldout",
            id_set="test",
            shifts=("recollection", "renditions", "sketch", "clutter", "adversarial"),
            splits=("train",),
            source="mmsoup.data.digits",
            manifest_profile="embedded",
            in_cache=True,
            papers_report=False,
            max_heldout_images=3000,  # 1,000 + up to 2,000 moved out of the 3,000 train digits
        ),
        "imagenet": Dataset(
            name="imagenet",
            title="ImageNet",
            num_classes=1000,
            heldout="ImageNet2p",  # Soups' held-out 2 % of ImageNet train
            id_set="ImageNet",
            shifts=("ImageNetV2", "ImageNetSketch", "ImageNetR", "ObjectNet", "ImageNetA"),
            splits=("ImageNetTrain", "ImageNet98p"),
            source="mmsoup.data.cache",  # mmsoup.data.imagenet's sets, decoded once
            manifest_profile="paper",
            in_cache=False,
            papers_report=True,
        ),
    }
)


def dataset(name: str) -> Dataset:
    """The registered dataset `name`; an unknown one is one MMSoupError sentence."""
    try:
        return DATASETS[name]
    except KeyError:
        raise MMSoupError(f"Unknown dataset {name!r}; pick one of {', '.join(DATASETS)}.") from None
