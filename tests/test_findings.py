"""Each chapter's "What this run shows" sentences follow the run's own numbers (mmsoup.findings).

Checked on the committed embedded run (results/embedded: every function that reads only results
files) and on the smoke run, against numbers computed here from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsoup import analysis, claims, findings
from mmsoup.recipes import MMS_SCHEMES, recipe
from mmsoup.results import load_results

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "embedded"
SHIFTS = ["recollection", "renditions", "sketch", "clutter", "adversarial"]


def _runs(run_dir: Path) -> pd.DataFrame:
    """The sweep table from the sidecars (what finetune_stage returns, without the checkpoints)."""
    rows = []
    for f in sorted((run_dir / "sweep").glob("model_*.json"), key=lambda p: int(p.stem[6:])):
        meta = json.loads(f.read_text())
        row = {"name": meta["name"], "val_acc": meta.get("val_acc")}
        row |= {k: meta.get("config", {}).get(k) for k in analysis.HPARAMS}
        if meta.get("kind") == "lp_init":
            row["augment"] = "LP init"
        rows.append(row)
    return pd.DataFrame(rows)


def _best(run_dir: Path) -> str:
    """The best model on held-out (the baseline of chapters 03 and 04)."""
    accs = json.loads((run_dir / "soups" / "ingredient_val_accs.json").read_text())
    return f"model_{int(np.argmax(accs))}"


def _wide(run_dir: Path, id_set: str, shifts) -> pd.DataFrame:
    acc, _ = load_results(run_dir)
    wide = acc.pivot_table(index="method", columns="set", values="accuracy")
    wide["Avg OOD"] = wide[list(shifts)].mean(axis=1)
    return wide


def test_sweep_says_how_good_and_how_different_the_committed_runs_are():
    runs = _runs(COMMITTED)
    tuned = runs[runs["augment"] != "LP init"]
    text = findings.markdown(findings.sweep(runs, analysis.training_losses(COMMITTED / "sweep")))
    acc = 100 * tuned["val_acc"]
    lp = 100 * runs.loc[runs["augment"] == "LP init", "val_acc"].iloc[0]
    assert f"The {len(tuned)} fine-tuned runs reach {acc.min():.2f}–{acc.max():.2f} %" in text
    assert f"the LP init they all start from has {lp:.2f} %" in text
    assert f"{int((acc > lp).sum())} of {len(tuned)} runs end above it" in text
    assert f"learning rates span {tuned.lr.max() / tuned.lr.min():.1f}×" in text
    assert f"differ by {acc.max() - acc.min():.2f} points" in text
    assert "one hard batch, not a run that diverged" in text  # model_1's last batch: 1.51


def test_hparam_display_shows_percent_and_integers():
    runs = _runs(COMMITTED)
    shown = analysis.hparam_display(runs)
    held = 100 * runs.loc[runs["name"] == "model_1", "val_acc"].iloc[0]
    assert shown.loc["model_1", "held-out (%)"] == f"{held:.2f}"
    assert shown.loc["model_1", "epochs"] == "5" and shown.loc["model_1", "seed"] == "1"
    assert shown.loc["model_0", "lr"] == ""


def test_soups_tells_what_each_recipe_decided_on_the_committed_pool():
    text = findings.markdown(findings.soups(COMMITTED))
    accs = json.loads((COMMITTED / "soups" / "ingredient_val_accs.json").read_text())
    greedy = json.loads((COMMITTED / "soups" / "greedy_soup.json").read_text())
    mms = json.loads((COMMITTED / "soups" / "mms_c8.json").read_text())
    skipped = sum(d["decision"] == "skipped" for d in mms["info"]["decisions"])
    assert f"{len(accs)} models; the best on held-out is model_{int(np.argmax(accs))}" in text
    assert f"It kept {len(greedy['ingredients'])} of {len(accs)} models" in text
    assert (
        f"skipped {skipped} of the {len(accs) - 1} candidates" in text  # every soup alike
        or f"skipped {skipped} of {len(accs) - 1} candidates in MMS-C8" in text
    )
    assert f"MMS-C8 {100 * mms['val_acc']:.2f} %" in text


def test_evaluation_names_the_shifts_that_carry_and_offset_greedys_gain():
    acc, _ = load_results(COMMITTED)
    text = findings.markdown(findings.evaluation(acc, "test", SHIFTS))
    wide = _wide(COMMITTED, "test", SHIFTS)
    d = wide.loc["Greedy soup"] - wide.loc[_best(COMMITTED)]
    assert (
        f"**Greedy soup**: {d['Avg OOD']:+.2f} points Avg OOD and {d['test']:+.2f} on test" in text
    )
    best, worst = d[SHIFTS].idxmax(), d[SHIFTS].idxmin()
    line = next(s for s in text.splitlines() if s.startswith("- **Greedy soup**"))
    carried, offset = line.split("Carried by ")[1].split("; offset by ")
    assert f"{best} ({d[best]:+.2f})" in carried and f"{worst} ({d[worst]:+.2f})" in offset
    same = (wide.loc["MMS-C8"] == wide.loc["Greedy soup"]).all()
    assert ("**MMS-C8** has the same accuracy as Greedy soup on every set." in text) == same


def test_figure2_and_table1_sentences_follow_the_checklist():
    acc, _ = load_results(COMMITTED)
    figs = [c for c in claims.CLAIMS if c.figure2]
    checks = claims.for_run("embedded", COMMITTED, ROOT / "figures", figs)
    text = findings.markdown(findings.figure2(acc, "test", SHIFTS, checks))
    holds = int((checks["across replicates"] == "holds").sum())
    assert f"**{holds} of {len(figs)} claims hold across replicates**" in text
    wide = _wide(COMMITTED, "test", SHIFTS)
    dy = wide.loc["Greedy soup", "Avg OOD"] - wide.loc[_best(COMMITTED), "Avg OOD"]
    assert f"above ({dy:+.2f} points Avg OOD)" in text
    point = wide[["test", "Avg OOD"]]
    shared = all(
        (point.loc[m] == point.loc["Greedy soup"]).all() for m in ("MMS-C8", "MMS-C8+live")
    )
    assert ("MMS-C8 and MMS-C8+live share its point exactly" in text) == shared
    every = claims.for_run("embedded", COMMITTED, ROOT / "figures")
    text = findings.markdown(findings.table1(every))
    for verdict, words in (("holds", "hold"), ("unclear", "are unclear")):
        n = int((every["across replicates"] == verdict).sum())
        assert f"**{n} of {len(every)} claims {words}" in text


def test_differences_reads_budget_pool_resolution_and_tau_from_the_run():
    from mmsoup.profiles import get_profile

    text = findings.markdown(findings.differences("embedded", COMMITTED))
    acc, _ = load_results(COMMITTED)
    n = int(acc.loc[acc["set"] == "heldout", "n"].iloc[0])
    assert f"with {get_profile('embedded').mms_budget} Nevergrad evaluations per candidate" in text
    assert f"{get_profile('paper').mms_budget} in the paper" in text
    assert f"chosen on {n:,} held-out images, so one image is {100 / n:.2g} points" in text
    pool = len(json.loads((COMMITTED / "soups" / "ingredient_val_accs.json").read_text()))
    assert f"{pool} models" in text and f"the paper's {get_profile('paper').n_runs + 1}" in text
    skipped = {  # every MMS recipe's record, as the soup stage wrote it
        name: sum(
            d["decision"] == "skipped"
            for d in findings._record(COMMITTED, recipe(name).file)["info"]["decisions"]
        )
        for name in MMS_SCHEMES
    }
    if len(set(skipped.values())) == 1:
        assert f"{skipped['MMS-C8']} of the {pool - 1} candidates" in text
    else:
        assert all(f"{name} {k} of {pool - 1}" in text for name, k in skipped.items())


def test_why_soups_follows_the_committed_tables():
    tables, meta = analysis.load_tables(COMMITTED)
    text = findings.markdown(findings.why_soups(tables, meta, images=400, seconds=46))
    pairs = tables["pairs"]
    rho = pairs["angle"].corr(pairs["advantage"], method="spearman")
    assert f"Over {len(pairs)} pairs" in text and f"Spearman ρ = {rho:.2f}" in text
    gap = pairs["ensemble"] - pairs["soup"]
    assert f"in {int((gap >= 0).sum())} of {len(pairs)} pairs" in text
    mid = tables["landscape"].set_index("point").loc["average", "error"]
    assert f"Their average has {mid:.2f} % error" in text
    assert "took 46 s" in text and "one example is 0.25 points" in text


def test_the_smoke_run_chapters_end_with_what_they_show(smoke_run):
    """Chapters 01-05 under the smoke profile close with generated sentences, no error."""
    import nbformat

    for name in ("01_finetune_sweep", "02_soups", "03_ood_evaluation", "04_figure2", "05_table1"):
        nb = nbformat.read(smoke_run / "notebooks" / f"{name}.ipynb", as_version=4)
        cells = nb.cells
        k = next(i for i, c in enumerate(cells) if c.source.startswith("## What this run shows"))
        outs = [o for c in cells[k:] if c.cell_type == "code" for o in c.outputs]
        assert not any(o["output_type"] == "error" for o in outs), name
        shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outs)
        assert shown.startswith("- **"), (name, shown[:200])


@pytest.mark.parametrize("fn", ["sweep", "soups", "evaluation", "why_soups"])
def test_the_generators_run_on_the_smoke_run(smoke_run, fn):
    acc, _ = load_results(smoke_run)
    if fn == "sweep":
        out = findings.sweep(_runs(smoke_run), analysis.training_losses(smoke_run / "sweep"))
    elif fn == "soups":
        out = findings.soups(smoke_run)
    elif fn == "evaluation":
        out = findings.evaluation(acc, "test", SHIFTS)
    else:
        tables, meta = analysis.load_tables(smoke_run)
        if not tables:
            pytest.skip("chapter 07 has not run on this smoke run")
        out = findings.why_soups(tables, meta, images=100)
    assert out and all(isinstance(s, str) and s for s in out)
