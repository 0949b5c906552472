"""What each chapter's run shows, in sentences written from its own numbers.

Every chapter ends with a section "What this run shows": a few sentences that a function here
writes from the files the run left behind (its sweep's sidecars and logs, its soups' records, its
accuracies, notebook 07's tables), so the words follow the numbers on any machine and any profile.
Each function returns a list of Markdown sentences; `markdown` joins them into a list.

sweep           chapter 01: are the runs good, and different from each other?
soups           chapter 02: what each recipe decided on this pool
evaluation      chapter 03: which shifts carry a soup's Avg OOD gain and which offset it
figure2         chapter 04: where the soups lie against the best model, and the figure's claims
table1          chapter 05: the papers' claims, this run and the replicate study
differences     chapter 05: why the embedded study differs from the papers (budget, pool, held-out)
why_soups       chapter 07: the five analyses of Soups §3.2 on this pool
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmsoup.results import HELDOUT_SET, by_set, method_kinds, ranked_individuals
from mmsoup.table1 import AVG_OOD

__all__ = [
    "differences",
    "evaluation",
    "figure2",
    "markdown",
    "soups",
    "sweep",
    "table1",
    "why_soups",
]


def markdown(sentences: Sequence[str], title: str | None = None) -> str:
    """The sentences as a Markdown list, under a bold lead-in when `title` is given."""
    head = f"**{title}**\n\n" if title else ""
    return head + "\n".join(f"- {s}" for s in sentences)


def _pts(x: float) -> str:
    """A signed difference in points, e.g. '+1.13'."""
    return f"{x:+.2f}"


def _list(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _points_word(n: float) -> str:
    return "point" if abs(n) == 1 else "points"


# -- chapter 01: the sweep ------------------------------------------------------------------------
def sweep(runs: pd.DataFrame, losses: pd.DataFrame | None = None) -> list[str]:
    """Chapter 01: how good the runs are against the LP init, and how different from each other.

    `runs` is `pipeline.finetune_stage`'s table (one row per model, `val_acc` a fraction,
    `augment` 'LP init' on model_0); `losses` is `analysis.training_losses` (may be empty).
    """
    out: list[str] = []
    if "val_acc" not in runs or runs["val_acc"].isna().all():
        return [
            "This pool records no held-out accuracies (released checkpoints without Soups' files)."
        ]
    is_lp = runs["augment"].eq("LP init") if "augment" in runs else runs["name"].eq("model_0")
    lp = runs[is_lp]
    tuned = runs[~is_lp].dropna(subset=["val_acc"])
    acc = 100 * tuned["val_acc"]
    best, worst = tuned.loc[acc.idxmax()], tuned.loc[acc.idxmin()]
    lp_acc = 100 * float(lp["val_acc"].iloc[0]) if len(lp) and lp["val_acc"].notna().all() else None
    text = (
        f"**Good?** The {len(tuned)} fine-tuned runs reach {acc.min():.2f}–{acc.max():.2f} % on "
        f"held-out (median {acc.median():.2f} %; best {best['name']}, worst {worst['name']})"
    )
    if lp_acc is not None:
        above = int((acc > lp_acc).sum())
        text += (
            f"; the LP init they all start from has {lp_acc:.2f} %, and {above} of "
            f"{len(tuned)} runs end above it (the best by {acc.max() - lp_acc:+.2f} points)"
        )
    out.append(text + ".")
    diffs = []
    if "lr" in tuned and tuned["lr"].notna().all():
        lr = tuned["lr"].astype(float)
        diffs.append(
            f"learning rates span {lr.max() / lr.min():.1f}× ({lr.min():.1e} to {lr.max():.1e})"
        )
    if "augment" in tuned:
        counts = tuned["augment"].value_counts()
        diffs.append(_list([f"{n} with {a} augmentation" for a, n in counts.items()]))
    if "epochs" in tuned and tuned["epochs"].notna().all():
        e = tuned["epochs"].astype(int)
        diffs.append(
            f"{e.min()}–{e.max()} epochs"
            if e.min() != e.max()
            else f"{e.min()} epoch{'s' if e.min() != 1 else ''} each"
        )
    if "mixup_alpha" in tuned:
        mix = int((tuned["mixup_alpha"].astype(float) > 0).sum())
        diffs.append(f"mixup in {mix} of {len(tuned)}")
    spread = acc.max() - acc.min()
    close = int((acc >= acc.max() - 1.0).sum())
    out.append(
        f"**Different?** In their hyper-parameters, yes: {'; '.join(diffs)}. In held-out "
        f"accuracy they differ by {spread:.2f} points from best to worst, and {close} of "
        f"{len(tuned)} lie within one point of the best: "
        + (
            "a pool of similar, good models, what a soup needs."
            if close >= len(tuned) / 2
            else "a pool where most runs are clearly behind the best one."
        )
        + " Whether their *errors* differ shows in chapter 07 (ensembles and update angles)."
    )
    if losses is not None and not losses.empty:
        last = losses.sort_values("step").groupby("name").last()["loss"]
        low = losses.groupby("name")["loss"].min()
        rising = [n for n in last.index if last[n] > 1.5 * low[n] + 0.1]
        if rising:
            names = _list(rising)
            accs = _list(
                [
                    f"{100 * float(runs.loc[runs['name'] == n, 'val_acc'].iloc[0]):.2f} %"
                    for n in rising
                ]
            )
            out.append(
                f"**The curves.** Each point is the loss of one mini-batch (logged every 50 steps), "
                f"with mixup and label smoothing drawing soft targets per batch, so the curves are "
                f"noisy: {names} end{'s' if len(rising) == 1 else ''} on a batch whose loss is above "
                f"its lowest ({', '.join(f'{last[n]:.2f} vs {low[n]:.2f}' for n in rising)}), "
                f"yet the finished run{'s score' if len(rising) > 1 else ' scores'} {accs} on "
                "held-out: one hard batch, not a run that diverged."
            )
        else:
            out.append(
                "**The curves.** Every plotted run ends near its lowest logged loss (each point is "
                "one mini-batch's loss, so the curves are noisy)."
            )
    return out


# -- chapter 02: the soups ------------------------------------------------------------------------
def _record(run_dir: Path, file: str) -> dict | None:
    """A soup's record from its sidecar (`x.json` beside `x.safetensors`) or an ensemble's JSON."""
    path = run_dir / "soups" / Path(file).with_suffix(".json").name
    return json.loads(path.read_text()) if path.is_file() else None


def soups(run_dir: str | os.PathLike) -> list[str]:
    """Chapter 02: what each recipe decided on this pool, from the soup stage's records."""
    from mmsoup.recipes import RECIPES

    run_dir = Path(run_dir)
    accs = json.loads((run_dir / "soups" / "ingredient_val_accs.json").read_text())
    n = len(accs)
    best = int(np.argmax(accs))
    best_acc = 100 * accs[best]
    recs = {r.name: rec for r in RECIPES if (rec := _record(run_dir, r.file)) is not None}
    out = [f"**The pool.** {n} models; the best on held-out is model_{best} ({best_acc:.2f} %)."]

    def vs(rec: dict) -> str:
        d = 100 * rec["val_acc"] - best_acc
        return f"{100 * rec['val_acc']:.2f} % ({_pts(d)} against model_{best})"

    if "Uniform soup" in recs:
        out.append(
            f"**Uniform soup.** The average of all {n} models: {vs(recs['Uniform soup'])} on held-out"
            + (
                ": averaging every run, weak ones included, costs accuracy here."
                if recs["Uniform soup"]["val_acc"] * 100 < best_acc
                else "."
            )
        )
    greedy = recs.get("Greedy soup")
    if greedy is not None:
        kept = [f"model_{i}" for i in greedy["ingredients"]]
        out.append(
            f"**Greedy soup.** It kept {len(kept)} of {n} models ({_list(kept)}): {vs(greedy)}; "
            f"every other candidate made the soup worse or no better on held-out."
        )
    mms = {k: v for k, v in recs.items() if k.startswith("MMS-")}
    if mms:
        rows = []
        for name, rec in mms.items():
            c = pd.Series([d["decision"] for d in rec["info"]["decisions"]]).value_counts()
            rows.append((name, int(c.get("accepted", 0)), int(c.get("rejected", 0)),
                         int(c.get("skipped", 0)), 100 * rec["val_acc"], rec["ingredients"]))  # fmt: skip
        cand = n - 1
        skipped = {r[3] for r in rows}
        if len(skipped) == 1:
            k = skipped.pop()
            text = (
                f"**Manifold mixing.** In every one of the {len(rows)} MMS soups the τ test "
                f"skipped {k} of the {cand} candidates: their plain average with Ψ fell below "
                f"τ·acc(Ψ), so no λ was searched for them"
            )
        else:
            text = "**Manifold mixing.** The τ test skipped " + _list(
                [f"{r[3]} of {cand} candidates in {r[0]}" for r in rows]
            )
        searched = sorted({i for r in rows for i in r[5]} - {best})
        text += (
            f". The candidates searched and accepted: {_list([f'model_{i}' for i in searched])}"
            if searched
            else ". No candidate was accepted"
        )
        text += ". Held-out top-1: " + "; ".join(f"{r[0]} {r[4]:.2f} %" for r in rows)
        if greedy is not None:
            g = 100 * greedy["val_acc"]
            same = [r[0] for r in rows if sorted(r[5]) == sorted(greedy["ingredients"])]
            higher = [r[0] for r in rows if r[4] > g + 1e-9]
            text += (
                f". {len(same)} of {len(rows)} mixed the same models as the greedy soup"
                f"{' (' + _list(same) + ')' if 0 < len(same) < len(rows) else ''}; "
                + (
                    f"{_list(higher)} beat{'s' if len(higher) == 1 else ''} its {g:.2f} % on "
                    f"held-out by choosing λ per component"
                    if higher
                    else f"none beat its {g:.2f} % on held-out"
                )
            )
        out.append(text + ".")
        lam = []
        for name, rec in mms.items():
            steps = [d for d in rec["info"]["decisions"] if d["decision"] == "accepted"]
            for d in steps:
                if "lambdas" in d:
                    lam.append((name, d["candidate"], np.asarray(d["lambdas"], float)))
        if lam:
            lo = min(float(x.min()) for *_, x in lam)
            hi = max(float(x.max()) for *_, x in lam)
            out.append(
                f"**λ\\*.** Over the {len(lam)} accepted steps, λ\\* per component ranges from "
                f"{lo:.2f} to {hi:.2f} (0.5 is the plain average of two models; 1 keeps Ψ, 0 takes "
                "the candidate)."
            )
    extra = []
    if "Learned soup" in recs:
        extra.append(f"the learned soup {vs(recs['Learned soup'])}")
    if "WiSE-FT" in recs:
        w = recs["WiSE-FT"]
        extra.append(f"WiSE-FT (α = {w['alpha']:g}) {vs(w)}")
    said = {"Uniform soup", "Greedy soup", *mms, "Learned soup", "WiSE-FT"}
    for name, r in recs.items():  # a recipe without a sentence of its own: its held-out number
        k = len(r["ingredients"])
        models = f"{k} model{'s' if k != 1 else ''}"
        if name in said:
            continue
        if r.get("info", {}).get("recipe", "").endswith("ensemble"):
            extra.append(f"the {name.lower()} of {models} {vs(r)}")
        else:
            extra.append(f"{name}, a soup of {models}, {vs(r)}")
    if extra:
        out.append("**The others.** " + "; ".join(extra)[0:1].upper() + "; ".join(extra)[1:] + ".")
    out.append(
        "Held-out is what the recipes optimise, so these numbers flatter them; chapter 03 scores "
        "them on the test sets."
    )
    return out


# -- chapter 03: evaluation ------------------------------------------------------------------------
def evaluation(
    acc: pd.DataFrame, id_set: str, shifts: Sequence[str], methods: Sequence[str] | None = None
) -> list[str]:
    """Chapter 03: each soup against the best model (chosen on held-out), set by set.

    For each method, the shifts whose gain carries its Avg OOD difference and those that offset
    it (Avg OOD is the mean of the shifts, so each shift adds a fifth of its own difference).
    """
    kinds = method_kinds(acc)
    ranked = ranked_individuals(acc) if HELDOUT_SET in set(acc["set"]) else []
    if not ranked:
        return ["No held-out accuracies: the best individual model cannot be chosen."]
    base = ranked[0]
    wide = by_set(acc, [id_set, *shifts])
    wide[AVG_OOD] = wide[list(shifts)].mean(axis=1)
    if methods is None:
        order = ["Greedy soup", "Uniform soup", "MMS-C8", "Ensemble"]
        methods = [m for m in order if m in wide.index and kinds.get(m) != "individual"]
    b = wide.loc[base]
    out = [
        f"**The baseline** is {base}, the best individual model on held-out: {b[id_set]:.2f} % "
        f"on {id_set}, {b[AVG_OOD]:.2f} % Avg OOD."
    ]
    seen: dict[tuple, str] = {}
    for m in methods:
        d = wide.loc[m] - b
        key = tuple(np.round(wide.loc[m].to_numpy(float), 6))
        if key in seen:
            out.append(f"**{m}** has the same accuracy as {seen[key]} on every set.")
            continue
        seen[key] = m
        per = d[list(shifts)]
        up = per[per > 0].sort_values(ascending=False)
        down = per[per < 0].sort_values()
        carry = _list([f"{s} ({_pts(v)})" for s, v in up.items()]) or "no shift"
        offset = _list([f"{s} ({_pts(v)})" for s, v in down.items()]) or "no shift"
        text = (
            f"**{m}**: {_pts(d[AVG_OOD])} points Avg OOD and {_pts(d[id_set])} on {id_set}. "
            f"Carried by {carry}; offset by {offset}."
        )
        if len(up) and len(down):
            share = up.iloc[0] / len(shifts)
            text += (
                f" The largest gain alone, {up.index[0]}, adds {share:+.2f} points to Avg OOD "
                f"(a fifth of it, with {len(shifts)} shifts)."
            )
        out.append(text)
    best_by = {s: wide.drop(index=[i for i in wide.index if kinds.get(i) == "init"])[s].idxmax()
               for s in [id_set, *shifts]}  # fmt: skip
    out.append(
        "**Best on each set**: "
        + "; ".join(f"{s}: {m} ({wide.loc[m, s]:.2f} %)" for s, m in best_by.items())
        + ". No one method wins everywhere: a shift rewards what another punishes."
        if len(set(best_by.values())) > 1
        else f"**Best on every set**: {next(iter(best_by.values()))}."
    )
    return out


# -- chapter 04: Figure 2 ---------------------------------------------------------------------------
def figure2(
    acc: pd.DataFrame,
    id_set: str,
    shifts: Sequence[str],
    checks: pd.DataFrame,
    shown: Sequence[str] = ("Greedy soup", "Uniform soup", "MMS-C8"),
) -> list[str]:
    """Chapter 04: where the soups lie against the best model, and the figure's claims checked.

    `checks` is `claims.checklist` (or `claims.for_run`) over the Figure 2 claims.
    """
    ranked = ranked_individuals(acc)
    base = ranked[0]
    wide = by_set(acc, [id_set, *shifts])
    wide[AVG_OOD] = wide[list(shifts)].mean(axis=1)
    b = wide.loc[base]
    out = [
        f"**The best individual model** ({base}, chosen on held-out) sits at {b[id_set]:.2f} % "
        f"{id_set}, {b[AVG_OOD]:.2f} % Avg OOD."
    ]
    told: set[str] = set()
    for m in shown:
        if m not in wide.index or m in told:
            continue
        r = wide.loc[m]
        dx, dy = r[id_set] - b[id_set], r[AVG_OOD] - b[AVG_OOD]
        where = [
            "to the right" if dx > 0 else "to the left" if dx < 0 else "level in ID",
            "above" if dy > 0 else "below" if dy < 0 else "level in Avg OOD",
        ]
        same = [
            o
            for o in wide.index
            if o != m and np.allclose(wide.loc[o, [id_set, AVG_OOD]], r[[id_set, AVG_OOD]])
        ]
        text = (
            f"**{m}** lies {where[0]} ({_pts(dx)} points ID) and {where[1]} ({_pts(dy)} points "
            f"Avg OOD) of it"
        )
        if same:
            text += f"; {_list(same)} share{'s' if len(same) == 1 else ''} its point exactly"
            told |= set(same)
        out.append(text + ".")
    out += _claim_sentences(checks)
    return out


def _claim_sentences(checks: pd.DataFrame) -> list[str]:
    """One sentence per verdict across replicates (or this run's, without a replicate study)."""
    col = "across replicates" if "across replicates" in checks else "this run"
    out = []
    n = len(checks)
    for verdict in ("holds", "reversed", "unclear", "tie (same predictions)", "n/a"):
        rows = checks[checks[col] == verdict]
        if rows.empty:
            continue
        parts = []
        for claim, r in rows.iterrows():
            s = f"{claim} (papers {_pts(r['papers Δ'])}; this run {_pts(r['this run Δ'])} {r['this run 95% CI']}"
            if col == "across replicates":
                s += f"; replicates {_pts(r['replicates Δ mean'])} {r['replicates 95% CI']}, W–T–L {r['W–T–L']}"
            parts.append(s + ")")
        label = {
            "holds": "hold",
            "reversed": "are reversed",
            "unclear": "are unclear (the interval crosses zero)",
            "tie (same predictions)": "are ties (the same predictions)",
            "n/a": "cannot be checked here",
        }[verdict]
        where = "across replicates" if col == "across replicates" else "in this run"
        out.append(f"**{len(rows)} of {n} claims {label} {where}**: " + "; ".join(parts) + ".")
    if col == "across replicates":
        flip = checks[
            (checks["this run"] != checks[col]) & checks["this run"].isin(["holds", "reversed"])
        ]
        if len(flip):
            out.append(
                "This run alone would say "
                + _list([f"“{c}” {r['this run']}" for c, r in flip.iterrows()])
                + ", which the replicate study does not confirm: one run is an example, not evidence."
            )
    return out


# -- chapter 05: Table 1 ----------------------------------------------------------------------------
def table1(checks: pd.DataFrame) -> list[str]:
    """Chapter 05: every claim of the papers, grouped by what the replicate study says."""
    return _claim_sentences(checks)


def differences(profile: str, run_dir: str | os.PathLike) -> list[str]:
    """Chapter 05: why the study differs from the papers, each number read from the run or a profile.

    The MMS budget, the pool, the held-out split's resolution and the τ test's decisions of this
    run, beside the paper profile's (CLIP ViT-B/32, the 72 released checkpoints, ImageNet).
    """
    from mmsoup.papers import PAPER_SET_SIZES
    from mmsoup.profiles import get_profile
    from mmsoup.recipes import RECIPES
    from mmsoup.results import load_results

    run_dir = Path(run_dir)
    prof, paper = get_profile(profile), get_profile("paper")
    acc, _ = load_results(run_dir)
    held = acc[acc["set"] == HELDOUT_SET]
    n_held = int(held["n"].iloc[0]) if "n" in held and len(held) else None
    accs_file = run_dir / "soups" / "ingredient_val_accs.json"
    pool = len(json.loads(accs_file.read_text())) if accs_file.is_file() else None
    out = []
    mms = [r for r in RECIPES if r.name.startswith("MMS-")]
    recs = {r.name: rec for r in mms if (rec := _record(run_dir, r.file)) is not None}
    evals = [rec["n_evals"] for rec in recs.values()]
    text = (
        f"**Budget.** MMS searches λ with {prof.mms_budget} Nevergrad evaluations per candidate "
        f"here, {paper.mms_budget} in the paper"
    )
    if evals:
        text += (
            f"; this run's MMS soups spent {min(evals)}–{max(evals)} held-out evaluations each, "
            "all candidates together"
        )
    out.append(text + ".")
    if pool is not None:
        out.append(
            f"**Pool.** {pool} models (the LP init and {pool - 1} fine-tuning runs) against the "
            f"paper's {paper.n_runs + 1}: fewer candidates to mix, and fewer chances that one "
            "of them helps."
        )
    if n_held:
        paper_held = PAPER_SET_SIZES[HELDOUT_SET]
        out.append(
            f"**Held-out resolution.** The soups are chosen on {n_held:,} held-out images, so one "
            f"image is {100 / n_held:.2g} points and a recipe can only move in steps of that size; "
            f"the paper's held-out split has {paper_held:,} images ({100 / paper_held:.2g} points "
            "per image). A mixing step that would gain less than one image here is invisible "
            "to the search and to the τ test."
        )
    if recs:
        per = []
        for name, rec in recs.items():
            d = pd.Series([x["decision"] for x in rec["info"]["decisions"]]).value_counts()
            per.append((name, int(d.get("skipped", 0)), len(rec["info"]["decisions"])))
        counts = {(s, c) for _, s, c in per}
        if len(counts) == 1:
            s, c = counts.pop()
            out.append(
                f"**The τ test.** In all {len(per)} MMS soups of this run, {s} of the {c} "
                f"candidates were skipped by the τ test (τ = "
                f"{next(iter(recs.values()))['info']['params']['tau']}): only "
                f"{c - s} candidate{'s were' if c - s != 1 else ' was'} ever searched, so MMS "
                "had almost nothing to mix beyond what the greedy soup kept."
            )
        else:
            out.append(
                "**The τ test.** Candidates skipped: "
                + "; ".join(f"{name} {s} of {c}" for name, s, c in per)
                + "."
            )
    out.append(
        "Chapter 09 changes these conditions one at a time (held-out resolution, budget, pool "
        "size) and measures what each does to MMS against the greedy soup."
    )
    return out


# -- chapter 07: why soups work ----------------------------------------------------------------------
def why_soups(
    tables: Mapping[str, pd.DataFrame],
    meta: Mapping | None = None,
    images: int | None = None,
    seconds: float | None = None,
) -> list[str]:
    """Chapter 07: what each of the five analyses showed on this pool (from `analysis.load_tables`).

    `images` is the examples per evaluation set (one example is 100/images points); `seconds`
    the chapter's own wall time, when it measured it.
    """
    meta = dict(meta or {})
    out = []
    res = f" (one example is {100 / images:.2g} points)" if images else ""
    if "landscape" in tables:
        t = tables["landscape"].set_index("point")
        e = t["error"]
        title = meta.get("landscape_title", "")
        pair = title.split(":")[0] if title else "θ_a, θ_b"
        mid, ends = e["average"], (e["θ_a"], e["θ_b"])
        verdict = (
            "lower than both endpoints: the midpoint beats both, as in Soups Fig. 2"
            if mid < min(ends)
            else "between the endpoints' errors: inside the basin, but not better than the better endpoint"
            if mid <= max(ends)
            else f"higher than both endpoints (by {mid - max(ends):.2f} points over the worse one): "
            "the midpoint does not beat both, as it does in Soups Fig. 2"
        )
        dist = math.dist(
            (t.loc["θ_a", "x"], t.loc["θ_a", "y"]), (t.loc["θ_b", "x"], t.loc["θ_b", "y"])
        )
        out.append(
            f"**(a)** {pair}: held-out error {e['θ_a']:.2f} % and {e['θ_b']:.2f} %, θ_0 "
            f"{e['θ_0']:.2f} %; the two models are {dist:.1f} apart in parameter space. Their "
            f"average has {mid:.2f} % error, {verdict}."
        )
    if "pairs" in tables:
        p = tables["pairs"]
        rho = p["angle"].corr(p["advantage"], method="spearman")
        strength = "no" if abs(rho) < 0.2 else "a weak" if abs(rho) < 0.5 else "a clear"
        sign = "" if strength == "no" else " positive" if rho > 0 else " negative"
        out.append(
            f"**(b)** Over {len(p)} pairs the angle between updates ranges from "
            f"{p['angle'].min():.0f}° to {p['angle'].max():.0f}° and the interpolation advantage "
            f"from {p['advantage'].min():+.2f} to {p['advantage'].max():+.2f} points (mean "
            f"{p['advantage'].mean():+.2f}, positive in {int((p['advantage'] > 0).sum())}). "
            f"Spearman ρ = {rho:.2f}: {strength}{sign} relation"
            + (", the trend of Soups Fig. 3" if strength != "no" and rho > 0 else "")
            + f"{res}."
        )
        gap = p["ensemble"] - p["soup"]
        text = (
            f"**(c)** The ensemble of a pair is at least as accurate as its soup in "
            f"{int((gap >= 0).sum())} of {len(p)} pairs (gap {gap.min():+.2f} to {gap.max():+.2f} "
            f"points, mean {gap.mean():+.2f})"
        )
        if "pair_lr" in p:
            thirds = gap.groupby(pd.qcut(p["pair_lr"], 3, labels=False, duplicates="drop")).mean()
            text += (
                "; by learning rate, lowest to highest third: "
                + ", ".join(_pts(v) for v in thirds)
                + (
                    ": the ensemble's lead rises with learning rate, the direction of Soups Fig. 4"
                    if thirds.is_monotonic_increasing and len(thirds) > 1
                    else ": no steady growth with learning rate"
                )
                + f"; the pairs' learning rates span {p['pair_lr'].max() / p['pair_lr'].min():.1f}×"
            )
        out.append(text + ".")
    if "random_order" in tables:
        c = tables["random_order"]
        mean = c.groupby("k").mean(numeric_only=True)
        last = mean.iloc[-1]
        text = (
            f"**(d)** With all {int(mean.index[-1])} models, the greedy soup keeps "
            f"{last['greedy_size']:.1f} on average and scores {last['greedy']:.2f} % on held-out "
            f"against the best model's {last['best']:.2f} % and the uniform soup's "
            f"{last['uniform']:.2f} %"
        )
        if "greedy_test" in mean:
            above = mean.index[mean["greedy_test"] > mean["best_test"] + 1e-9].tolist()
            below = mean.index[mean["greedy_test"] < mean["best_test"] - 1e-9].tolist()
            u_below = mean.index[mean["uniform_test"] < mean["best_test"] - 1e-9].tolist()
            text += (
                f". On the ID test subset: greedy {last['greedy_test']:.2f} %, uniform "
                f"{last['uniform_test']:.2f} %, best model {last['best_test']:.2f} %; greedy is "
                f"above the best model at {len(above)} and below it at {len(below)} of "
                f"{len(mean)} pool sizes, the uniform soup below it at {len(u_below)}"
            )
            held_ok = (mean["greedy"] >= mean["best"] - 1e-9).all()
            text += (
                ". Soups Fig. B.1's order (greedy above the best model, uniform below) "
                + (
                    "holds"
                    if len(below) == 0 and len(above) > 0 and len(u_below) > 0
                    else "does not hold on test here"
                )
                + (" (on held-out greedy never falls below by construction)" if held_ok else "")
            )
        out.append(text + ".")
    if "wise" in tables:
        w = tables["wise"]
        curves = w[w["kind"] == "WiSE-FT"]
        init = curves[curves["alpha"] == 0.0].iloc[0]
        bows = []
        for name, g in curves.groupby("curve", sort=False):
            g = g.set_index("alpha")
            inner = g.drop(index=[0.0, 1.0], errors="ignore")
            if len(inner) and (inner["ID"].max() > g.loc[1.0, "ID"]):
                a = inner["ID"].idxmax()
                bows.append(
                    f"{name} (α = {a:g}: {inner.loc[a, 'ID']:.2f} vs {g.loc[1.0, 'ID']:.2f} % at α = 1)"
                )
        text = (
            f"**(e)** The WiSE-FT curves start at θ_0 ({init['ID']:.2f} % ID, {init['OOD']:.2f} % "
            f"avg OOD). "
            + (
                f"An interior α beats the fine-tuned model on ID for {_list(bows)}."
                if bows
                else "No interior α beats its fine-tuned model on ID."
            )
        )
        for _, s in w[w["kind"] == "soup"].iterrows():
            dominated = curves[(curves["ID"] >= s["ID"]) & (curves["OOD"] >= s["OOD"])]
            text += f" The {s['curve'].lower()} ({s['ID']:.2f} % ID, {s['OOD']:.2f} % OOD) " + (
                "lies beyond every curve: no point of any curve is as good on both axes."
                if dominated.empty
                else f"is matched or beaten on both axes by {len(dominated)} curve point(s) "
                f"(e.g. {dominated.iloc[0]['curve']} at α = {dominated.iloc[0]['alpha']:g})."
            )
        out.append(text)
    cost = []
    if "landscape" in tables:
        cost.append(len(tables["landscape"]))
    if "pairs" in tables:
        cost.append(len(tables["pairs"]))  # one soup per pair (the ensembles reuse logits)
    if "random_order" in tables:
        cost.append(int(tables["random_order"].shape[0]))
    if "wise" in tables:
        cost.append(len(tables["wise"]))
    if seconds is not None:
        out.append(
            f"The chapter made about {sum(cost)} evaluations"
            + (f" of {images} examples per set" if images else "")
            + f" and took {_duration(seconds)} on this machine."
        )
    return out


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"
