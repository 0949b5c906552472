"""Named profiles of the study as data: which backbone, how it is pretrained, which sweep.

- `embedded` (the default): the tiny ViT pretrained here on typeset characters, a 12-run random
  search on the digits benchmark; the whole study runs in minutes on a 2-core CPU.
- `smoke`: the same pipeline at a fraction of the cost (CI, first contact).
- `paper`: CLIP ViT-B/32 and the 72 released checkpoints of Soups on ImageNet (placeholders; the
  fine-tuning is not redone, the checkpoints are downloaded).

A profile only holds plain values; `mmsoup.pretrain` and `mmsoup.sweep` turn them into configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from mmsoup.datasets import Dataset, dataset
from mmsoup.errors import MMSoupError

# mmsoup.models.TINY_ARCH / PAPER_ARCH, spelled out so that reading a profile (and failing on a
# wrong name in the CLI) does not import torch and open_clip.
TINY_ARCH = "mmsoup-tiny-vit"
PAPER_ARCH = "ViT-B-32-quickgelu"
# mmsoup.data.digits.HELDOUT_IMAGES, spelled out likewise (the most: mmsoup.datasets).
HELDOUT_IMAGES = 1000


@dataclass(frozen=True)
class Profile:
    """One named setting of the whole study (backbone, pretraining, sweep, data)."""

    name: str
    description: str
    arch: str
    dataset: str  # a name in mmsoup.datasets.DATASETS: "digits" (embedded), "imagenet" (paper)
    # Keyword arguments of `mmsoup.pretrain.PretrainConfig`; None: the backbone is not ours.
    pretrain: dict[str, Any] | None
    search: str  # "random" (Soups App. J.2.1) or "released" (the 72 checkpoints)
    n_runs: int  # fine-tuned models in the sweep (model_0, the LP init, not counted)
    search_seed: int = 0
    # Seed of the embedded backbone's pretraining (replicates may vary it: `replicate --vary-backbone`).
    pretrain_seed: int = 0
    # Overrides of `mmsoup.sweep.SearchSpace` fields (the ranges of the random search).
    space: dict[str, Any] = field(default_factory=dict)
    # Overrides of `mmsoup.finetune.FinetuneConfig` fields applied to every run (e.g. fewer images).
    run_overrides: dict[str, Any] = field(default_factory=dict)
    # Scheduling only: how many fine-tuning runs go at once. Each run has `run_threads` threads
    # whatever `jobs` is, so 1 and 2 jobs write the same bytes (mmsoup.determinism).
    jobs: int = 1
    # Torch threads of the stages that run alone: pretraining, linear probe, soups, evaluation
    # (None: torch's default, for a GPU machine). Part of the study's definition: another count
    # gives other bits (mmsoup.determinism). Two on the embedded profile: a pretraining step and a
    # held-out evaluation run 1.6-1.7x faster with 2 threads than with 1 (bench_threads.py).
    threads: int | None = 1
    # Torch threads of one fine-tuning run. One: `jobs` one-thread processes fill the cores.
    run_threads: int | None = 1
    # Nevergrad evaluations per MMS candidate. The paper spends ~250; the embedded default spends
    # fewer so the whole study fits 15 minutes on 2 CPU cores (one evaluation: ~0.5 s there).
    mms_budget: int = 250
    # Images per class held out of ImageNet train when Soups' mask file is absent (paper profile).
    heldout_per_class: int = 26
    # Pixels cropped from every side of ObjectNet images. 0, as the published numbers: Soups' code
    # builds its ObjectNet test set before assigning the 2 px crop (mmsoup.data.imagenet).
    objectnet_border: int = 0
    # 1: evaluate in bf16 autocast on CUDA (a fast mode); 0: fp32 without TF32, as the references.
    bf16: int = 0
    # Digits held out of the fine-tuning data for the soups (embedded/smoke): 1,000 (0.1 points per
    # image), up to 2,000 and more moved out of `train` (mmsoup.data.digits.load_split).
    heldout_images: int = HELDOUT_IMAGES


PROFILES: MappingProxyType[str, Profile] = MappingProxyType(
    {
        "embedded": Profile(
            name="embedded",
            description="tiny ViT pretrained on ~120k typeset characters, 12-run random search on digits",
            arch=TINY_ARCH,
            dataset="digits",
            pretrain={"images": 120_000},
            search="random",
            n_runs=12,
            search_seed=0,
            jobs=2,  # two 1-thread processes use 2 cores better than one 2-thread process
            threads=2,
            mms_budget=60,
        ),
        "smoke": Profile(
            name="smoke",
            description="the embedded pipeline at smoke scale: 50 pretraining steps, 4 short runs",
            arch=TINY_ARCH,
            dataset="digits",
            pretrain={"images": 6_400, "eval_images": 1024},
            search="random",
            n_runs=4,
            search_seed=0,
            space={"epochs": (1, 1)},
            run_overrides={"train_images": 1536},  # 24 steps per run
            jobs=1,  # in-process: 4 short runs cost less than 4 interpreter start-ups
            threads=2,
            mms_budget=8,
        ),
        "paper": Profile(
            name="paper",
            description="CLIP ViT-B/32, the 72 released Soups checkpoints, ImageNet (placeholder)",
            arch=PAPER_ARCH,
            dataset="imagenet",
            pretrain=None,  # OpenAI CLIP weights
            threads=None,  # a GPU machine: torch's default
            run_threads=None,
            search="released",
            n_runs=71,  # model_1..model_71; model_0 is the LP init
            # The paper's own ranges (Soups App. J.2.1), for the record and for `random_search`.
            space={
                "log10_lr": (-6.0, -4.0),
                "epochs": (4, 16),
                "randaug_m": (0, 30),  # timm U{0..20} saturates at 10 = torchvision's 30
            },
            run_overrides={"batch_size": 512},
        ),
    }
)


# Integer fields a profile spec may override: `paper:n_runs=3,mms_budget=8` is the paper profile
# on model_0..model_3 with 8 evaluations per MMS candidate (a first look before the full run).
OVERRIDABLE = (
    "n_runs",
    "mms_budget",
    "heldout_per_class",
    "jobs",
    "threads",
    "run_threads",
    "search_seed",
    "pretrain_seed",
    "objectnet_border",
    "bf16",
    "heldout_images",
)
_MAY_BE_ZERO = ("search_seed", "pretrain_seed", "objectnet_border", "bf16")


def get_profile(spec: str) -> Profile:
    """The profile `spec` names: `NAME` or `NAME:FIELD=INT,...` with fields from OVERRIDABLE.

    An unknown name, field or a value that is not a positive integer is one MMSoupError sentence.
    """
    name, _, overrides = spec.partition(":")
    try:
        prof = PROFILES[name]
    except KeyError:
        raise MMSoupError(f"Unknown profile {name!r}; pick one of {', '.join(PROFILES)}.") from None
    changes: dict[str, int] = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if key not in OVERRIDABLE:
            raise MMSoupError(
                f"Profile {spec!r}: {key!r} cannot be overridden; use one of {', '.join(OVERRIDABLE)}."
            )
        # ASCII digits only: str.isdigit accepts '²' (int() refuses it) and '١' (int() reads 1)
        if not (value.isascii() and value.isdigit()) or int(value) < (
            0 if key in _MAY_BE_ZERO else 1
        ):
            raise MMSoupError(f"Profile {spec!r}: {key} must be a positive integer, not {value!r}.")
        if key == "bf16" and int(value) > 1:
            raise MMSoupError(f"Profile {spec!r}: bf16 is 0 (fp32) or 1 (bf16), not {value!r}.")
        changes[key] = int(value)
    held, data = changes.get("heldout_images", HELDOUT_IMAGES), dataset(prof.dataset)
    most = data.max_heldout_images
    if held != HELDOUT_IMAGES and (most is None or not held <= most):
        where = f"1000..{most}" if most is not None else f"not for {data.title}"
        raise MMSoupError(
            f"Profile {spec!r}: heldout_images={held} is out of range ({where}; "
            "paper profiles use heldout_per_class)."
        )
    if name == "paper" and changes.get("n_runs", 0) > prof.n_runs:
        raise MMSoupError(
            f"Profile {spec!r}: Soups released model_0..model_{prof.n_runs}, no more."
        )
    return replace(prof, name=spec, **changes) if changes else prof


def dataset_of(spec: str) -> Dataset:
    """The registered dataset (mmsoup.datasets) that the profile `spec` runs on."""
    return dataset(get_profile(spec).dataset)
