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
        MMSoupError, match=r"Unknown recipe 'MMS-C9'; pick from Uniform soup, .*Greedy ensemble\.$"
    ):
        recipe("MMS-C9")
