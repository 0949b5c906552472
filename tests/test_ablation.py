"""The conditions ablation (chapter 09): a larger held-out split, shared sweeps, what MMS did.

The real conditions (2,000 held-out images, 250 evaluations, 24 runs) cost hours; here the same
machinery runs on the smoke profile with conditions scaled down, and the parts that decide the
numbers (the split, the nested sweeps, the τ margins, the λ moves) are checked exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsoup import ablation
from mmsoup.ablation import Condition
from mmsoup.data import digits
from mmsoup.errors import MMSoupError
from mmsoup.finetune import FinetuneConfig
from mmsoup.profiles import get_profile
from mmsoup.sweep import profile_configs

REPO = Path(__file__).resolve().parents[1]


def _keys(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha1(im.tobytes()).digest() for im in images]


def test_a_larger_held_out_set_moves_training_images_and_keeps_the_rest():
    train, train_y = digits.load("train")
    held, held_y = digits.load("heldout")
    train2, train2_y = digits.load_split("train", 2000)
    held2, held2_y = digits.load_split("heldout", 2000)
    assert (len(train2), len(held2)) == (2000, 2000)
    # the committed 1,000 held-out images come first, unchanged
    assert np.array_equal(held2[:1000], held) and np.array_equal(held2_y[:1000], held_y)
    # the two new splits are the old ones redistributed: no image lost, none in both
    assert sorted(_keys(train2) + _keys(held2)) == sorted(_keys(train) + _keys(held))
    assert not set(_keys(train2)) & set(_keys(held2))
    # stratified: each class keeps its share of the moved images (within one image)
    moved_counts = np.bincount(held2_y[1000:], minlength=10)
    expected = 1000 * np.bincount(train_y, minlength=10) / len(train_y)
    assert np.all(np.abs(moved_counts - expected) <= 1)
    # the test set and the shifts do not change, so their accuracies compare across conditions
    for name in ("test", "sketch", "adversarial"):
        assert np.array_equal(digits.load_split(name, 2000)[0], digits.load(name)[0])
    assert np.array_equal(digits.load_split("train", 1000)[0], train)
    with pytest.raises(MMSoupError, match="1,000 to 3000"):
        digits.load_split("heldout", 3500)


def test_the_profile_and_the_run_config_carry_the_held_out_size():
    assert get_profile("embedded:heldout_images=2000").heldout_images == 2000
    assert get_profile("embedded").heldout_images == 1000
    for bad, match in (
        ("embedded:heldout_images=5000", "out of range"),
        ("paper:heldout_images=2000", "heldout_per_class"),
        ("smoke:n_runs=²", "positive integer"),
        ("smoke:n_runs=١", "positive integer"),  # Arabic-Indic one: int() would read 1
    ):
        with pytest.raises(MMSoupError, match=match):
            get_profile(bad)
    configs = profile_configs("embedded:heldout_images=2000")
    assert {c.heldout_images for c in configs} == {2000}
    # the default stays out of a config's JSON, so the committed sweep's runs stay current
    side = json.loads((REPO / "results/embedded/sweep/model_1.json").read_text())
    assert "heldout_images" not in side["config"]
    assert FinetuneConfig.from_json(side["config"]).to_json() == side["config"]
    with pytest.raises(MMSoupError, match="heldout_images"):
        FinetuneConfig(heldout_images=999)


def test_a_24_run_sweep_starts_with_the_12_run_sweep_of_the_same_seed():
    for seed in (0, 3):
        twelve = profile_configs(f"embedded:search_seed={seed}")
        longer = profile_configs(f"embedded:search_seed={seed},n_runs=24")
        assert len(longer) == 24 and longer[:12] == twelve
        assert len({c.seed for c in longer}) == 24


def test_decisions_read_the_tau_margins_and_the_lambda_moves_in_images():
    meta = {
        "ingredient_val_accs": [0.80, 0.90, 0.85, 0.88],
        "info": {
            "n_components": 2,
            "decisions": [
                {
                    "candidate": 3,
                    "decision": "accepted",
                    "approx_acc": 0.905,
                    "best_acc": 0.91,
                    "lambdas": [0.5, 0.7, 0.5],
                },  # fmt: skip
                {"candidate": 2, "decision": "skipped", "approx_acc": 0.89},
                {
                    "candidate": 0,
                    "decision": "rejected",
                    "approx_acc": 0.909,
                    "best_acc": 0.909,
                    "lambdas": [2 / 3, 2 / 3, 2 / 3],
                },  # fmt: skip
            ],
        },
    }
    d = ablation.decisions(meta, 1000)
    assert d["margin_images"].tolist() == [5, -20, -1]  # against 0.90, then 0.91 once accepted
    assert d["lam0"].tolist() == pytest.approx([0.5, 2 / 3, 2 / 3])
    assert d["moved"].iloc[0] == pytest.approx(0.2)  # REST (third λ) is not searched
    assert d["moved"].iloc[2] == pytest.approx(0.0)
    assert np.isnan(d["moved"].iloc[1])


@pytest.fixture(scope="module")
def small_ablation(tmp_path_factory, monkeypatch_module):
    """Two smoke replicates of three scaled-down conditions, published to results/."""
    conditions = {
        "today": Condition("today", "smoke as it is", {}),
        "heldout": Condition("heldout", "1,200 held-out", {"heldout_images": 1200}),
        "paper": Condition("paper", "all", {"heldout_images": 1200, "mms_budget": 12, "n_runs": 5}),
    }
    monkeypatch_module.setattr(ablation, "CONDITIONS", conditions)
    root = tmp_path_factory.mktemp("ablation")
    ablation.run(2, root / "runs", list(conditions), base="smoke", results=root / "results")
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_ablation_shares_sweeps_publishes_without_checkpoints_and_resumes(small_ablation):
    runs, results = small_ablation / "runs", small_ablation / "results"
    # one sweep per held-out size: 'heldout' uses the first 4 runs of the 5-run 1,200 sweep
    pool = runs / "pools" / "h1200" / "r0" / "sweep"
    linked = runs / "heldout" / "r0" / "sweep" / "model_4.safetensors"
    assert linked.is_symlink() and linked.resolve() == (pool / "model_4.safetensors").resolve()
    assert not (runs / "heldout" / "r0" / "sweep" / "model_5.safetensors").exists()
    assert (runs / "paper" / "r0" / "sweep" / "model_5.safetensors").exists()
    assert not (runs / "pools" / "h1000" / "r0" / "sweep" / "model_5.safetensors").exists()
    # the held-out size reached the evaluation: 1,200 images scored
    acc = pd.read_csv(results / "paper" / "r1" / "results" / "accuracy.csv")
    assert set(acc[acc["set"] == "heldout"]["n"]) == {1200}
    assert set(acc[acc["set"] == "test"]["n"]) == {1000}
    assert not list(results.rglob("*.safetensors"))
    # a second run finds everything done and changes nothing
    done = sorted(results.rglob(ablation.DONE))
    assert len(done) == 6
    before = {p: p.read_bytes() for p in done}
    ablation.run(2, runs, list(ablation.CONDITIONS), base="smoke", results=results)
    assert {p: p.read_bytes() for p in done} == before


def test_the_ablation_table_has_one_row_per_condition_replicate_and_method(small_ablation):
    out = small_ablation / "figures"
    paths = ablation.write_summary(small_ablation / "results", out)
    rows = pd.read_csv(out / "ablation.csv")
    for col in (
        "condition", "replicate", "method", "delta_id", "delta_ood", "candidates_optimised",
        "lambda_moved", "heldout_images", "budget", "models",
    ):  # fmt: skip
        assert col in rows.columns, col
    assert len(rows) == 3 * 2 * 4  # conditions × replicates × (best, uniform, greedy, MMS-C8)
    assert rows.groupby("condition")["heldout_images"].first().to_dict() == {
        "heldout": 1200, "paper": 1200, "today": 1000,
    }  # fmt: skip
    assert rows.groupby("condition")["models"].first().to_dict()["paper"] == 5
    best = rows[rows["method"] == "Best individual"]
    assert (best[["delta_id", "delta_ood"]] == 0).all().all()
    mms = rows[rows["method"] == "MMS-C8"]
    assert mms["candidates_optimised"].notna().all()
    # the Δ of MMS-C8 is its accuracy minus the best model's, read back from accuracy.csv
    acc = pd.read_csv(small_ablation / "results" / "paper" / "r0" / "results" / "accuracy.csv")
    one = mms[(mms["condition"] == "paper") & (mms["replicate"] == 0)].iloc[0]
    test = acc[acc["set"] == "test"].set_index("method")["accuracy"]
    best_name = acc[(acc["set"] == "test") & (acc["kind"] == "individual")]["method"].iloc[0]
    assert one["delta_id"] == pytest.approx(test["MMS-C8"] - test[best_name], abs=1e-3)
    md = Path(paths[1]).read_text()
    assert "| paper | 1,200 | 12 | 5 | 2 |" in md
    assert len(ablation.findings(rows)) == 3
    how = ablation.mechanism(ablation.load_metas(small_ablation / "results"))
    assert [h.split("**")[1] for h in how] == ["today", "heldout", "paper"]
    assert all("the τ test skipped" in h for h in how)


def test_chapter_09_reads_the_published_ablation_alone(small_ablation, tmp_path):
    from test_notebooks import _check_short, _outputs

    from mmsoup.reproduce import run_notebook

    params = {
        "profile": "smoke",
        "run_dir": str(tmp_path / "no_run"),
        "ablation_dir": str(small_ablation / "results"),
        "figures_dir": str(tmp_path / "figures"),
    }
    outputs = _outputs(run_notebook("09_when_mms_helps", params, tmp_path, stream=False))
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    _check_short(outputs, "09_when_mms_helps")
    text = str(outputs)
    assert "MMS-C8 − greedy soup, Avg OOD" in text  # the generated findings
    assert not (tmp_path / "no_run").exists() and not (tmp_path / "figures").exists()


def test_an_unknown_condition_is_one_sentence_before_any_work(tmp_path, capsys):
    from mmsoup.cli import main

    rc = main(["ablation", "--conditions", "nope", "--root", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Unknown condition 'nope'" in err[0]
    assert not (tmp_path / "r").exists()
