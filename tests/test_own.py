"""Soup your own checkpoints: real small models (random init), their own checkpoint formats, one config."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torchvision
import yaml

from mmsoup import cli
from mmsoup.checkpoints import load_state_dict, save_state_dict
from mmsoup.own import bn_statistics, soup_from_config
from mmsoup.partition import describe, partition
from mmsoup.soups import greedy_soup, manifold_mixing_soup, uniform_soup

ROOT = Path(__file__).resolve().parents[1]


def _resnet_pool(folder: Path, n: int = 3) -> list[dict[str, torch.Tensor]]:
    """n 'fine-tuned' ResNet-18 state dicts: one init, each nudged, BN statistics and counters differing."""
    torch.manual_seed(0)
    init = torchvision.models.resnet18(num_classes=10).state_dict()
    pool = []
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        state = {}
        for k, v in init.items():
            if v.is_floating_point():
                noise = 0.05 * torch.randn(v.shape, generator=g)
                state[k] = (v + noise).abs() if k.endswith("running_var") else v + noise
            else:
                state[k] = v + 100 * (i + 1)  # num_batches_tracked: one count per ingredient
        save_state_dict(state, folder / f"ft{i}.safetensors")
        pool.append(state)
    g = torch.Generator().manual_seed(9)
    data = {"images": torch.randn(8, 3, 32, 32, generator=g), "labels": torch.arange(8) % 10}
    torch.save(data, folder / "held_out.pt")
    return pool


def _config(folder: Path, **keys) -> Path:
    config = {
        "model": "torchvision:resnet18",
        "model_kwargs": {"num_classes": 10},
        "ingredients": ["ft*.safetensors"],
        "held_out": "held_out.pt",
        "partition": "blocks:3",
        "mms": {"budget": 4, "optimizer": "Cobyla"},
        "batch_size": 8,
        "device": "cpu",
        "out": "soup",
    } | keys
    path = folder / "soup.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_integer_buffers_come_from_the_best_ingredient_and_float_buffers_are_mixed(tmp_path):
    pool = _resnet_pool(tmp_path)
    paths = [tmp_path / f"ft{i}.safetensors" for i in range(3)]
    accs = [0.1, 0.3, 0.2]  # ingredient 1 is the best
    uniform = uniform_soup(paths, buffers_from=1)
    mean_rm = sum(s["bn1.running_mean"] for s in pool) / 3
    assert torch.allclose(uniform["bn1.running_mean"], mean_rm, atol=1e-6)
    assert uniform["bn1.num_batches_tracked"].item() == 200
    assert uniform["bn1.num_batches_tracked"].dtype == torch.int64
    greedy = greedy_soup(paths, lambda s: 0.5, ingredient_val_accs=accs, progress=False)
    assert greedy.ingredients == [1, 2]  # 0.5 beats 0.3 once, then ties: 2 mixed, 0 not
    assert greedy.state_dict["layer1.0.bn1.num_batches_tracked"] == 200  # the best's, not averaged
    comps = partition(pool[0], "blocks:3")
    mms = manifold_mixing_soup(
        paths, lambda s: 0.5, comps, budget=2, ingredient_val_accs=accs, progress=False
    )
    assert mms.state_dict["bn1.num_batches_tracked"] == 200
    assert list(mms.state_dict) == list(pool[0])  # the model's key order, buffers included


def test_blocks_partition_cuts_any_model_into_stem_blocks_head_in_forward_order():
    import timm

    resnet = torchvision.models.resnet18(num_classes=10)
    comps = partition(resnet, "blocks:10")
    assert list(comps) == ["stem"] + [f"layer{s}.{b}" for s in range(1, 5) for b in (0, 1)] + [
        "head"
    ]
    assert comps["stem"] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"
    ]  # fmt: skip
    four = partition(resnet, "blocks:4")
    keys = [k for ks in four.values() for k in ks]
    assert keys == [
        k for k, v in resnet.state_dict().items() if v.is_floating_point()
    ]  # contiguous
    assert list(four)[0] == "stem..layer1.1" and list(four)[-1] == "layer4.1..head"
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5
    )
    live = partition(vit, "blocks:5+live", example_input=torch.randn(1, 3, 32, 32))
    assert list(live) == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    table = describe(live, vit)
    assert table["n_params"].sum() == sum(p.numel() for p in vit.parameters())


def test_resnet_pool_through_the_cli_writes_soups_sidecars_and_the_model_card(tmp_path, capsys):
    pool = _resnet_pool(tmp_path)
    config = _config(tmp_path, recipes=["uniform", "greedy", "mms"])
    assert cli.main(["soup", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "soup"
    for recipe in ("uniform", "greedy", "mms"):
        assert recipe in printed
        soup = load_state_dict(out / f"{recipe}.safetensors")
        assert list(soup) == list(pool[0])
        side = json.loads((out / f"{recipe}.json").read_text())
        accs = side["ingredient_val_accs"]
        best = accs.index(max(accs))
        assert soup["bn1.num_batches_tracked"].item() == 100 * (best + 1)
    card = (out / "MODEL_CARD.md").read_text()
    assert "| 0 | ft0.safetensors |" in card and "ft2.safetensors" in card
    assert "## Manifold mixing soup (MMS Alg. 1)" in card and "Per-component λ*" in card
    assert re.search(r"Candidates: \d+ accepted, \d+ skipped, \d+ rejected; 3 components", card)
    assert "held-out evaluations: 3 for the ingredients' own accuracies" in card
    assert config.read_text().strip() in card  # the config verbatim
    assert "| python | torch |" in card and torch.__version__ in card
    assert not list(out.glob(".*"))  # no temporary file left
    # what a hub's merged model carries: front matter, each ingredient's sha256, a snippet that loads
    assert card.startswith("---\nbase_model: ") and "\nlicense: other" in card
    assert '- "model-soup"' in card and "library_name: torchvision" in card
    from mmsoup.io import sha256_file

    assert sha256_file(tmp_path / "ft0.safetensors") in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    cwd = os.getcwd()
    try:
        os.chdir(out)  # the snippet names the soup beside the card
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    best = max(
        ("uniform", "greedy", "mms"),
        key=lambda r: json.loads((out / f"{r}.json").read_text())["val_acc"],
    )
    loaded = scope["model"].state_dict()
    for key, value in load_state_dict(out / f"{best}.safetensors").items():
        assert torch.equal(loaded[key], value), key


def test_bn_recalibration_recomputes_statistics_and_records_its_cost(tmp_path):
    _resnet_pool(tmp_path, n=2)
    res = soup_from_config(
        _config(tmp_path, recipes=["uniform"], bn_recalibration="final"), progress=False
    )
    soup, info = res["uniform"].state_dict, res["uniform"].info["bn_recalibration"]
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(soup)
    data = torch.load(tmp_path / "held_out.pt")
    model.train()
    with torch.no_grad():  # batch statistics of the held-out set: what update_bn recomputed
        expected = model.conv1(data["images"]).mean(dim=(0, 2, 3))
    assert set(info) >= {"acc_mixed_statistics", "acc_recalibrated", "seconds_final", "kept"}
    better = info["acc_recalibrated"] >= info["acc_mixed_statistics"]
    assert info["kept"] == ("recalibrated" if better else "mixed")
    assert res["uniform"].val_acc == max(info["acc_recalibrated"], info["acc_mixed_statistics"])
    if better:
        assert torch.allclose(soup["bn1.running_mean"], expected, atol=1e-5)
    else:  # recalibration lowered held-out accuracy: the mixed (mean) statistics are kept
        pool = [load_state_dict(tmp_path / f"ft{i}.safetensors") for i in range(2)]
        mean = (pool[0]["bn1.running_mean"] + pool[1]["bn1.running_mean"]) / 2
        assert torch.allclose(soup["bn1.running_mean"], mean, atol=1e-6)
    assert info["seconds_final"] > 0
    best = max(range(2), key=lambda i: (res["ingredient_val_accs"][i], -i))
    assert soup["bn1.num_batches_tracked"].item() == 100 * (best + 1)  # the best's, not recounted
    assert len(bn_statistics(model)) == 2 * 20  # ResNet-18: 20 BatchNorm layers


def test_bn_recalibration_for_each_evaluation_scores_the_recalibrated_model(tmp_path):
    _resnet_pool(tmp_path, n=2)
    config = _config(tmp_path, recipes=["greedy"], bn_recalibration="each", out="each")
    res = soup_from_config(config, progress=False)["greedy"]
    info = res.info["bn_recalibration"]
    assert info["seconds_during_search"] > 0
    assert info["acc_recalibrated"] == res.val_acc  # the soup kept is the model evaluated


def test_learned_soup_of_a_batchnorm_pool_writes_the_complete_model(tmp_path):
    pool = _resnet_pool(tmp_path, n=2)
    config = _config(tmp_path, recipes=["learned"], learned={"epochs": 1}, partition="blocks:2")
    res = soup_from_config(config, progress=False)
    soup = load_state_dict(tmp_path / "soup" / "learned.safetensors")
    assert list(soup) == list(pool[0])  # learned_soup's own state dict: no key added afterwards
    assert all(soup[k].dtype == v.dtype for k, v in pool[0].items())
    accs = res["ingredient_val_accs"]
    best = max(range(2), key=lambda i: (accs[i], -i))
    assert soup["bn1.num_batches_tracked"].item() == 100 * (best + 1)
    torchvision.models.resnet18(num_classes=10).load_state_dict(soup)  # strict


def test_each_soup_records_only_its_own_recalibrations(tmp_path):
    _resnet_pool(tmp_path, n=2)
    config = _config(tmp_path, recipes=["uniform", "greedy"], bn_recalibration="each")
    res = soup_from_config(config, progress=False)
    assert res["ingredient_bn_recalibration"]["recalibrations"] == 2  # one per ingredient
    for recipe in ("uniform", "greedy"):  # 1 evaluation each: the mean, the one candidate
        info = res[recipe].info["bn_recalibration"]
        assert info["recalibrations_during_search"] == res[recipe].n_evals == 1
        assert info["seconds_during_search"] > 0
