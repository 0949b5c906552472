"""What the stages evaluate on: a profile's data sets, a run's pool, one live model with an Evaluator per set.

The soup and evaluation stages, the λ explorer and `mmsoup distributed` all load their sets with
`load_set` and find their checkpoints with `model_paths`, so they score the same images in the
same order (Soups §3: held-out split, ID test set, five shifts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator, keep_freed_memory
from mmsoup.profiles import get_profile

ID_SET = {"digits": "test", "imagenet": "ImageNet"}
EvalSet = tuple[
    Tensor, Tensor, Callable | None, Tensor | None
]  # images, labels, preprocess, projection


def shifts(profile: str) -> tuple[str, ...]:
    """Names of the five shifted test sets of a profile's benchmark (Soups §3)."""
    if get_profile(profile).dataset == "digits":
        from mmsoup.data import digits

        return tuple(digits.SHIFTS)
    from mmsoup.data import imagenet

    return tuple(imagenet.SHIFTS)


def id_set(profile: str) -> str:
    """Name of the in-distribution test set of a profile."""
    return ID_SET[get_profile(profile).dataset]


def load_set(profile: str, name: str) -> EvalSet:
    """(images, labels, preprocess, projection) of one of a profile's sets: `heldout`, ID test or a shift."""
    prof = get_profile(profile)
    if prof.dataset == "digits":
        from mmsoup.data import digits

        images, labels = digits.load(name)
        return digits.to_tensor(images), torch.as_tensor(labels), None, None
    from mmsoup.data.cache import build_cache, normalizer
    from mmsoup.data.imagenet import load_dataset

    if name == "heldout":  # Soups' ImageNet2p: held out of the fine-tuning data
        dataset = load_dataset("ImageNet2p", per_class=prof.heldout_per_class)
    else:
        dataset = load_dataset(name)
    cache = build_cache(dataset)
    images = torch.from_numpy(np.asarray(cache.images))
    return images, torch.from_numpy(np.asarray(cache.labels)), normalizer(), cache.projection


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


@dataclass
class Context:
    """One live model shared by an Evaluator per data set (held-out, ID test, shifts)."""

    profile: str
    evaluators: dict[str, Evaluator]

    @property
    def heldout(self) -> Evaluator:
        """The held-out evaluator (soup construction only)."""
        return self.evaluators["heldout"]

    @property
    def test_sets(self) -> list[str]:
        """ID test set first, then the shifts."""
        return [id_set(self.profile), *shifts(self.profile)]


def context(profile: str, device: str | None = None) -> Context:
    """Build the model and load every evaluation set once (Soups §3)."""
    from mmsoup.models import create_classifier

    prof = get_profile(profile)
    model = create_classifier(prof.arch, 10 if prof.dataset == "digits" else 1000)
    sets = {
        name: load_set(profile, name) for name in ("heldout", id_set(profile), *shifts(profile))
    }
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    batch_size = 1000 if cuda else 256  # on CPU, batches of 256 run ~1.3x faster (cache-sized)
    if not cuda:
        keep_freed_memory()  # the stages' evaluations reuse the same activation blocks
    evaluators = {
        name: Evaluator(
            model, x, y, device=device, preprocess=pre, projection=proj, batch_size=batch_size
        )
        for name, (x, y, pre, proj) in sets.items()
    }
    return Context(profile, evaluators)
