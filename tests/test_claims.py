"""The papers' claims checked against a run and a replicate study (chapters 04 and 05)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import ID, SETS, SHIFTS, _acc_from, _flags

from mmsoup.claims import Claim, beside_paper, checklist, replicate_study
from mmsoup.papers import PAPER_TABLE1
from mmsoup.table1 import AVG_OOD, BEST, table1

N = 1000


@pytest.fixture(scope="module")
def run() -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """model_1 best on held-out; the greedy soup right wherever it is and on 100 more images per
    set; MMS-C8 the greedy soup's predictions exactly; the uniform soup wrong on 100 of its hits."""
    rng = np.random.default_rng(3)
    rates = {"model_1": (0.80, 0.70, 0.45, 0.55, 0.35), "model_2": (0.70, 0.65, 0.4, 0.5, 0.3)}
    correct = {f"{m}/{s}": _flags(rng, N, r) for m, rs in rates.items() for s, r in zip(SETS, rs)}
    for s in SETS:
        best = correct[f"model_1/{s}"]
        better, worse = best.copy(), best.copy()
        better[rng.choice(np.flatnonzero(~best), size=100, replace=False)] = True
        worse[rng.choice(np.flatnonzero(best), size=100, replace=False)] = False
        correct |= {f"Greedy soup/{s}": better, f"MMS-C8/{s}": better.copy()}
        correct[f"Uniform soup/{s}"] = worse
    kinds = {"model_1": "individual", "model_2": "individual"}
    kinds |= {m: "soup" for m in ("Greedy soup", "MMS-C8", "Uniform soup")}
    return _acc_from(correct, kinds), correct


def _claims(*specs: tuple[str, str, str]) -> list[Claim]:
    return [Claim(m, v, axis, "test") for m, v, axis in specs]


def test_verdicts_of_this_run_follow_the_paired_bootstrap(run):
    acc, hits = run
    claims = _claims(
        ("Greedy soup", BEST, "ID"),  # +10 points on every example set: holds
        ("Uniform soup", BEST, AVG_OOD),  # -10 points: reversed
        ("MMS-C8", "Greedy soup", AVG_OOD),  # the same predictions: a tie
        ("Greedy ensemble", "Greedy soup", "ID"),  # not in this run
    )
    table = checklist(acc, hits, ID, SHIFTS, claims=claims)
    assert list(table["this run"]) == ["holds", "reversed", "tie (same predictions)", "n/a"]
    assert table["this run Δ"].iloc[0] == pytest.approx(10.0)
    assert table["this run Δ"].iloc[1] == pytest.approx(-10.0)
    lo, hi = (float(x) for x in table["this run 95% CI"].iloc[0].strip("[]").split(","))
    assert lo < 10 < hi and lo > 0
    assert "replicates" not in table  # no replicate study given: no replicate columns
    # the papers' column is MMS Table 1 as printed
    assert table["papers Δ"].iloc[0] == pytest.approx(81.03 - 80.38)


def test_replicate_columns_are_a_t_interval_of_the_per_replicate_differences(run):
    acc, hits = run
    gs = [1.0, 2.0, -0.5, 0.0, 1.5]  # Δ OOD of the greedy soup vs each replicate's best model
    mms = [1.0, 2.5, -0.5, 0.5, 1.0]
    rows = pd.DataFrame(
        [
            {"replicate": r, "method": m, "delta_id": 0.0, "delta_ood": d}
            for r in range(5)
            for m, d in (("Best individual", 0.0), ("Greedy soup", gs[r]), ("MMS-C8", mms[r]))
        ]
    )
    claims = _claims(("MMS-C8", "Greedy soup", AVG_OOD), ("Greedy soup", BEST, "ID"))
    table = checklist(acc, hits, ID, SHIFTS, replicates=rows, claims=claims)
    diff = np.subtract(mms, gs)  # 0, 0.5, 0, 0.5, -0.5
    half = stats.t.ppf(0.975, 4) * diff.std(ddof=1) / np.sqrt(5)
    first = table.iloc[0]
    assert first["replicates"] == 5
    assert first["replicates Δ mean"] == pytest.approx(round(diff.mean(), 2))
    assert first["replicates 95% CI"] == f"[{diff.mean() - half:+.2f}, {diff.mean() + half:+.2f}]"
    assert first["W–T–L"] == "2–2–1" and first["across replicates"] == "unclear"
    assert table.iloc[1]["across replicates"] == "tie (same predictions)"  # all Δ ID are 0


def test_the_committed_replicate_study_backs_the_readmes_claims():
    """What chapters 04 and 05 say in words, from figures/replicates.csv (committed)."""
    from pathlib import Path

    figures = Path(__file__).resolve().parents[1] / "figures"
    rows = replicate_study(figures, "embedded")
    assert rows is not None and replicate_study(figures, "smoke") is None
    table = _replicate_only(rows)
    verdicts = dict(zip(table.index, table["across replicates"]))
    assert verdicts["Greedy soup > Best individual on Avg OOD"] == "holds"
    assert verdicts["MMS-C8 > Best individual on Avg OOD"] == "holds"
    assert verdicts["Best individual > Uniform soup on ID"] == "holds"
    assert verdicts["MMS-C8 > Best individual on ID"] == "unclear"
    assert verdicts["MMS-C8 > Greedy soup on Avg OOD"] == "unclear"
    assert table.loc["MMS-C8 > Greedy soup on Avg OOD", "W–T–L"] == "0–4–4"
    assert set(table["this run"]) == {"n/a"}  # the run has none of the claims' rows


def _replicate_only(rows: pd.DataFrame) -> pd.DataFrame:
    """The checklist's replicate columns for every claim, from a run that has none of the rows."""
    empty = pd.DataFrame(
        {"method": ["model_1"] * 5, "kind": "individual", "set": list(SETS), "accuracy": 50.0}
    ).assign(n=N)
    hits = {f"model_1/{s}": np.zeros(N, bool) for s in SETS}
    return checklist(empty, hits, ID, SHIFTS, rows)


def test_beside_paper_puts_each_tables_own_differences_side_by_side(run):
    acc, _ = run
    ours = table1(acc, ID, SHIFTS)
    side = beside_paper(ours, ID)
    assert side.loc[BEST, "ours Δ ID"] == 0 and side.loc[BEST, "papers Δ OOD"] == 0
    assert side.loc["Greedy soup", "ours Δ ID"] == pytest.approx(10.0)
    paper = PAPER_TABLE1
    assert side.loc["MMS-C8", "papers Δ OOD"] == pytest.approx(
        round(paper.loc["MMS-C8", AVG_OOD] - paper.loc[BEST, AVG_OOD], 2)
    )
    assert "Second-best individual" in side.index  # rows of both tables only
