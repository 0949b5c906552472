"""What the stages evaluate on: a profile's data sets, a run's pool, one live model with an Evaluator per set.

The soup and evaluation stages, the λ explorer and `mmsoup distributed` all load their sets with
`load_set` and find their checkpoints with `model_paths`, so they score the same images in the
same order (Soups §3: held-out split, ID test set, five shifts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmsoup.datasets import dataset
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator, keep_freed_memory
from mmsoup.profiles import dataset_of, get_profile

EvalSet = tuple[
    Tensor, Tensor, Callable | None, Tensor | None
]  # images, labels, preprocess, projection


def shifts(profile: str) -> tuple[str, ...]:
    """Names of the five shifted test sets of a profile's benchmark (Soups §3)."""
    return dataset_of(profile).shifts


def id_set(profile: str) -> str:
    """Name of the in-distribution test set of a profile."""
    return dataset_of(profile).id_set


def load_set(profile: str, name: str) -> EvalSet:
    """(images, labels, preprocess, projection) of one of a profile's sets: `heldout`, ID test or a shift."""
    prof = get_profile(profile)
    return dataset(prof.dataset).load(name, prof)


def model_paths(folder: str | os.PathLike) -> list[Path]:
    """The `model_<i>.safetensors` files of a folder, by their number i."""
    found = Path(folder).glob("model_*.safetensors")
    return sorted(found, key=lambda p: int(p.stem.split("_")[1]))


def ingredient_paths(profile: str, run_dir: str | os.PathLike) -> list[Path]:
    """The soup's pool, model_0 (the LP init, as in Soups) first, then model_1..model_n."""
    prof = get_profile(profile)
    if prof.search == "released":  # model_0..model_71, or the first n_runs + 1 of them
        from mmsoup.data.manifest import artifact_path

        return [artifact_path(f"model_{i}") for i in range(prof.n_runs + 1)]
    folder = Path(run_dir) / "sweep"
    paths = model_paths(folder)
    if len(paths) < 2:
        raise MMSoupError(
            f"{folder} holds fewer than two models; run notebook 01 (the sweep) first."
        )
    return paths


class Evaluators(Mapping[str, Evaluator]):
    """Set name -> Evaluator, each built (its images moved to the device) when first used.

    The soup stage touches only the held-out set, so only it is loaded and on the device then
    (3.9 GB of uint8 images at paper scale, against about 29 GB for every set); the evaluation
    stage takes the test sets one at a time and `release`s each. A missing shift fails only when
    it is used.
    """

    def __init__(self, names: list[str], build: Callable[[str], Evaluator]) -> None:
        self._names, self._build, self._built = names, build, {}

    def __getitem__(self, name: str) -> Evaluator:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def loaded(self) -> list[str]:
        """The sets whose evaluator exists now (their images are on the device)."""
        return list(self._built)

    def release(self, name: str) -> None:
        """Drop a set's evaluator and its device copy of the images."""
        ev = self._built.pop(name, None)
        if ev is not None and ev.device.type == "cuda":
            del ev
            torch.cuda.empty_cache()


@dataclass
class Context:
    """One live model shared by an Evaluator per data set (held-out, ID test, shifts)."""

    profile: str
    evaluators: Evaluators

    @property
    def heldout(self) -> Evaluator:
        """The held-out evaluator (soup construction only)."""
        return self.evaluators["heldout"]

    @property
    def test_sets(self) -> list[str]:
        """ID test set first, then the shifts."""
        return list(dataset_of(self.profile).test_sets)


def context(profile: str, device: str | None = None) -> Context:
    """Build the model; each evaluation set is loaded once, when first used (Soups §3)."""
    from mmsoup.models import create_classifier

    prof = get_profile(profile)
    data = dataset(prof.dataset)
    model = create_classifier(prof.arch, data.num_classes)
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    batch_size = 1000 if cuda else 256  # on CPU, batches of 256 run ~1.3x faster (cache-sized)
    if not cuda:
        keep_freed_memory()  # the stages' evaluations reuse the same activation blocks

    def build(name: str) -> Evaluator:
        x, y, pre, proj = data.load(name, prof)
        return Evaluator(
            model,
            x,
            y,
            device=device,
            preprocess=pre,
            projection=proj,
            batch_size=batch_size,
            amp=bool(prof.bf16),  # fp32 unless the profile opts into bf16 (`paper:bf16=1`)
        )

    names = ["heldout", *data.test_sets]
    return Context(profile, Evaluators(names, build))
