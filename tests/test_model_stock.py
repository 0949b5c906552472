"""Model Stock (Jang et al., ECCV 2024): the layer-wise ratio checked by hand, the streamed cosine
against the pairwise definition, and the recipe from the registry in each of its three users."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import yaml

from mmsoup.checkpoints import load_state_dict, save_state_dict
from mmsoup.errors import MMSoupError
from mmsoup.model_stock import model_stock, ratio
from mmsoup.recipes import NAMES, SHOWN, Pool, recipe


def test_two_models_by_hand():
    # w0 = (0, 0), w1 = (1, 0), w2 = (1, 1): cos θ = 1/√2, t = 2c / (1 + c) = 0.828427...
    w0 = {"w": torch.tensor([0.0, 0.0])}
    ws = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]
    state, layers = model_stock(w0, ws)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert layers["w"]["cos"] == pytest.approx(c, abs=1e-12)
    assert layers["w"]["t"] == pytest.approx(0.8284271247, abs=1e-9)
    torch.testing.assert_close(state["w"], torch.tensor([t * 1.0, t * 0.5]))  # t·w_avg + (1-t)·0


def test_orthogonal_or_opposed_updates_keep_the_anchor():
    w0 = {"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([1.0, 1.0])}
    ws = [
        {"a": torch.tensor([3.0, 3.0]), "b": torch.tensor([2.0, 1.0])},  # b: update (1, 0)
        {"a": torch.tensor([2.0, 4.0]), "b": torch.tensor([0.0, 1.1])},  # b: update (-1, 0.1)
    ]
    state, layers = model_stock(w0, ws)
    assert layers["a"]["cos"] == pytest.approx(0.0) and layers["a"]["t"] == 0.0  # 90°: t = 0
    assert layers["b"]["cos"] < 0 and layers["b"]["t"] == 0.0  # opposed: clamped, not negative
    torch.testing.assert_close(state["a"], w0["a"])
    torch.testing.assert_close(state["b"], w0["b"])


def test_streamed_cosine_equals_the_mean_of_pairwise_cosines():
    g = torch.Generator().manual_seed(0)
    w0 = {"x": torch.randn(5, 7, generator=g), "y": torch.randn(11, generator=g)}
    ws = [
        {k: v + 0.3 * torch.randn(v.shape, generator=g) + 0.2 for k, v in w0.items()}
        for _ in range(4)
    ]
    ws[2]["y"] = w0["y"].clone()  # a layer one model left as it was: cos 0 with every other
    state, layers = model_stock(w0, ws)
    n = len(ws)
    for k in w0:
        d = [(w[k].double() - w0[k].double()).flatten() for w in ws]
        cos = [
            0.0 if a.norm() == 0 or b.norm() == 0 else float(a @ b / (a.norm() * b.norm()))
            for a, b in itertools.combinations(d, 2)
        ]
        mean = sum(cos) / len(cos)
        assert layers[k]["cos"] == pytest.approx(mean, abs=1e-12)
        t = n * mean / (1 + (n - 1) * mean)
        assert layers[k]["t"] == pytest.approx(t, abs=1e-12) and ratio(mean, n) == layers[k]["t"]
        avg = sum(w[k].double() for w in ws) / n
        torch.testing.assert_close(state[k], (t * avg + (1 - t) * w0[k].double()).float())


def test_one_fine_tuned_model_is_no_stock():
    w = {"w": torch.ones(2)}
    with pytest.raises(MMSoupError, match="at least two fine-tuned models"):
        model_stock(w, [w])


def _toy_pool(tmp_path, n=3):
    """An MLP's init and n fine-tuned copies on sklearn digits (tests/toy_mlp.py), as files."""
    from sklearn.datasets import load_digits
    from toy_mlp import mlp, train

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    init = mlp()
    save_state_dict(init.state_dict(), tmp_path / "init.safetensors")
    paths = []
    for i in range(n):
        model = mlp()
        save_state_dict(
            train(model, x[:1000], y[:1000], i, 0.05, 30), tmp_path / f"ft{i}.safetensors"
        )
        paths.append(tmp_path / f"ft{i}.safetensors")

    def val_acc(state) -> float:
        model = mlp()
        model.load_state_dict(state)
        with torch.no_grad():
            return float((model(x[1000:]).argmax(1) == y[1000:]).float().mean())

    return tmp_path / "init.safetensors", paths, val_acc


def test_the_recipe_records_each_layers_ratio_and_the_anchors_share(tmp_path):
    init, paths, val_acc = _toy_pool(tmp_path)
    r = recipe("model_stock")
    assert r is recipe("Model Stock") and r.name in NAMES and r in SHOWN  # in the study's tables
    with pytest.raises(MMSoupError, match="needs the weights fine-tuning started from"):
        r.build(Pool(ingredients=paths, heldout=val_acc))  # no anchor
    res = r.build(Pool(ingredients=[init, *paths], heldout=val_acc, anchor=init))
    assert res.ingredients == [0, 1, 2, 3] and res.n_evals == 1
    assert res.val_acc == val_acc(res.state_dict)
    for key, w in res.weights.items():  # per layer: 1 - t for the anchor, t/3 for each model
        t = res.info["layers"][key]["t"]
        assert w == pytest.approx([1 - t, t / 3, t / 3, t / 3]) and 0 < t <= 1
    expected, _ = model_stock(init, paths)
    for k, v in expected.items():
        assert torch.equal(res.state_dict[k], v)


def test_soup_config_uses_init_as_the_anchor(tmp_path):
    from mmsoup.own import load_config, soup_from_config

    init, paths, _ = _toy_pool(tmp_path)
    g = torch.Generator().manual_seed(1)
    torch.save(
        {"inputs": torch.randn(16, 64, generator=g), "labels": torch.arange(16) % 10},
        tmp_path / "held.pt",
    )
    config = {
        "model": "toy_mlp:mlp",
        "trust_code": True,
        "ingredients": ["ft*.safetensors"],
        "held_out": "held.pt",
        "recipes": ["Model Stock", "uniform"],
        "device": "cpu",
        "out": "soup",
    }
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(MMSoupError, match="recipe 'Model Stock' needs .*add init:"):
        load_config(tmp_path / "soup.yaml")
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump(config | {"init": "init.safetensors"}))
    results = soup_from_config(tmp_path / "soup.yaml", progress=False)
    soup = load_state_dict(tmp_path / "soup" / "model_stock.safetensors")
    expected, _ = model_stock(init, sorted(paths))
    for k, v in expected.items():
        assert torch.equal(soup[k], v), k
    assert results["model_stock"].ingredients == [0, 1, 2]  # init is no ingredient here
