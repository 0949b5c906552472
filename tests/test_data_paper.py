"""The paper data layer on tiny stand-ins in the published layouts (Soups §3's sets), CPU only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from paper_standins import WNIDS, images, make_data_root
from PIL import Image

from mmsoup.checkpoints import load_state_dict
from mmsoup.data import cache as tc
from mmsoup.data.imagenet import (
    FolderDataset,
    held_out_mask,
    imagenet_splits,
    load_dataset,
)
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import ClassGroups, ClassSubset, Evaluator
from mmsoup.models import PAPER_ARCH, create_classifier


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with every paper dataset in its published layout (a few images per class)."""
    return make_data_root(tmp_path_factory.mktemp("data"))


def test_imagenet_labels_follow_sorted_wnids(data_root: Path) -> None:
    val = load_dataset("ImageNet", data_root)
    assert val.labels.tolist() == [0, 0, 5, 5, 999, 999]  # class index = position in sorted wnids
    assert [Path(p).parent.name for p in val.paths] == [WNIDS[i] for i in val.labels]
    assert val.projection is None and len(val.classes) == 1000
    assert load_dataset("ImageNetSketch", data_root).labels.tolist() == [3, 3, 7, 7]


def test_imagenet_v2_labels_are_the_folder_indices(data_root: Path) -> None:
    v2 = load_dataset("ImageNetV2", data_root)
    assert sorted(v2.labels.tolist()) == [0, 0, 2, 2, 10, 10]
    assert all(int(Path(p).parent.name) == y for p, y in zip(v2.paths, v2.labels))


@pytest.mark.parametrize(("name", "indices"), [("ImageNetR", [3, 7, 100]), ("ImageNetA", [6, 11])])
def test_200_class_restriction_comes_from_the_folders(data_root: Path, name: str, indices) -> None:
    ds = load_dataset(name, data_root)
    assert isinstance(ds.projection, ClassSubset)
    logits = torch.arange(1000.0).repeat(2, 1)
    assert ds.projection(logits)[0].tolist() == indices  # the columns of the folders present
    assert ds.classes == tuple(WNIDS[i] for i in indices)
    assert [indices[y] for y in ds.labels] == [WNIDS.index(Path(p).parent.name) for p in ds.paths]


def test_unknown_folders_are_refused(tmp_path: Path) -> None:
    images(tmp_path / "imagenet-r" / "not_a_wnid", 1)
    with pytest.raises(MMSoupError, match="not ImageNet-1k wnids"):
        load_dataset("ImageNetR", tmp_path)
    with pytest.raises(MMSoupError, match="data verify"):
        load_dataset("ImageNetA", tmp_path)  # no folder at all


def test_objectnet_mapping_max_projection_and_unmapped_drop(data_root: Path) -> None:
    ds = load_dataset("ObjectNet", data_root)
    assert ds.classes == ("alarm_clock", "banana") and ds.labels.tolist() == [0, 0, 1, 1]
    assert not any("squeegee" in p for p in ds.paths)  # images of unmapped classes are dropped
    assert isinstance(ds.projection, ClassGroups) and ds.border == 0  # uncropped, as published
    assert load_dataset("ObjectNet", data_root, objectnet_border=2).border == 2  # the opt-in crop
    analog, digital, banana = (WNIDS.index(w) for w in ("n02708093", "n03196217", "n07753592"))
    logits = torch.zeros(1, 1000)
    logits[0, digital], logits[0, analog], logits[0, banana] = 5.0, 1.0, 3.0
    assert ds.projection(logits).tolist() == [[5.0, 3.0]]  # class score = max over its mapping


def test_objectnet_images_are_open_clips_preprocessing_of_the_uncropped_files(data_root) -> None:
    """The published ObjectNet numbers are of uncropped images: so are mmsoup's by default."""
    ds = load_dataset("ObjectNet", data_root)
    transform = open_clip.image_transform(224, is_train=False)
    for i, path in enumerate(ds.paths):
        with Image.open(path) as im:
            reference = transform(im)
        ours = tc.normalizer()(tc.decode(ds, i)[None])[0]
        assert torch.equal(ours, reference), path  # bit for bit
    cropped = load_dataset("ObjectNet", data_root, objectnet_border=2)
    assert not torch.equal(tc.decode(cropped, 0), tc.decode(ds, 0))


def test_objectnet_border_is_cropped_before_resizing(tmp_path: Path) -> None:
    framed = np.full((228, 228, 3), 128, dtype=np.uint8)
    framed[:2], framed[-2:], framed[:, :2], framed[:, -2:] = (
        (255, 0, 0),
        (255, 0, 0),
        (255, 0, 0),
        (255, 0, 0),
    )
    Image.fromarray(framed).save(tmp_path / "framed.png")
    ds = FolderDataset(
        "ObjectNet", (str(tmp_path / "framed.png"),), np.zeros(1, np.int64), ("x",), border=2
    )
    assert tc.decode(ds, 0).unique().tolist() == [128]  # no red left after the 2 px crop
    unframed = FolderDataset("x", ds.paths, ds.labels, ds.classes)
    assert 255 in tc.decode(unframed, 0)


def test_held_out_split_is_seeded_per_class_and_disjoint(data_root: Path) -> None:
    held, tune = imagenet_splits(data_root, per_class=2, seed=0)
    again, _ = imagenet_splits(data_root, per_class=2, seed=0)
    assert held.paths == again.paths and held.name == "ImageNet2p"
    assert np.bincount(held.labels).tolist() == [2, 2, 2]
    assert set(held.paths).isdisjoint(tune.paths) and len(held) + len(tune) == 15
    train = load_dataset("ImageNetTrain", data_root)
    assert set(held.paths) | set(tune.paths) == set(train.paths)
    masks = {held_out_mask(train, 2, seed).tobytes() for seed in range(5)}
    assert len(masks) > 1  # the seed changes the draw
    with pytest.raises(MMSoupError, match="lower per_class"):
        held_out_mask(train, per_class=5)


def test_soups_mask_file_replaces_the_seeded_draw(tmp_path: Path, data_root: Path) -> None:
    train = load_dataset("ImageNetTrain", data_root)
    mask = np.zeros(len(train))  # Soups' file: 1 = held out, in ImageFolder order of train
    mask[[0, 6, 14]] = 1
    mask_file = tmp_path / "imagenet_98_idxs.npy"
    np.save(mask_file, mask)
    held, tune = imagenet_splits(data_root, mask_file=mask_file, train=train)
    assert held.paths == tuple(train.paths[i] for i in (0, 6, 14)) and len(tune) == 12
    np.save(mask_file, mask[:-1])
    with pytest.raises(MMSoupError, match="15 images"):
        imagenet_splits(data_root, mask_file=mask_file, train=train)


def test_cache_round_trip_is_uint8_memory_mapped_and_exact(tmp_path: Path, data_root: Path) -> None:
    ds = load_dataset("ObjectNet", data_root)
    cached = tc.build_cache(ds, tmp_path, workers=2, batch_size=3, progress=False)
    assert isinstance(cached.images, np.memmap) and cached.images.dtype == np.uint8
    assert cached.images.shape == (4, 3, 224, 224) and cached.labels.tolist() == ds.labels.tolist()
    for i in range(len(ds)):
        assert torch.equal(torch.from_numpy(cached.images[i]), tc.decode(ds, i))
    # uint8 cache + on-device normalizer == open_clip's own validation preprocess, bit for bit
    reference = open_clip.image_transform(224, is_train=False)
    with Image.open(ds.paths[1]) as im:
        expected = reference(im)  # uncropped, as the published numbers
    images, _ = cached.tensors()
    assert torch.equal(tc.normalizer()(images[1:2])[0], expected)
    again = tc.build_cache(ds, tmp_path, workers=0, progress=False)  # found, not decoded again
    assert again.path == cached.path and len(list(tmp_path.iterdir())) == 1


def test_cache_is_all_or_nothing(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    ds = FolderDataset("broken", (str(tmp_path / "broken.jpg"),), np.zeros(1, np.int64), ("x",))
    with pytest.raises(MMSoupError, match="Cannot decode"):
        tc.build_cache(ds, tmp_path / "cache", workers=1, progress=False)  # raised in a worker
    assert list((tmp_path / "cache").iterdir()) == []


def test_released_checkpoint_layout_evaluates_through_a_projection(
    tmp_path: Path, data_root: Path
) -> None:
    model = create_classifier(PAPER_ARCH, 1000, seed=0).eval()
    torch.save(model.state_dict(), tmp_path / "model_0.pt")  # the layout of the 72 released files
    state = load_state_dict(tmp_path / "model_0.pt")
    assert {k.split(".")[0] for k in state} == {"model", "classification_head"}
    assert not any(k.startswith("model.transformer.") for k in state)  # text tower deleted
    with torch.no_grad():
        model.classification_head.weight.zero_()
    model.load_state_dict(state)
    ds = load_dataset("ImageNetA", data_root)  # 2 images, 2-class subset
    cached = tc.build_cache(ds, tmp_path / "cache", workers=0, progress=False)
    images, labels = cached.tensors()
    evaluator = Evaluator(
        model,
        images,
        labels,
        device="cpu",
        batch_size=2,
        preprocess=tc.normalizer(),
        projection=cached.projection,
    )
    logits = evaluator.logits()
    reference = open_clip.image_transform(224, is_train=False)
    with torch.inference_mode():
        direct = model(torch.stack([reference(Image.open(p)) for p in ds.paths]))[:, [6, 11]]
    assert logits.shape == (2, 2) and torch.allclose(logits, direct, atol=1e-4)
    assert evaluator.accuracy() == float((direct.argmax(1) == labels).float().mean())


def test_the_soup_stage_loads_only_the_held_out_set(tmp_path: Path, monkeypatch) -> None:
    """Sets are loaded when first used: building soups needs (and moves to the device) only the
    held-out split, so a missing shift fails only when the evaluation stage reaches it."""
    import shutil

    from mmsoup.context import context
    from mmsoup.data.manifest import artifact_path

    root = make_data_root(tmp_path / "data")
    shutil.rmtree(artifact_path("objectnet-1.0", root))
    monkeypatch.setenv("MMSOUP_DATA", str(root))
    monkeypatch.setenv("MMSOUP_CACHE", str(tmp_path / "cache"))
    ctx = context("paper:n_runs=2,heldout_per_class=2")
    assert ctx.heldout.n == 6 and ctx.evaluators.loaded == ["heldout"]
    assert ctx.heldout.amp is False  # fp32, as the references evaluate
    assert context("paper:n_runs=2,heldout_per_class=2,bf16=1").heldout.amp is True  # opt-in
    assert list(ctx.evaluators) == ["heldout", "ImageNet", *ctx.test_sets[1:]]
    assert ctx.evaluators["ImageNetV2"].n == 6
    ctx.evaluators.release("ImageNetV2")
    assert ctx.evaluators.loaded == ["heldout"]
    with pytest.raises(MMSoupError, match="objectnet"):
        ctx.evaluators["ObjectNet"]
