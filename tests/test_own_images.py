"""Soup your own checkpoints on images: an ImageFolder held-out set with the model's own transform
(timm and a Hugging Face ResNet with its image processor), and `hf:ORG/NAME` from a local Hugging Face
cache laid out as huggingface_hub lays it out. Small random models, no network."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from test_own import _config

from mmsoup.checkpoints import load_state_dict, save_state_dict
from mmsoup.own import soup_from_config

CLASSES = ("cat", "dog", "fox")  # ImageFolder: one folder per class, labels in sorted order


def _image_folder(root: Path, per_class: int = 3) -> list[tuple[Path, int]]:
    """A tiny ImageFolder of PNGs (40x40 RGB, a class colour plus noise); (path, label) pairs."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    items = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            colour = torch.tensor([80.0, 80.0, 80.0])
            colour[label] = 200.0
            pixels = colour + 40 * torch.randn(40, 40, 3, generator=g)
            array = pixels.clamp(0, 255).to(torch.uint8).numpy()
            path = root / name / f"img{j}.png"
            Image.fromarray(array, mode="RGB").save(path)
            items.append((path, label))
    return items


def _accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    """Top-1 accuracy as the fraction of hits (the sidecar's number, computed here on its own)."""
    return int((logits.argmax(-1) == torch.tensor(labels)).sum()) / len(labels)


def test_an_image_folder_held_out_set_scores_as_the_model_applied_to_its_images(tmp_path, capsys):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    items = _image_folder(tmp_path / "held_out")
    kwargs = {"num_classes": 3, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48}
    torch.manual_seed(0)
    init = timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict()
    pool = []
    for i in range(3):  # strongly perturbed, so the ingredients disagree on these images
        g = torch.Generator().manual_seed(i)
        state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in init.items()}
        save_state_dict(state, tmp_path / f"ft{i}.safetensors")
        pool.append(state)
    config = _config(
        tmp_path,
        model="timm:vit_tiny_patch16_224",
        model_kwargs=kwargs,
        image_size=32,
        held_out="held_out",
        recipes=["uniform", "greedy"],
        batch_size=4,  # several batches
    )
    res = soup_from_config(config, progress=False)

    # independently: the model applied to the same PNGs with timm's evaluation transform
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    transform = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=model))
    [line] = [x for x in capsys.readouterr().err.splitlines() if "preprocess:" in x]
    resize = next(t for t in transform.transforms if type(t).__name__ == "Resize")
    assert line.startswith(
        f"mmsoup: preprocess: resize shorter side to {resize.size} ({resize.interpolation.value}), "
        "centre crop 32, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5); the model's own (timm's"
    ), line
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in items])
    labels = [label for _, label in items]

    def acc(state) -> float:
        model.load_state_dict(state)
        with torch.no_grad():
            return _accuracy(model(images), labels)

    expected = [acc(state) for state in pool]
    assert res["ingredient_val_accs"] == expected
    assert len(set(expected)) > 1  # the check can tell the ingredients apart
    out = tmp_path / "soup"
    for recipe in ("uniform", "greedy"):
        side = json.loads((out / f"{recipe}.json").read_text())
        assert side["ingredient_val_accs"] == expected
        assert side["val_acc"] == acc(load_state_dict(out / f"{recipe}.safetensors"))
    card = (out / "MODEL_CARD.md").read_text()
    for i, a in enumerate(expected):
        assert f"| {i} | ft{i}.safetensors | {a:.4f} |" in card


def test_the_config_sets_the_preprocessing_of_image_folders(tmp_path, capsys):
    import timm
    from PIL import Image
    from torchvision import transforms as T

    items = _image_folder(tmp_path / "held_out", per_class=4)
    kwargs = {"num_classes": 3, "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48}
    torch.manual_seed(0)
    init = timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict()
    pool = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        pool.append({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in init.items()})
        save_state_dict(pool[-1], tmp_path / f"ft{i}.safetensors")
    given = {"resize": 40, "crop": 32, "interpolation": "bilinear", "mean": [0.2, 0.3, 0.4]}
    given["std"] = [0.5, 0.6, 0.7]
    config = _config(
        tmp_path, model="timm:vit_tiny_patch16_224", model_kwargs=kwargs, image_size=32,
        held_out="held_out", recipes=["uniform"], preprocess=given,
    )  # fmt: skip
    res = soup_from_config(config, progress=False)
    [line] = [x for x in capsys.readouterr().err.splitlines() if "preprocess:" in x]
    assert line == (
        "mmsoup: preprocess: resize shorter side to 40 (bilinear), centre crop 32, "
        "mean (0.2, 0.3, 0.4), std (0.5, 0.6, 0.7); the config's preprocess:"
    )
    transform = T.Compose(
        [T.Resize(40, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32),
         T.ToTensor(), T.Normalize(given["mean"], given["std"])]
    )  # fmt: skip
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in items])
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()

    def acc(state) -> float:
        model.load_state_dict(state)
        with torch.no_grad():
            return _accuracy(model(images), [label for _, label in items])

    assert res["ingredient_val_accs"] == [acc(s) for s in pool]
    card = (tmp_path / "soup" / "MODEL_CARD.md").read_text()
    assert "Preprocessing of image folders: resize shorter side to 40 (bilinear)" in card


def _resnet_config(tf):
    """A tiny transformers ResNet image classifier (BatchNorm, ~6k parameters)."""
    return tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3,
        architectures=["ResNetForImageClassification"],
    )  # fmt: skip


def _vit_config(tf):
    """A tiny transformers ViT image classifier (transformers >= 5 saves it under other key names
    than its modules': `attention.attention.key` for `attention.k_proj`)."""
    return tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3, architectures=["ViTForImageClassification"],
    )  # fmt: skip


def _hf_runs(tf, root: Path, n: int = 3, vit: bool = False) -> list[Path]:
    """n differently perturbed copies of one tiny ResNet (or ViT) classifier, each a
    save_pretrained folder with an image processor's preprocessor_config.json (32x32, normalised)."""
    torch.manual_seed(0)
    if vit:
        base = tf.ViTForImageClassification(_vit_config(tf))
    else:
        base = tf.ResNetForImageClassification(_resnet_config(tf))
    init = {k: v.clone() for k, v in base.state_dict().items()}
    processor = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    folders = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        base.load_state_dict(
            {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in init.items()}
        )
        base.save_pretrained(root / f"run{i}")
        processor.save_pretrained(root / f"run{i}")
        folders.append(root / f"run{i}")
    return folders


def test_a_hugging_face_image_classifier_pool_with_its_image_processor(tmp_path, capsys):
    tf = pytest.importorskip("transformers")
    from PIL import Image

    items = _image_folder(tmp_path / "held_out")
    runs = _hf_runs(tf, tmp_path)
    assert (runs[0] / "preprocessor_config.json").is_file()
    config = _config(
        tmp_path,
        model="./run0",  # a model folder, relative to the config: config.json + image processor
        model_kwargs={},
        ingredients=["run*"],
        held_out="held_out",
        recipes=["uniform", "greedy", "mms"],
        partition="blocks:3",
        bn_recalibration="final",
    )
    res = soup_from_config(config, progress=False)
    [line] = [x for x in capsys.readouterr().err.splitlines() if "preprocess:" in x]
    assert line.startswith("mmsoup: preprocess: resize to 32x32 (bilinear), no crop, mean (0.5")
    assert line.endswith("the model's own (its image processor, preprocessor_config.json)")
    assert list(res["partition"]) == [
        "stem..resnet.encoder.stages.0", "resnet.encoder.stages.1", "classifier.1"
    ]  # fmt: skip
    assert res["uniform"].info["bn_recalibration"]["mode"] == "final"

    # independently: the transformers model on the processor's pixel values of the same PNGs
    processor = tf.AutoImageProcessor.from_pretrained(runs[0])
    pixels = processor(
        images=[Image.open(p).convert("RGB") for p, _ in items], return_tensors="pt"
    )["pixel_values"]
    labels = [label for _, label in items]
    model = tf.ResNetForImageClassification(_resnet_config(tf)).eval()

    def acc(state) -> float:
        model.load_state_dict(state)  # strict: the fused model loads into the architecture
        with torch.no_grad():
            return _accuracy(model(pixel_values=pixels).logits, labels)

    accs = res["ingredient_val_accs"]
    assert accs == [acc(load_state_dict(run)) for run in runs]
    assert all(a in {k / len(items) for k in range(len(items) + 1)} for a in accs)
    out = tmp_path / "soup"
    for recipe in ("uniform", "greedy", "mms"):
        soup = load_state_dict(out / recipe)  # a folder: weights, config.json, the processor's
        assert list(soup) == list(model.state_dict())
        score = acc(soup)
        assert 0.0 <= score <= 1.0
        if recipe != "mms":  # MMS's own score comes from its mixed evaluations (prefix reuse)
            assert score == res[recipe].val_acc
        # transformers' own loading of the soup folder: the same weights, the same processor
        loaded = tf.AutoModelForImageClassification.from_pretrained(out / recipe).eval()
        assert type(loaded).__name__ == "ResNetForImageClassification"
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in soup.items())
        again = tf.AutoImageProcessor.from_pretrained(out / recipe)
        assert again.to_dict() == processor.to_dict()
        assert json.loads((out / f"{recipe}.json").read_text())["val_acc"] == res[recipe].val_acc
    assert res["greedy"].val_acc >= max(accs) and res["mms"].val_acc >= max(accs)
    card = (out / "MODEL_CARD.md").read_text()
    for i, a in enumerate(accs):
        assert f"| {i} | run{i} | {a:.4f} |" in card
    assert "transformers.ResNetForImageClassification.from_pretrained(" in card


def test_a_hugging_face_vit_saved_under_transformers_names_soups_and_reloads(tmp_path):
    tf = pytest.importorskip("transformers")
    from PIL import Image

    items = _image_folder(tmp_path / "held_out")
    runs = _hf_runs(tf, tmp_path, vit=True)
    module_keys = list(tf.ViTForImageClassification(_vit_config(tf)).state_dict())
    file_keys = list(load_state_dict(runs[0]))
    renamed = set(file_keys) - set(module_keys)
    if not renamed:
        pytest.skip("this transformers saves ViT under its modules' names")
    config = _config(
        tmp_path,
        model="./run0",
        model_kwargs={},
        ingredients=["run*"],
        held_out="held_out",
        recipes=["uniform", "greedy", "mms"],
        partition="blocks:4+live",
    )
    res = soup_from_config(config, progress=False)
    assert len(res["partition"]) == 4  # stem, 2 layers, head: the model's own names
    processor = tf.AutoImageProcessor.from_pretrained(runs[0])
    pixels = processor(
        images=[Image.open(p).convert("RGB") for p, _ in items], return_tensors="pt"
    )["pixel_values"]
    labels = [label for _, label in items]

    def reloaded_acc(folder: Path) -> float:  # transformers' own loading, its own renaming
        model = tf.ViTForImageClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            return _accuracy(model(pixel_values=pixels).logits, labels)

    assert res["ingredient_val_accs"] == [reloaded_acc(run) for run in runs]
    for recipe in ("uniform", "greedy"):
        soup = load_state_dict(tmp_path / "soup" / recipe)
        assert set(soup) == set(file_keys)  # written under the checkpoints' names
        assert reloaded_acc(tmp_path / "soup" / recipe) == res[recipe].val_acc
    mean = sum(load_state_dict(run)["classifier.weight"] for run in runs) / 3
    uniform = load_state_dict(tmp_path / "soup" / "uniform")
    assert torch.allclose(uniform["classifier.weight"], mean, atol=1e-6)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _cache_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> tuple[Path, str]:
    """A model repo in a Hugging Face cache as huggingface_hub writes it: blobs named by their
    etag (git sha1, sha256 for LFS files), refs/main holding the commit hash, and the snapshot's
    files as relative symlinks to the blobs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(b"".join(files.values())).hexdigest()  # any 40-hex commit id
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        lfs = name.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / etag, snapshot))
    return snapshot, commit


def test_hf_names_resolve_to_a_snapshot_of_the_local_cache_offline(tmp_path, monkeypatch):
    tf = pytest.importorskip("transformers")
    import huggingface_hub
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    from mmsoup.factories import _hub_folder, create_model

    runs = _hf_runs(tf, tmp_path, n=2)
    files = {
        name: (runs[0] / name).read_bytes()
        for name in ("config.json", "preprocessor_config.json", "model.safetensors")
    }
    cache = tmp_path / "hf" / "hub"
    snapshot, commit = _cache_repo(cache, "tiny-org/tiny-resnet", files)

    # huggingface_hub's own reading of the cache: the layout is valid
    found = try_to_load_from_cache("tiny-org/tiny-resnet", "config.json", cache_dir=cache)
    assert found == str(snapshot / "config.json")
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "tiny-org/tiny-resnet" and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == commit and revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == set(files) and revision.nb_files == 3

    # the factory, offline: the environment a user sets, and the constants huggingface_hub
    # read from it when it was imported (earlier in this test session)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hugging Face cache lookup tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert _hub_folder("tiny-org/tiny-resnet").resolve() == snapshot.resolve()
    made = create_model("hf:tiny-org/tiny-resnet")
    assert made.source == "transformers" and made.transform is not None
    assert type(made.module).__name__ == "ResNetForImageClassification"
    assert made.module.config.hidden_sizes == [8, 16] and made.module.config.num_labels == 3

    # and a soup of the cached weights with another checkpoint, the model named hf:ORG/NAME
    save_state_dict(load_state_dict(runs[1]), tmp_path / "other.safetensors")
    g = torch.Generator().manual_seed(0)
    torch.save(
        {"images": torch.randn(6, 3, 32, 32, generator=g), "labels": torch.arange(6) % 3},
        tmp_path / "held_out.pt",
    )
    config = _config(
        tmp_path,
        model="hf:tiny-org/tiny-resnet",
        model_kwargs={},
        ingredients=[str(snapshot / "model.safetensors"), "other.safetensors"],
        recipes=["uniform"],
    )
    res = soup_from_config(config, progress=False)
    soup = load_state_dict(tmp_path / "soup" / "uniform")  # with the snapshot's config.json
    assert (tmp_path / "soup" / "uniform" / "config.json").is_file()
    cached = load_state_dict(snapshot / "model.safetensors")
    other = load_state_dict(runs[1])
    key = "classifier.1.weight"
    assert torch.allclose(soup[key], (cached[key] + other[key]) / 2, atol=1e-6)
    assert "hf:tiny-org/tiny-resnet" in (tmp_path / "soup" / "MODEL_CARD.md").read_text()
    assert 0.0 <= res["uniform"].val_acc <= 1.0
