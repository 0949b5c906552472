"""Each recipe is defined once, in mmsoup.recipes; the stages, Table 1 and Figure 2 read that table."""

from __future__ import annotations

import pytest

from mmsoup import plots, table1
from mmsoup.errors import MMSoupError
from mmsoup.papers import PAPER_TABLE1
from mmsoup.recipes import NAMES, RECIPES, SHOWN, recipe


def test_every_recipe_has_its_own_name_and_file():
    assert len(set(NAMES)) == len(NAMES) == len({r.file for r in RECIPES})
    assert recipe("MMS-C8").file == "mms_c8.safetensors" and recipe("MMS-C8").scheme == "C8"
    assert recipe("MMS-C8+live").scheme == "C8+live"  # the ablation: inert components left out
    assert recipe("Greedy ensemble").file == "greedy_ensemble.json"


def test_table1_and_figure2_list_the_recipes_by_kind():
    assert [r.kind for r in SHOWN] == sorted(
        (r.kind for r in RECIPES), key=("soup", "ensemble", "wise").index
    )
    assert table1.ROW_ORDER[: len(SHOWN)] == tuple(r.name for r in SHOWN)
    assert all(plots._STYLES[r.name] == r.style for r in RECIPES)


def test_the_papers_rows_are_recipes_or_individual_models():
    rows = set(PAPER_TABLE1.index) - {table1.BEST, table1.SECOND}
    assert rows <= set(NAMES)


def test_an_unknown_recipe_is_one_sentence_listing_them():
    with pytest.raises(
        MMSoupError,
        match=r"Unknown recipe 'MMS-C9'; pick from Uniform soup \(uniform\), .*Greedy ensemble \(greedy_ensemble\)\.$",
    ):
        recipe("MMS-C9")


def test_one_vocabulary_names_each_recipe_by_name_key_or_alias():
    from mmsoup.recipes import REGISTRY, slug

    for r in REGISTRY:
        for spelling in (r.name, r.name.upper(), slug(r.name), r.key, *r.aliases):
            assert recipe(spelling) is r, spelling
    assert recipe("mms").scheme is None and recipe("mms_c8").scheme == "C8"  # the pool's / its own
    assert len({r.key for r in REGISTRY}) == len(REGISTRY)  # one file name each in soup --config


def test_soup_config_and_distributed_take_the_same_names(tmp_path):
    import argparse

    import yaml

    from mmsoup import distributed_cli
    from mmsoup.own import load_config

    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    config = {"model": "toy_mlp:mlp", "trust_code": True, "ingredients": ["*.safetensors"]}
    config |= {"recipes": ["MMS-C8", "mms", "Greedy soup", "uniform", "UNIFORM"]}
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "soup.yaml")
    assert cfg.recipes == ["mms_c8", "mms", "greedy", "uniform"]  # keys, each once
    args = distributed_cli.build_parser().parse_args(
        ["--ingredients", str(tmp_path), "--out", str(tmp_path / "s.safetensors")]
    )
    for name, needs in (
        ("MMS-C8", None),
        ("uniform", None),
        ("Ensemble", "one process"),
        ("wise", "--init"),
    ):
        try:
            distributed_cli.check_args(argparse.Namespace(**{**vars(args), "recipe": name}))
        except MMSoupError as e:
            assert needs is not None and needs in str(e), (name, e)
        else:
            assert needs is None, name
