"""Soup your own checkpoints: sharded files, a timm ViT, a tiny BERT with a val_acc callable,
inspect, the README's example."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_own import _config, _resnet_pool
from torch import nn

from mmsoup import cli
from mmsoup.checkpoints import load_state_dict, save_state_dict
from mmsoup.own import inspect_pool, load_config, soup_from_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_timm_vit_pool_through_uniform_greedy_and_mms(tmp_path):
    import timm

    kwargs = {"num_classes": 4, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48}
    torch.manual_seed(0)
    init = timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict()
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in init.items()}
        save_state_dict(state, tmp_path / f"ft{i}.safetensors")
    g = torch.Generator().manual_seed(5)
    torch.save(
        {"images": torch.randn(6, 3, 32, 32, generator=g), "labels": torch.arange(6) % 4},
        tmp_path / "held_out.pt",
    )
    config = _config(
        tmp_path, model="timm:vit_tiny_patch16_224", model_kwargs=kwargs, partition="blocks:4+live"
    )
    res = soup_from_config(config, progress=False)
    assert res["partition"].keys() == {"stem", "blocks.0", "blocks.1", "head"}
    assert res["mms"].info["n_components"] == 4
    assert 2 <= res["mms"].n_evals <= 2 * (1 + 4)  # per candidate: λ0, then a budget of 4
    assert (tmp_path / "soup" / "MODEL_CARD.md").is_file()


def test_a_tiny_bert_sequence_classifier_with_a_val_acc_callable(tmp_path):
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
        architectures=["BertForSequenceClassification"],
    )  # fmt: skip
    torch.manual_seed(0)
    init = tf.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 30, (32, 8), generator=g)
    ids[:16, 3] = 1  # the task: does token 1 occur?
    labels = (ids == 1).any(dim=1).long()
    for i in range(3):  # three short fine-tuning runs from one init
        model = tf.BertForSequenceClassification(cfg)
        model.load_state_dict(init.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(i)
        for _ in range(15):
            idx = torch.randint(0, 32, (16,), generator=gen)
            loss = model(input_ids=ids[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(tmp_path / f"run{i}")  # a Hugging Face folder: config + safetensors
    scorer = tf.BertForSequenceClassification(cfg).eval()

    def val_acc(state):
        scorer.load_state_dict(state)
        with torch.no_grad():
            return (scorer(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()

    config = {
        "model": str(tmp_path / "run0"),
        "ingredients": [str(tmp_path / f"run{i}") for i in range(3)],
        "partition": "blocks:4",
        "mms": {"budget": 4},
        "out": str(tmp_path / "soup"),
    }
    res = soup_from_config(config, val_acc=val_acc, progress=False)
    assert list(res["mms"].info["decisions"][0])[:2] == ["candidate", "decision"]
    assert list(res["partition"]) == [
        "stem", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"
    ]  # fmt: skip
    best = max(res["ingredient_val_accs"])
    assert res["greedy"].val_acc >= best and res["mms"].val_acc >= best
    soup = (
        tmp_path / "soup" / "mms"
    )  # a folder with the model's config.json: from_pretrained loads it
    assert val_acc(load_state_dict(soup)) == res["mms"].val_acc
    loaded = tf.BertForSequenceClassification.from_pretrained(soup)
    assert val_acc(loaded.state_dict()) == res["mms"].val_acc


def test_inspect_flags_a_candidate_from_another_basin(tmp_path, capsys):
    from sklearn.datasets import load_digits
    from toy_mlp import mlp, train

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    model = mlp()
    save_state_dict(model.state_dict(), tmp_path / "init.safetensors")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):  # same basin: two runs from one init
        model.load_state_dict(init)
        save_state_dict(
            train(model, x[:1000], y[:1000], i, 0.1, 800), tmp_path / f"ft{i}.safetensors"
        )
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    state = load_state_dict(
        tmp_path / "ft0.safetensors"
    )  # the same function, hidden units permuted
    permuted = {"0.weight": state["0.weight"][perm], "0.bias": state["0.bias"][perm]}
    permuted |= {"2.weight": state["2.weight"][:, perm], "2.bias": state["2.bias"]}
    save_state_dict(permuted, tmp_path / "ft2.safetensors")
    torch.save({"inputs": x[1000:], "labels": y[1000:]}, tmp_path / "held_out.pt")
    config = _config(
        tmp_path, model="toy_mlp:mlp", model_kwargs={}, init="init.safetensors", trust_code=True
    )
    table = inspect_pool(config, progress=False).set_index("candidate")
    same = [c for c in table.index if c != "ft2.safetensors"]  # the other one of ft0, ft1
    assert len(same) == 1 and table.loc["ft2.safetensors", "collapse"]
    assert not table.loc[same[0], "collapse"]
    assert table.loc["ft2.safetensors", "angle_deg"] > 2 * table.loc[same[0], "angle_deg"]
    assert cli.main(["inspect", "--config", str(config)]) == 0
    assert "midpoint collapses" in capsys.readouterr().out


def test_the_readme_config_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Soup your own checkpoints", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "checkpoints").mkdir()
    _resnet_pool(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "held_out.pt").rename(tmp_path / "held_out.pt")
    (tmp_path / "soup.yaml").write_text(example)
    config = load_config(tmp_path / "soup.yaml")
    assert config.model == "torchvision:resnet18" and len(config.ingredients) == 3
    monkeypatch.chdir(tmp_path)
    argv = ["soup", "--config", "soup.yaml", "--out", "out", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"MODEL_CARD.md", "mms.safetensors"}


def test_hugging_face_folders_are_found_in_the_local_cache_only(tmp_path, monkeypatch):
    from mmsoup.errors import MMSoupError
    from mmsoup.factories import create_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MMSoupError, match="not in the local Hugging Face cache"):
        create_model("hf:someone/some-model")


def test_own_models_are_plain_modules_built_only_when_trusted(tmp_path):
    from mmsoup.errors import MMSoupError
    from mmsoup.factories import create_model

    with pytest.raises(MMSoupError, match="is a Python factory.*pass --trust-code"):
        create_model("toy_mlp:mlp")
    made = create_model("toy_mlp:mlp", trust_code=True)
    assert isinstance(made.module, nn.Sequential) and made.source == "python"


def test_sharded_checkpoints_in_and_sharded_soups_out(tmp_path):
    from huggingface_hub import save_torch_state_dict

    pool = _resnet_pool(tmp_path, n=2)
    for i, state in enumerate(pool):  # each ingredient as a sharded folder (safetensors' index)
        (tmp_path / f"sharded{i}").mkdir()
        save_torch_state_dict(state, tmp_path / f"sharded{i}", max_shard_size="10MB")
        assert (tmp_path / f"sharded{i}" / "model.safetensors.index.json").is_file()
        loaded = load_state_dict(tmp_path / f"sharded{i}")
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    config = _config(tmp_path, ingredients=["sharded*"], recipes=["uniform"])
    assert cli.main(["soup", "--config", str(config), "--shard-size", "20MB"]) == 0
    folder = tmp_path / "soup" / "uniform"
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (folder / "model.safetensors.index.json").is_file()
    assert (tmp_path / "soup" / "uniform.json").is_file()
    soup = load_state_dict(folder)
    assert list(soup) == list(pool[0])  # the model's key order survives the shards
    mean = (pool[0]["fc.weight"] + pool[1]["fc.weight"]) / 2
    assert torch.allclose(soup["fc.weight"], mean, atol=1e-6)
