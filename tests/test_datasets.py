"""The dataset registry: one object per dataset, the only place that knows a dataset's names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mmsoup import context, finetune
from mmsoup.data import digits, imagenet
from mmsoup.data.manifest import read_manifest
from mmsoup.datasets import DATASETS, dataset
from mmsoup.errors import MMSoupError
from mmsoup.profiles import PROFILES, dataset_of, get_profile

PACKAGE = Path(__file__).resolve().parents[1] / "mmsoup"


def test_an_unknown_dataset_is_one_sentence_listing_the_names():
    with pytest.raises(
        MMSoupError, match=r"^Unknown dataset 'cifar'; pick one of digits, imagenet\.$"
    ):
        dataset("cifar")


def test_every_profile_runs_on_a_registered_dataset():
    for name, prof in PROFILES.items():
        assert dataset_of(name) is DATASETS[prof.dataset]
    assert dataset_of("paper:n_runs=3").name == "imagenet"


def test_the_rows_agree_with_their_loaders():
    d, i = dataset("digits"), dataset("imagenet")
    assert d.shifts == digits.SHIFTS and set(d.sets) <= set(digits.set_names())
    assert d.test_sets == ("test", *digits.SHIFTS) and d.num_classes == finetune.NUM_CLASSES == 10
    assert d.max_heldout_images == finetune.MAX_HELDOUT
    assert i.test_sets == imagenet.TEST_SETS and i.num_classes == len(imagenet.imagenet_wnids())
    for data in DATASETS.values():
        assert len(data.shifts) == 5 and data.id_set not in data.shifts  # Soups §3
        assert set(read_manifest()["profile"]) >= {data.manifest_profile}
        assert callable(data.module().eval_set)


def test_digits_sets_load_as_the_stages_evaluate_them():
    x, y, pre, proj = context.load_set("embedded:heldout_images=2000", "heldout")
    images, labels = digits.load_split("heldout", 2000)
    assert torch.equal(x, digits.to_tensor(images)) and torch.equal(y, torch.as_tensor(labels))
    assert pre is None and proj is None and len(y) == 2000
    assert context.shifts("embedded") == digits.SHIFTS and context.id_set("embedded") == "test"


def test_an_npz_of_raw_images_needs_a_loader_that_converts_them():
    images = digits.load("test")[0][:3]
    assert dataset("digits").to_tensor(images).shape == (3, 3, 28, 28)
    with pytest.raises(MMSoupError, match="ImageNet dataset must hold model-ready"):
        dataset("imagenet").to_tensor(images)


def test_the_held_out_size_is_bounded_by_the_dataset():
    assert get_profile("embedded:heldout_images=3000").heldout_images == 3000
    with pytest.raises(MMSoupError, match=r"out of range \(1000\.\.3000;"):
        get_profile("embedded:heldout_images=3001")
    with pytest.raises(MMSoupError, match=r"out of range \(not for ImageNet;"):
        get_profile("paper:heldout_images=2000")


def test_no_module_outside_the_registry_compares_dataset_names():
    names = "|".join(map(re.escape, DATASETS))
    compares = re.compile(
        rf"\.dataset\s*[!=]=|[!=]=\s*[\"']({names})[\"']|[\"']({names})[\"']\s*[!=]="
    )
    found = [
        f"{p.relative_to(PACKAGE)}:{n}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if compares.search(line)
    ]
    assert not found, found
