"""Soup your own checkpoints, hardened: BatchNorm statistics kept only when they help,
the optional test set, the MMS τ warning, inspect's angle over parameters only, its columns."""

from __future__ import annotations

import json
import math

import torch
import yaml
from torch import nn

from mmsoup import cli
from mmsoup.checkpoints import load_state_dict, save_state_dict
from mmsoup.own import inspect_pool
from mmsoup.recipes import mms_warning


def bn_net() -> nn.Module:
    """Linear(2, 2) -> BatchNorm1d(2) -> Linear(2, 2): class 1 iff the first input is > 0."""
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))


def _state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    net = bn_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["0.weight"], state["0.bias"] = torch.eye(2), torch.zeros(2)
    state["1.weight"], state["1.bias"] = torch.ones(2), torch.zeros(2)
    state["1.running_mean"], state["1.running_var"] = torch.zeros(2), torch.ones(2)
    state["2.weight"] = scale * torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    state["2.bias"] = torch.zeros(2)
    return state


def _data(x0: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    x1 = torch.randn(len(x0), generator=torch.Generator().manual_seed(seed))
    return {"inputs": torch.stack([x0, x1], dim=1), "labels": labels}


def _pool(tmp, **keys):
    save_state_dict(_state(1.0), tmp / "a.safetensors")
    save_state_dict(_state(1.2), tmp / "b.safetensors")
    # held-out: 16 of class 1 (x0 in [0.2, 1]), 4 of class 0 (x0 = -1). The mixed statistics
    # (mean 0) classify all 20; statistics recomputed on these batches centre x0 near 0.28 and
    # misclassify the class-1 images below it: recalibration lowers held-out accuracy.
    x0 = torch.cat([torch.linspace(0.2, 1.0, 16), torch.full((4,), -1.0)])
    labels = torch.cat([torch.ones(16), torch.zeros(4)]).long()
    torch.save(_data(x0, labels, 0), tmp / "held_out.pt")
    t0 = torch.linspace(-1, 1, 10)  # a test set: a different draw
    torch.save(_data(t0 + 0.05, (t0 + 0.05 > 0.3).long(), 1), tmp / "test.pt")
    config = {
        "model": "test_own_hardened:bn_net", "trust_code": True,
        "ingredients": ["*.safetensors"], "held_out": "held_out.pt", "out": "soup",
        "device": "cpu", "partition": "blocks:2", "mms": {"budget": 2, "optimizer": "Cobyla"},
    } | keys  # fmt: skip
    (tmp / "soup.yaml").write_text(yaml.safe_dump(config))
    return tmp / "soup.yaml"


def _acc(state, path) -> float:
    net = bn_net().eval()
    net.load_state_dict(state)
    data = torch.load(path)
    with torch.no_grad():
        return int((net(data["inputs"]).argmax(-1) == data["labels"]).sum()) / len(data["labels"])


def test_bn_final_keeps_the_mixed_statistics_when_recalibration_lowers_accuracy(tmp_path, capsys):
    config = _pool(tmp_path, recipes=["uniform", "greedy"], bn_recalibration="final")
    assert cli.main(["soup", "--config", str(config)]) == 0
    out = tmp_path / "soup"
    card = (out / "MODEL_CARD.md").read_text()
    for recipe in ("uniform", "greedy"):
        side = json.loads((out / f"{recipe}.json").read_text())
        bn = side["info"]["bn_recalibration"]
        assert bn["acc_mixed_statistics"] == 1.0 and bn["acc_recalibrated"] == 0.9
        assert bn["kept"] == "mixed" and side["val_acc"] == 1.0
        soup = load_state_dict(out / f"{recipe}.safetensors")
        assert torch.equal(soup["1.running_mean"], torch.zeros(2))  # the mixed statistics
        assert _acc(soup, tmp_path / "held_out.pt") == 1.0  # the better model is written
        assert f"{recipe}: mixed statistics (recalibration lowered held-out accuracy" in card
    assert "| BN stats kept |" in card


def test_a_test_set_scores_each_soup_once_after_it_is_built(tmp_path, capsys):
    config = _pool(tmp_path, recipes=["uniform", "greedy", "mms"], test="test.pt")
    assert cli.main(["soup", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "soup"
    card = (out / "MODEL_CARD.md").read_text()
    assert "| recipe | held-out acc | test acc |" in card
    assert "**Test accuracy** (`test.pt`, 10 examples)" in card and "unbiased" in card
    for recipe in ("uniform", "greedy", "mms"):
        side = json.loads((out / f"{recipe}.json").read_text())
        test = side["info"]["test"]
        expected = _acc(load_state_dict(out / f"{recipe}.safetensors"), tmp_path / "test.pt")
        assert test["acc"] == expected and test["n"] == 10 and test["set"] == "test.pt"
        assert f"test {expected:.4f}" in printed
        assert len(side["trace"]) == side["n_evals"]  # the test set is no evaluation of the search


def test_mms_warns_before_the_search_when_one_image_outweighs_tau(tmp_path, capsys):
    config = _pool(tmp_path, recipes=["mms"])  # 20 images, tau 0.998: 1/20 > 0.002·acc
    assert cli.main(["soup", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("mmsoup: warning: MMS")]
    assert len(warning) == 1, err
    assert "one held-out image is 1/20 = 0.0500 of accuracy" in warning[0]
    assert "(1 - tau)·acc = 0.0020 at acc 1.0000" in warning[0]
    card = (tmp_path / "soup" / "MODEL_CARD.md").read_text()
    assert "**Warning:** MMS will likely return the best checkpoint alone" in card
    side = json.loads((tmp_path / "soup" / "mms.json").read_text())
    assert side["info"]["warning"] == warning[0].removeprefix("mmsoup: warning: ")


def test_mms_warning_numbers():
    text = mms_warning(400, 0.998, 0.905)
    assert "one held-out image is 1/400 = 0.0025 of accuracy" in text
    assert "(1 - tau)·acc = 0.0018 at acc 0.9050" in text
    assert "use at least 553 held-out images or a lower tau (at most 0.997 for these 400)" in text
    assert mms_warning(1000, 0.99, 0.9) is None  # 0.001 <= 0.009: the test can pass
    assert "tau = 1 allows no loss" in mms_warning(10**6, 1.0, 0.9)
    assert mms_warning(None, 0.998, 0.9) is None  # a val_acc callable: no held-out size


def test_inspect_angles_are_over_parameters_only_and_columns_are_explained(tmp_path, capsys):
    init = _state()
    a, b = dict(init), dict(init)
    a["0.weight"] = init["0.weight"] + torch.tensor([[0.3, 0.0], [0.0, 0.0]])  # orthogonal
    b["0.weight"] = init["0.weight"] + torch.tensor([[0.0, 0.0], [0.0, 0.3]])  # updates: 90°
    for s in (a, b):  # BatchNorm statistics far from init, the same in both: a 0° pull
        s["1.running_mean"] = init["1.running_mean"] + 50.0
    save_state_dict(init, tmp_path / "init.pt.safetensors")
    save_state_dict(a, tmp_path / "a.safetensors")
    save_state_dict(b, tmp_path / "b.safetensors")
    _pool(tmp_path)  # held-out data and config; restore the two checkpoints above
    save_state_dict(a, tmp_path / "a.safetensors")
    save_state_dict(b, tmp_path / "b.safetensors")
    cfg = yaml.safe_load((tmp_path / "soup.yaml").read_text())
    cfg |= {"init": "init.pt.safetensors", "ingredients": ["a.safetensors", "b.safetensors"]}
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump(cfg))
    table = inspect_pool(tmp_path / "soup.yaml", progress=False)
    assert math.isclose(table.loc[0, "angle_deg"], 90.0, abs_tol=1e-9)
    # over every floating tensor, buffers included, the angle would be near 0
    da = torch.cat([(a[k] - init[k]).flatten() for k in init if init[k].is_floating_point()])
    db = torch.cat([(b[k] - init[k]).flatten() for k in init if init[k].is_floating_point()])
    with_buffers = math.degrees(math.acos(float(da @ db / (da.norm() * db.norm()))))
    assert with_buffers < 1.0
    capsys.readouterr()
    assert cli.main(["inspect", "--config", str(tmp_path / "soup.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "columns:" in printed
    for col in ("acc:", "acc@a:", "angle_deg:", "collapse:"):
        assert f"  {col} " in printed, printed
    assert "over the parameters only (BatchNorm running statistics" in printed
