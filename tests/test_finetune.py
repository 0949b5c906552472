"""One fine-tuning run (Soups App. J.2.1): schedule, targets, determinism, the sidecar."""

from __future__ import annotations

import math

import pytest
import torch

from mmsoup.checkpoints import load_state_dict, read_sidecar, save_state_dict
from mmsoup.determinism import pinned
from mmsoup.errors import MMSoupError
from mmsoup.finetune import (
    FinetuneConfig,
    is_done,
    load_classifier,
    lr_factor,
    run_finetune,
    soft_targets,
    train,
)
from mmsoup.models import create_classifier

# A few steps on a few hundred images: every random draw of a run (order, crop, RandAugment, mixup).
TINY = dict(epochs=1, train_images=192, augment="randaugment", randaug_m=12, randaug_n=2)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A random-weight 10-class classifier standing in for the LP init."""
    path = tmp_path_factory.mktemp("init") / "model_0.safetensors"
    save_state_dict(create_classifier(num_classes=10, seed=0).state_dict(), path, {"kind": "test"})
    return path


@pytest.fixture(scope="module")
def train_split():
    from mmsoup.data import digits

    images, labels = digits.load("train")
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:64]
    return torch.as_tensor(images)[idx], torch.as_tensor(labels)[idx]


def test_lr_warms_up_linearly_then_decays_by_cosine():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)  # cosine starts at the peak
    assert f[55] == pytest.approx(0.5)  # half-way through the decay
    assert f[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(a > b for a, b in zip(f[10:], f[11:]))


def test_label_smoothing_spreads_the_target_mass():
    y = torch.tensor([3, 7])
    hard, smooth = soft_targets(y, 10, 0.0), soft_targets(y, 10, 0.2)
    assert torch.equal(hard, torch.nn.functional.one_hot(y, 10).float())
    assert smooth[0, 3] == pytest.approx(0.82) and smooth[0, 0] == pytest.approx(0.02)
    assert torch.allclose(smooth.sum(1), torch.ones(2))


def _first_loss(model_state, images, labels, **hp) -> float:
    """Loss of the first training step of a run with hyper-parameters `hp`."""
    model = create_classifier(num_classes=10, seed=None)
    model.load_state_dict(model_state)
    losses = []
    config = FinetuneConfig(epochs=1, batch_size=64, lr=1e-9, **hp)
    with pinned(1):  # one thread: 2 threads on 2 shared cores are ~10x slower, not faster
        train(model, images, labels, config, on_step=lambda step, total, loss: losses.append(loss))
    return losses[0]


def test_label_smoothing_and_mixup_change_the_training_loss(init, train_split):
    state = load_state_dict(init)
    base = _first_loss(state, *train_split)
    assert _first_loss(state, *train_split) == base  # same seed, same batch, same loss
    assert _first_loss(state, *train_split, label_smoothing=0.2) != pytest.approx(base, rel=1e-4)
    assert _first_loss(state, *train_split, mixup_alpha=0.8) != pytest.approx(base, rel=1e-4)


def test_a_run_is_deterministic_and_its_sidecar_holds_the_record(init, tmp_path):
    config = FinetuneConfig(lr=2e-3, mixup_alpha=0.5, label_smoothing=0.1, seed=3, **TINY)
    a = run_finetune(config, init, tmp_path / "a.safetensors", threads=1, name="model_1")
    run_finetune(config, init, tmp_path / "b.safetensors", threads=1)
    sa, sb = (
        load_state_dict(tmp_path / "a.safetensors"),
        load_state_dict(tmp_path / "b.safetensors"),
    )
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit-identical

    other = FinetuneConfig(**{**config.to_json(), "seed": 4})
    run_finetune(other, init, tmp_path / "c.safetensors", threads=1)
    sc = load_state_dict(tmp_path / "c.safetensors")
    assert not torch.equal(sa["classification_head.weight"], sc["classification_head.weight"])
    assert not torch.equal(
        sa["classification_head.weight"], load_state_dict(init)["classification_head.weight"]
    )

    side = read_sidecar(tmp_path / "a.safetensors")
    assert side["name"] == "model_1" and side["kind"] == "finetune"
    assert FinetuneConfig.from_json(side["config"]) == config and side["seed"] == 3
    assert side["val_acc"] == a["val_acc"] and 0.0 <= side["val_acc"] <= 1.0
    assert "wall_seconds" not in side and side["train_images"] == 192 and "versions" in side
    assert read_sidecar(tmp_path / "a.safetensors", timings=True)["wall_seconds"] > 0
    assert is_done(tmp_path / "a.safetensors")


def test_config_rejects_unknown_keys_and_augmentations():
    with pytest.raises(MMSoupError, match="'learning_rate'"):
        FinetuneConfig.from_json({"learning_rate": 1e-3})
    with pytest.raises(MMSoupError, match="minimal, randaugment"):
        FinetuneConfig(augment="autoaugment")


def test_an_init_of_another_shape_is_one_clear_error(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_state_dict(create_classifier(num_classes=62, seed=0).state_dict(), path)
    with pytest.raises(MMSoupError, match="10-class"):
        load_classifier(path)


def test_pretraining_is_cached_and_the_lp_init_scores_its_sidecar(tmp_path):
    from mmsoup.data import digits
    from mmsoup.finetune import accuracy
    from mmsoup.pretrain import PretrainConfig, linear_probe, pretrain

    for root in (tmp_path, tmp_path / "other"):  # share the built benchmark, not the backbone
        root.mkdir(exist_ok=True)
        (root / "digits").symlink_to(digits.cache_folder(), target_is_directory=True)
    digits.load("train")  # built (once per machine) outside the cache under test
    config = PretrainConfig(images=256, eval_images=128)  # two steps
    steps = []
    with pinned(1):
        path = pretrain(config, tmp_path, on_step=lambda *a: steps.append(a))
        again = pretrain(config, tmp_path, on_step=lambda *a: steps.append(a))
        redo = pretrain(config, tmp_path / "other", on_step=lambda *a: None)
    assert again == path and len(steps) == 2  # the second call reuses the cache
    assert path.parent == tmp_path / "backbone" and read_sidecar(path)["kind"] == "backbone"
    a, b = load_state_dict(path), load_state_dict(redo)
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: a rebuild is bit-identical

    with pinned(1):
        lp = linear_probe(path, tmp_path)
    side = read_sidecar(lp)
    assert side["kind"] == "lp_init" and str(side["C"]) in side["val_acc_by_C"]
    model = load_classifier(lp)  # trunk = the backbone, head = the probe (LP-FT)
    assert torch.equal(load_state_dict(lp)["model.visual.proj"], a["model.visual.proj"])
    held = digits.load("heldout", cache_dir=tmp_path / "digits")
    acc = accuracy(model, digits.to_tensor(held[0]), torch.as_tensor(held[1]))
    assert acc == pytest.approx(side["val_acc"], abs=1e-9) and acc > 0.2  # far above chance
