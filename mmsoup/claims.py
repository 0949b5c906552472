"""The papers' claims, checked: each claim → the papers' number → this run → the replicate study.

A claim compares two rows of MMS Table 1 on one axis (in-distribution top-1, or Avg OOD) and
says which is higher. The papers' difference comes from MMS Table 1 as printed
(`mmsoup.papers.PAPER_TABLE1`); this run's from its Table 1 with a paired-bootstrap 95% interval
(`mmsoup.table1.bootstrap_deltas`); the replicate study's from `figures/replicates.csv` (one
row per replicate and method, Δ against that replicate's best individual model), as a mean with
a 95% t-interval across replicates. One run is an example; the replicate column is the evidence.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmsoup.papers import PAPER_ID_SET, PAPER_TABLE1
from mmsoup.table1 import AVG_OOD, BEST, bootstrap_deltas

__all__ = [
    "CLAIMS",
    "Claim",
    "beside_paper",
    "checklist",
    "for_run",
    "mms_beside_ablation",
    "replicate_study",
]


@dataclass(frozen=True)
class Claim:
    """`method` is higher than `versus` on `axis` ('ID' or 'Avg OOD'), as a paper reports it."""

    method: str
    versus: str
    axis: str
    source: str
    figure2: bool = False  # a claim Figure 2 shows (a point above / right of another)

    @property
    def text(self) -> str:
        """The claim in words, e.g. 'Greedy soup > Best individual on ID'."""
        return f"{self.method} > {self.versus} on {self.axis}"


CLAIMS: tuple[Claim, ...] = (
    Claim("Greedy soup", BEST, "ID", "Soups §3.3, Table 1; MMS Table 1", figure2=True),
    Claim("Greedy soup", BEST, AVG_OOD, "Soups §3.3; MMS Table 1", figure2=True),
    Claim(BEST, "Uniform soup", "ID", "MMS Table 1 (the uniform soup's ImageNet dip)"),
    Claim("Uniform soup", BEST, AVG_OOD, "Soups §3.3; MMS Table 1", figure2=True),
    Claim("Greedy soup", "Uniform soup", "ID", "Soups §3.3 (why greedy)"),
    Claim("MMS-C8", BEST, "ID", "MMS abstract, §4 (+0.6 ImageNet)", figure2=True),
    Claim("MMS-C8", BEST, AVG_OOD, "MMS abstract, §4 (+3.5 Avg OOD)", figure2=True),
    Claim("MMS-C8", "Greedy soup", AVG_OOD, "MMS §4, Table 1"),
    Claim("MMS-C26", BEST, AVG_OOD, "MMS Table 1"),
    Claim("Greedy ensemble", "Greedy soup", "ID", "Soups Table 3; MMS Table 1"),
    Claim("Greedy soup", "Greedy ensemble", AVG_OOD, "Soups §3.3; MMS Table 1"),
)


def _paper_delta(claim: Claim) -> float:
    col = PAPER_ID_SET if claim.axis == "ID" else AVG_OOD
    rows = PAPER_TABLE1[col]
    return float(rows[claim.method] - rows[claim.versus])


def _run_delta(claim: Claim, deltas: pd.DataFrame | None) -> tuple[float, float, float]:
    """(Δ, lo, hi) for this run from its bootstrap against `claim.versus` (NaN when a row is absent)."""
    d = deltas
    if d is None or claim.method not in d.index:
        return math.nan, math.nan, math.nan
    col = "delta_id" if claim.axis == "ID" else "delta_ood"
    r = d.loc[claim.method]
    return float(r[col]), float(r[f"{col}_lo"]), float(r[f"{col}_hi"])


def _replicate_deltas(claim: Claim, rows: pd.DataFrame) -> np.ndarray:
    """Per replicate, method minus versus on the claim's axis (both are Δs vs that best model)."""
    col = "delta_id" if claim.axis == "ID" else "delta_ood"
    wide = rows.pivot(index="replicate", columns="method", values=col)
    if claim.method not in wide or claim.versus not in wide:
        return np.array([])
    return (wide[claim.method] - wide[claim.versus]).dropna().to_numpy(float)


def _t_interval(x: np.ndarray) -> tuple[float, float, float]:
    """The replicate study's 95% t-interval (`replicates.t_interval`); NaN bounds without a spread."""
    from mmsoup.replicates import t_interval

    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan, math.nan
    return t_interval(x)


def _verdict(lo: float, hi: float) -> str:
    """'holds' / 'reversed' when the 95% interval excludes zero, 'unclear' when it does not."""
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if lo == hi == 0:
        return "tie (same predictions)"
    return "holds" if lo > 0 else "reversed" if hi < 0 else "unclear"


def checklist(
    acc: pd.DataFrame,
    hits: Mapping[str, np.ndarray],
    id_set: str,
    shifts: Sequence[str],
    replicates: pd.DataFrame | None = None,
    claims: Sequence[Claim] = CLAIMS,
) -> pd.DataFrame:
    """One row per claim: the papers' Δ, this run's Δ [95% CI] and verdict, the replicates' likewise.

    Δ is `method − versus` in points. A verdict is 'holds' when the interval lies above zero,
    'reversed' when it lies below, 'unclear' when it crosses zero, 'tie' when the two rows made the
    same predictions (e.g. MMS kept the greedy soup's pair at λ = ½). W–T–L counts the replicates
    where the method was higher, equal, lower.
    """
    from mmsoup.errors import MMSoupError

    boots: dict[str, pd.DataFrame | None] = {}
    for versus in dict.fromkeys(c.versus for c in claims):  # one bootstrap per baseline
        try:
            boots[versus] = bootstrap_deltas(hits, acc, id_set, shifts, baseline=versus)
        except MMSoupError:  # the baseline is not in this run (e.g. a smoke run's recipes)
            boots[versus] = None
    out = []
    for c in claims:
        d, lo, hi = _run_delta(c, boots[c.versus])
        row = {
            "claim": c.text,
            "source": c.source,
            "papers Δ": round(_paper_delta(c), 2),
            "this run Δ": round(d, 2),
            "this run 95% CI": "" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]",
            "this run": _verdict(lo, hi),
        }
        if replicates is not None:
            x = _replicate_deltas(c, replicates)
            m, rlo, rhi = _t_interval(x)
            wins, losses = int((x > 0).sum()), int((x < 0).sum())
            row |= {
                "replicates": len(x),
                "replicates Δ mean": round(m, 2),
                "replicates 95% CI": "" if math.isnan(rlo) else f"[{rlo:+.2f}, {rhi:+.2f}]",
                "W–T–L": f"{wins}–{len(x) - wins - losses}–{losses}",
                "across replicates": _verdict(rlo, rhi),
            }
        out.append(row)
    return pd.DataFrame(out).set_index("claim")


def beside_paper(table: pd.DataFrame, id_set: str) -> pd.DataFrame:
    """This run's Table 1 beside MMS Table 1: ID and Avg OOD, each as Δ vs the best individual.

    The scales differ (ImageNet with CLIP ViT-B/32 against the embedded digits benchmark), so
    the absolute numbers are not comparable; the differences from each table's best individual
    model are what the papers' claims are about.
    """
    ours = table[[id_set, AVG_OOD]].astype(float)
    paper = PAPER_TABLE1[[PAPER_ID_SET, AVG_OOD]].astype(float)
    rows = [m for m in ours.index if m in paper.index]
    out = pd.DataFrame(index=pd.Index(rows, name="method"))
    out["papers ID"] = paper.loc[rows, PAPER_ID_SET]
    out["ours ID"] = ours.loc[rows, id_set]
    out["papers Avg OOD"] = paper.loc[rows, AVG_OOD]
    out["ours Avg OOD"] = ours.loc[rows, AVG_OOD]
    out["papers Δ ID"] = out["papers ID"] - paper.loc[BEST, PAPER_ID_SET]
    out["ours Δ ID"] = out["ours ID"] - ours.loc[BEST, id_set]
    out["papers Δ OOD"] = out["papers Avg OOD"] - paper.loc[BEST, AVG_OOD]
    out["ours Δ OOD"] = out["ours Avg OOD"] - ours.loc[BEST, AVG_OOD]
    return out.round(2)


def replicate_study(figures_dir: str | os.PathLike, profile: str) -> pd.DataFrame | None:
    """`figures_dir/replicates.csv` when it is the replicate study of `profile`, else None."""
    folder = Path(figures_dir)
    csv, md = folder / "replicates.csv", folder / "replicates.md"
    if not csv.is_file() or not md.is_file():
        return None
    if f"of the `{profile}` profile" not in md.read_text().split("\n", 1)[0]:
        return None  # another profile's study: its spread says nothing about this run
    return pd.read_csv(csv)


def for_run(
    profile: str,
    run_dir: str | os.PathLike,
    figures_dir: str | os.PathLike,
    claims: Sequence[Claim] = CLAIMS,
) -> pd.DataFrame:
    """`checklist` for a run folder, with the replicate study in `figures_dir` when it matches."""
    from mmsoup.context import id_set, shifts
    from mmsoup.results import load_results

    acc, hits = load_results(run_dir)
    reps = replicate_study(figures_dir, profile)
    return checklist(acc, hits, id_set(profile), shifts(profile), reps, claims)


def mms_beside_ablation(figures_dir: str | os.PathLike) -> pd.DataFrame:
    """MMS-C8 against greedy soup and the best model: the papers' one run (MMS Table 1) beside
    each condition of the conditions ablation (`figures_dir/ablation.csv`, `mmsoup.ablation`),
    points, with a 95% t-interval over the ablation's replicates. Only the papers' row when
    there is no ablation."""
    from mmsoup.ablation import interval, paired
    from mmsoup.papers import mms_vs_baselines

    paper = mms_vs_baselines().set_index("MMS-C8 minus")
    out = [
        {
            "source": "MMS paper (1 run, ImageNet)",
            "replicates": 1,
            "MMS − greedy, Avg OOD": f"{paper.loc['Greedy soup', 'Δ Avg OOD']:+.2f}",
            "MMS − greedy, ID": f"{paper.loc['Greedy soup', 'Δ ID (ImageNet)']:+.2f}",
            "MMS − best, Avg OOD": f"{paper.loc[BEST, 'Δ Avg OOD']:+.2f}",
        }
    ]
    csv = Path(figures_dir) / "ablation.csv"
    if csv.is_file():
        rows = pd.read_csv(csv)
        cols = {
            "MMS − greedy, Avg OOD": paired(rows, "MMS-C8", "Greedy soup", "delta_ood"),
            "MMS − greedy, ID": paired(rows, "MMS-C8", "Greedy soup", "delta_id"),
            "MMS − best, Avg OOD": paired(rows, "MMS-C8", BEST, "delta_ood"),
        }
        cols = {k: t.set_index("condition") for k, t in cols.items()}
        first = rows.groupby("condition", sort=False).first()
        for cond, t in cols["MMS − greedy, Avg OOD"].iterrows():
            f = first.loc[cond]
            rec = {
                "source": f"here: {cond} ({int(f['heldout_images']):,} held-out, "
                f"{int(f['budget'])} evaluations, {int(f['models'])} runs)",
                "replicates": int(t["replicates"]),
            }
            for name, table in cols.items():
                x = table.loc[cond]
                rec[name] = interval(x)
            out.append(rec)
    return pd.DataFrame(out).set_index("source")
