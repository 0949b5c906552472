"""The conditions ablation: is "MMS ≈ greedy soup" a property of MMS or of the embedded study?

The embedded study differs from MMS's conditions in three ways (MMS §4, and the author's logged C8
run in tests/fixtures/author_c8_run.json): its held-out objective has 1,000 images (0.1 points per
image; the paper's 26,000 ImageNet images: 0.004), MMS gets 60 evaluations per pass (the paper
~250, the author's run 240) and the pool has 12 fine-tuned runs (the paper 71). Each condition
below changes one of them, or all three (`paper`), and keeps everything else of the embedded
study: the backbone, the LP init, the search space, the test set and the five shifts.

Per replicate r (sweep seed r, as `mmsoup.replicates`), one 24-run sweep per held-out size is
fine-tuned once and shared: a 12-run condition takes its first 12 runs, which are exactly the
12-run sweep of seed r (`mmsoup.sweep.random_search` draws run by run). Uniform soup, greedy soup
and MMS-C8 (the paper's MMS row; `--recipes` adds e.g. MMS-C26) are built on each condition's
held-out set; the best individual model (chosen on held-out) and each soup are scored on the ID
test set and the shifts. Everything is resumable: a condition of a replicate is done when its
`ablation.json` exists.

`figures/ablation.csv` has one row per (condition, replicate, method): Δ against that replicate's
best model, how many candidates MMS optimised (passed the τ test), the share of MMS's accepted
steps whose λ* left the start point, and the condition's held-out size, budget and pool size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmsoup.errors import MMSoupError
from mmsoup.io import atomic_path, write_json, write_text
from mmsoup.recipes import ABLATION

DONE = "ablation.json"
METHODS = ABLATION  # the recipes of every condition (mmsoup.recipes)
BEST = "Best individual"
BASE = "embedded"
# Nothing of the embedded profile's process settings changes: the backbone and LP init are the
# study's own (pretrained on `threads` = 2; another count is another backbone), soups run on 2
# threads and each sweep on 2 one-thread processes, so one replicate at a time fills 2 cores.
PROCESS: dict[str, int] = {}


@dataclass(frozen=True)
class Condition:
    """One setting of the ablation: profile overrides on top of the embedded study."""

    name: str
    what: str
    overrides: dict[str, int]


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("today", "the embedded study: 1,000 held-out, 60 evaluations, 12 runs", {}),
        Condition(
            "heldout", "2,000 held-out images (1,000 moved out of train)", {"heldout_images": 2000}
        ),
        Condition("budget", "250 evaluations per MMS pass", {"mms_budget": 250}),
        Condition("models", "24 fine-tuned runs", {"n_runs": 24}),
        Condition(
            "paper",
            "all three: 2,000 held-out, 250 evaluations, 24 runs",
            {"heldout_images": 2000, "mms_budget": 250, "n_runs": 24},
        ),
    )
}


def setting(condition: str, base: str = BASE) -> dict[str, int]:
    """Held-out images, MMS budget and pool size of a condition (the profile's values)."""
    from mmsoup.profiles import get_profile

    prof = get_profile(spec(condition, 0, base))
    return {"heldout_images": prof.heldout_images, "budget": prof.mms_budget, "models": prof.n_runs}


def spec(condition: str, r: int, base: str = BASE, **extra: int) -> str:
    """The profile spec of a condition's replicate r (sweep seed r, one thread per process)."""
    if condition not in CONDITIONS:
        raise MMSoupError(f"Unknown condition {condition!r}; pick from {', '.join(CONDITIONS)}.")
    fields = {"search_seed": r, **PROCESS, **CONDITIONS[condition].overrides, **extra}
    sep = "," if ":" in base else ":"
    return base + sep + ",".join(f"{k}={v}" for k, v in fields.items())


def _pool_spec(conditions: Sequence[str], held: int, r: int, base: str) -> str:
    """The shared sweep of held-out size `held`: as many runs as its largest condition needs."""
    from mmsoup.profiles import get_profile

    same = [c for c in conditions if setting(c, base)["heldout_images"] == held]
    n = max(get_profile(spec(c, r, base)).n_runs for c in same)
    return spec(same[0], r, base, n_runs=n)


def run_replicate(
    r: int,
    root: str | os.PathLike,
    conditions: Sequence[str] = tuple(CONDITIONS),
    recipes: Sequence[str] = METHODS[:3],
    base: str = BASE,
    results: str | os.PathLike | None = None,
) -> list[Path]:
    """Replicate r of every condition (resumable): the shared sweeps, the soups, the scores."""
    from mmsoup import pipeline

    root, out = Path(root), []
    helds = sorted({setting(c, base)["heldout_images"] for c in conditions})
    for held in helds:  # one sweep per held-out size, then its conditions
        todo = [c for c in conditions if setting(c, base)["heldout_images"] == held]
        if all((root / c / f"r{r}" / DONE).is_file() for c in todo):
            out += [root / c / f"r{r}" for c in todo]
            continue
        pool_dir = root / "pools" / f"h{held}" / f"r{r}"
        pool = _pool_spec(conditions, held, r, base)
        _log(f"ablation r{r}: sweep {pool}")
        pipeline.finetune_stage(pool, pool_dir)
        if results is not None:  # the sweep's wall time, for the cost of each condition
            dest = Path(results) / "pools" / f"h{held}" / f"r{r}" / "timings.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as tmp:
                shutil.copyfile(pool_dir / "timings.json", tmp)
        for c in todo:
            out.append(run_condition(c, r, root, pool_dir, recipes, base, results))
    return out


def run_condition(
    condition: str,
    r: int,
    root: Path,
    pool_dir: Path,
    recipes: Sequence[str],
    base: str = BASE,
    results: str | os.PathLike | None = None,
) -> Path:
    """One condition of replicate r: link its pool, build its soups, score them; publish."""
    from mmsoup import pipeline
    from mmsoup.checkpoints import sidecar_path
    from mmsoup.determinism import machine_info, pinned
    from mmsoup.profiles import get_profile

    s = spec(condition, r, base)
    run_dir = root / condition / f"r{r}"
    if not (run_dir / DONE).is_file():
        start = time.perf_counter()
        _log(f"ablation r{r}: {condition} ({s})")
        sweep = run_dir / "sweep"
        sweep.mkdir(parents=True, exist_ok=True)
        for k in range(get_profile(s).n_runs + 1):  # model_0 (LP init) .. model_n of the pool
            for src in (pool_dir / "sweep" / f"model_{k}.safetensors",):
                for f in (src, sidecar_path(src)):
                    link = sweep / f.name
                    if not link.exists():
                        link.symlink_to(os.path.relpath(f, sweep))
        pipeline.soup_stage(s, run_dir, tuple(recipes))
        t_soups = time.perf_counter() - start
        with pinned(get_profile(s).threads):
            score(s, run_dir)
        write_json(
            run_dir / DONE,
            {
                "condition": condition,
                "replicate": r,
                "profile": s,
                "soup_seconds": round(t_soups, 1),
                "seconds": round(time.perf_counter() - start, 1),
                "machine": machine_info(),
            },
        )
    land = run_dir / "results" / "landscape.csv"
    if r == 0 and "MMS-C8" in recipes and not land.is_file():  # replicate 0's, for chapter 09
        try:
            table = landscape(s, run_dir)
        except MMSoupError:  # MMS accepted no candidate: no step to draw
            table = None
        if table is not None:
            with atomic_path(land) as tmp:
                table.to_csv(tmp, index=False)
    if results is not None:
        publish(run_dir, Path(results) / condition / f"r{r}")
    return run_dir


def score(profile: str, run_dir: Path) -> pd.DataFrame:
    """Held-out accuracy of every model (from the soup stage), and the ID test set and shifts of
    the best individual model and of each soup: run_dir/results/accuracy.csv."""
    from mmsoup.checkpoints import load_state_dict
    from mmsoup.context import context, ingredient_paths
    from mmsoup.results import HELDOUT_SET

    paths = ingredient_paths(profile, run_dir)
    soups = run_dir / "soups"
    accs = json.loads((soups / "ingredient_val_accs.json").read_text())
    summary = pd.read_csv(soups / "summary.csv")
    best = 1 + int(np.argmax(accs[1:]))  # the first of equal maxima, as results.ranked_individuals
    ctx = context(profile)
    n_held = ctx.evaluators[HELDOUT_SET].n
    rows = [
        {"method": p.stem, "kind": "init" if i == 0 else "individual", "set": HELDOUT_SET}
        | {"accuracy": 100 * a, "n": n_held}
        for i, (p, a) in enumerate(zip(paths, accs))
    ]
    rows += [
        {"method": m, "kind": "soup", "set": HELDOUT_SET, "accuracy": v, "n": n_held}
        for m, v in zip(summary["method"], summary["val_acc"])
    ]
    scored = [(paths[best].stem, "individual", paths[best])]
    scored += [(m, "soup", soups / f) for m, f in zip(summary["method"], summary["file"])]
    for s in ctx.test_sets:
        ev = ctx.evaluators[s]
        for name, kind, src in scored:
            ev.load(load_state_dict(src))
            rows.append(
                {"method": name, "kind": kind, "set": s, "accuracy": 100 * ev.accuracy(), "n": ev.n}
            )
        ctx.evaluators.release(s)
    acc = pd.DataFrame(rows)
    with atomic_path(run_dir / "results" / "accuracy.csv") as tmp:
        acc.to_csv(tmp, index=False)
    return acc


PUBLISHED = ("ablation.json", "results/accuracy.csv", "soups/summary.csv")


def publish(run_dir: Path, dest: Path) -> None:
    """Copy what the figures need (no checkpoints) from a finished condition to `dest`."""
    soups = run_dir / "soups"
    files = [run_dir / f for f in PUBLISHED] + [soups / "ingredient_val_accs.json"]
    files += [f for f in [run_dir / "results" / "landscape.csv"] if f.is_file()]
    files += sorted(
        p for p in soups.glob("*.json") if not p.name.startswith(("ingredient", "mms_"))
    )
    files += sorted(soups.glob("mms_*.json"))
    files = [f for f in files if ".psi-" not in f.name and "state" not in f.name]
    for f in dict.fromkeys(files):
        target = dest / f.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(f, tmp)


def publish_pools(root: str | os.PathLike, results: str | os.PathLike) -> list[Path]:
    """Copy each shared sweep's timings.json (its wall time) from the run folders to `results`."""
    out = []
    for t in sorted(Path(root).glob("pools/h*/r*/timings.json")):
        dest = Path(results) / t.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(t, tmp)
        out.append(dest)
    return out


def run(
    replicates: int,
    root: str | os.PathLike,
    conditions: Sequence[str] = tuple(CONDITIONS),
    recipes: Sequence[str] = METHODS,
    base: str = BASE,
    jobs: int = 1,
    results: str | os.PathLike | None = None,
) -> None:
    """Replicates 0..R-1 of every condition, `jobs` replicate processes at a time (resumable)."""
    from mmsoup.pretrain import prepare
    from mmsoup.progress import pretrain_lines

    for held in sorted({setting(c, base)["heldout_images"] for c in conditions}):
        prepare(spec(conditions[0], 0, base, heldout_images=held), on_step=pretrain_lines)
    todo = [
        r
        for r in range(replicates)
        if not all((Path(root) / c / f"r{r}" / DONE).is_file() for c in conditions)
    ]
    if jobs <= 1:
        for r in todo:
            run_replicate(r, root, conditions, recipes, base, results)
        return
    flags = ["--root", str(root), "--base", base, "--conditions", *conditions]
    flags += ["--recipes", *recipes] + (["--results", str(results)] if results else [])

    def launch(r: int) -> int:
        log = Path(root) / "logs" / f"r{r}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mmsoup", "ablation", "--index", str(r), *flags]
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        _log(f"ablation replicate {r} {'done' if rc == 0 else f'failed (log {log})'}")
        return rc

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [r for r, rc in zip(todo, pool.map(launch, todo)) if rc != 0]
    if failed:
        raise MMSoupError(
            f"{len(failed)} ablation replicate(s) failed (e.g. r{failed[0]}, log "
            f"{Path(root) / 'logs'}); fix the cause and run again to resume."
        )


# -- what the soups did --------------------------------------------------------------------------
def decisions(meta: dict[str, Any], n_images: int) -> pd.DataFrame:
    """Every candidate decision of an MMS soup, with the τ test's margin in held-out images.

    margin = approximate average's accuracy − the current soup's, in images (MMS Alg. 1: a
    candidate is optimised when the approximate average reaches τ × the current accuracy);
    moved = the largest |λ* − λ0| over the components searched, for an optimised candidate.
    """
    info = meta["info"]
    accs = meta["ingredient_val_accs"]
    current = max(accs)  # Ψ starts as the best ingredient
    m = int(info["n_components"])
    rows, k = [], 1
    for d in info["decisions"]:
        lam0 = k / (k + 1)
        lam = d.get("lambdas")
        moved = float(np.max(np.abs(np.asarray(lam[:m]) - lam0))) if lam else np.nan
        rows.append(
            {
                "candidate": d["candidate"],
                "decision": d["decision"],
                "lam0": lam0,
                "current": current,
                "approx_acc": d["approx_acc"],
                "margin_images": round((d["approx_acc"] - current) * n_images),
                "best_acc": d.get("best_acc", np.nan),
                "moved": moved,
            }
        )
        if d["decision"] == "accepted":
            current, k = d["best_acc"], k + 1
    return pd.DataFrame(rows)


def first_steps(meta: dict[str, Any]) -> pd.DataFrame:
    """Of each optimiser pass: its first m asks (Cobyla's initial simplex), each λ's move from λ0."""
    trace = pd.DataFrame(meta["trace"])
    m = int(meta["info"]["n_components"])
    rows = []
    for (cand, _stage), g in trace[trace["stage"].str.startswith("pass")].groupby(
        ["candidate", "stage"], sort=False
    ):
        approx = trace[(trace["candidate"] == cand) & (trace["stage"] == "approx")]
        lam0 = np.asarray(approx["lambdas"].iloc[0][:m]) if len(approx) else None
        for j, lam in enumerate(g["lambdas"].iloc[:m]):
            step = np.asarray(lam[:m]) - lam0
            rows.append({"candidate": cand, "ask": j, "moved_by": float(np.abs(step).max())})
    return pd.DataFrame(rows)


def landscape(
    profile: str,
    run_dir: str | os.PathLike,
    method: str = "MMS-C8",
    step: int | None = None,
    points: int = 21,
    n_components: int = 2,
) -> pd.DataFrame:
    """Held-out accuracy along single λ_j of one accepted MMS step, the others at λ* (MMS Alg. 1).

    `step` None: the step whose λ* differs most between components (`widgets.most_uneven_step`).
    For the `n_components` live components (those that can change a prediction) whose λ* moved
    furthest from λ0 (the first live ones if none moved), λ_j runs over `points` values in [0, 1]: what the optimizer could have found. Rows:
    component, lam, acc (fraction), hits (images), lam_star, lam0. Needs the run's checkpoints.
    """
    from mmsoup.checkpoints import read_sidecar
    from mmsoup.context import context, ingredient_paths
    from mmsoup.determinism import pinned
    from mmsoup.partition import live_components, partition
    from mmsoup.profiles import get_profile
    from mmsoup.recipes import recipe
    from mmsoup.widgets import explorer_inputs

    rec = recipe(method)
    meta = read_sidecar(Path(run_dir) / "soups" / rec.file)
    with pinned(get_profile(profile).threads):
        ctx = context(profile)
        ev = ctx.heldout
        comps = partition(ev.model.state_dict(), rec.scheme, model=ev.model)
        paths = ingredient_paths(profile, run_dir)
        a, b, lam_star, _, (k, _) = explorer_inputs(paths, comps, meta, step)
        if k is None:
            raise MMSoupError(f"{method} in {run_dir} accepted no candidate: no step to explore.")
        lam0 = k / (k + 1)
        moved = np.abs(np.asarray(lam_star) - lam0)
        names = list(comps)
        _, inert = live_components(comps, ev.model)  # their λ changes no prediction
        live = [j for j, c in enumerate(names) if c not in inert] or list(range(len(names)))
        picks = sorted(live, key=lambda j: -moved[j])[:n_components]
        rows = []
        for j in picks:
            for x in np.linspace(0.0, 1.0, points):
                lam = list(lam_star)
                lam[j] = float(x)
                acc = ev.mixed_accuracy(a, b, comps, lam)
                rows.append(
                    {
                        "component": names[j],
                        "lam": float(x),
                        "acc": acc,
                        "hits": round(acc * ev.n),
                        "lam_star": float(lam_star[j]),
                        "lam0": lam0,
                    }
                )
    return pd.DataFrame(rows)


def plateaus(meta: dict[str, Any], n_images: int) -> pd.DataFrame:
    """Per optimiser pass of an MMS soup: evaluations, distinct accuracies, and how many tie the
    pass's start (the approximate average) to the image: the flat landscape Cobyla sees."""
    trace = pd.DataFrame(meta["trace"])
    rows = []
    for cand, g in trace.groupby("candidate", sort=False):
        start = g[g["stage"] == "approx"]["acc"]
        passes = g[g["stage"].str.startswith("pass")]
        if passes.empty or start.empty:
            continue
        hits = (passes["acc"] * n_images).round().astype(int)
        s0 = round(float(start.iloc[0]) * n_images)
        rows.append(
            {
                "candidate": cand,
                "evaluations": len(passes),
                "distinct": int(hits.nunique()),
                "tie_start": int((hits == s0).sum()),
                "above_start": int((hits > s0).sum()),
                "best_gain_images": int(hits.max() - s0),
            }
        )
    return pd.DataFrame(rows)


def load_metas(results: str | os.PathLike, method: str = "MMS-C8") -> list[dict[str, Any]]:
    """Every published sidecar of `method`, with its condition, replicate and held-out size."""
    from mmsoup.recipes import recipe

    out = []
    for done in sorted(Path(results).glob(f"*/r*/{DONE}")):
        side = (done.parent / "soups" / recipe(method).file).with_suffix(".json")
        if not side.is_file():
            continue
        info = json.loads(done.read_text())
        meta = json.loads(side.read_text())
        n = setting(info["condition"], info["profile"].partition(":")[0])["heldout_images"]
        out.append(meta | {"condition": info["condition"], "replicate": info["replicate"], "n": n})
    order = {c: i for i, c in enumerate(CONDITIONS)}
    return sorted(out, key=lambda m: (order.get(m["condition"], 99), m["replicate"]))


def costs(results: str | os.PathLike) -> pd.DataFrame:
    """Per condition: mean wall seconds per replicate of its soups + scoring, and of its sweep."""
    rows = []
    for done in sorted(Path(results).glob(f"*/r*/{DONE}")):
        info = json.loads(done.read_text())
        held = setting(info["condition"], info["profile"].partition(":")[0])["heldout_images"]
        t = Path(results) / "pools" / f"h{held}" / f"r{info['replicate']}" / "timings.json"
        sweep = json.loads(t.read_text()).get("finetune", np.nan) if t.is_file() else np.nan
        rows.append(
            {
                "condition": info["condition"],
                "replicate": info["replicate"],
                "soups_s": info.get("soup_seconds", np.nan),
                "soups_and_scoring_s": info["seconds"],
                "shared_sweep_s": sweep,
            }
        )
    table = pd.DataFrame(rows)
    means = table.groupby("condition")[["soups_s", "soups_and_scoring_s", "shared_sweep_s"]].mean()
    return means.reindex([c for c in CONDITIONS if c in means.index])


def mechanism(metas: Sequence[dict[str, Any]]) -> list[str]:
    """One sentence per condition on how MMS-C8 worked: the τ test, the evaluations its passes
    used of the budget, the plateaus, how far λ* moved (from the published sidecars)."""
    out = []
    by: dict[str, list[dict[str, Any]]] = {}
    for m in metas:
        by.setdefault(m["condition"], []).append(m)
    for cond, ms in by.items():
        dec = pd.concat([decisions(m, m["n"]) for m in ms], ignore_index=True)
        flat = [plateaus(m, m["n"]) for m in ms]
        flat = pd.concat(flat, ignore_index=True) if any(len(f) for f in flat) else pd.DataFrame()
        budget = int(ms[0]["info"]["params"]["budget"])
        skipped = int((dec["decision"] == "skipped").sum())
        text = (
            f"**{cond}**: the τ test skipped {skipped} of {len(dec)} candidates "
            f"({100 * skipped / len(dec):.0f} %; median margin {dec['margin_images'].median():+.0f} "
            f"images, τ allows about {-(1 - 0.998) * dec['current'].mean() * ms[0]['n']:.0f})"
        )
        if len(flat):
            opt = dec[dec["decision"] != "skipped"]
            text += (
                f"; its {len(flat)} Cobyla passes used {flat['evaluations'].mean():.0f} of the "
                f"{budget} evaluations on average, found {flat['distinct'].mean():.1f} distinct "
                f"held-out accuracies per pass and at best {flat['best_gain_images'].max()} images "
                f"more than the plain average; λ* moved at most "
                f"{opt['moved'].max():.2f} from λ0 (median {opt['moved'].median():.2f})"
            )
        out.append(text + ".")
    return out


def findings(rows: pd.DataFrame) -> list[str]:
    """One sentence per condition from the numbers: what MMS-C8 did and how it compares."""
    mg = paired(rows, "MMS-C8", "Greedy soup").set_index("condition")
    mb = paired(rows, "MMS-C8", BEST).set_index("condition")
    out = []
    for cond, g in rows.groupby("condition", sort=False):
        mms = g[g["method"] == "MMS-C8"]
        if mms.empty or cond not in mg.index:
            continue
        first = g.iloc[0]
        moved = mms["lambda_moved"].dropna()
        x, b = mg.loc[cond], mb.loc[cond]
        side = (
            "one replicate: no verdict"
            if x["replicates"] < 2
            else "better than greedy soup"
            if x["lo"] > 0
            else "worse than greedy soup"
            if x["hi"] < 0
            else "not distinguishable from greedy soup"
        )
        moved_text = (
            f"λ* left its start point in {100 * moved.mean():.0f} % of its accepted steps"
            if len(moved)
            else "it accepted no candidate"
        )
        out.append(
            f"**{cond}** ({int(first['heldout_images']):,} held-out images, {int(first['budget'])} "
            f"evaluations, {int(first['models'])} runs; replicates: {int(x['replicates'])}): MMS-C8 "
            f"optimised {mms['candidates_optimised'].mean():.1f} of {int(first['models'])} "
            f"candidates on average and {moved_text}; MMS-C8 − greedy soup, Avg OOD "
            f"{interval(x)} "
            f"({int(x['wins'])}–{int(x['ties'])}–{int(x['losses'])}): {side}; MMS-C8 − best model "
            f"{interval(b)}."
        )
    return out


def rows_of(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The ablation.csv rows of one finished condition folder (published or a run folder)."""
    from mmsoup import context
    from mmsoup.recipes import recipe
    from mmsoup.table1 import AVG_OOD, table1

    run_dir = Path(run_dir)
    done = json.loads((run_dir / DONE).read_text())
    cond, r, profile = done["condition"], done["replicate"], done["profile"]
    acc = pd.read_csv(run_dir / "results" / "accuracy.csv")
    id_set, shifts = context.id_set(profile), context.shifts(profile)
    table = table1(acc, id_set, shifts)
    best = table.loc[BEST]
    cfg = setting(cond, profile.partition(":")[0])
    summary = pd.read_csv(run_dir / "soups" / "summary.csv").set_index("method")
    out = []
    for method in [BEST, *summary.index]:
        row = table.loc[method]
        rec = {
            "condition": cond,
            "replicate": r,
            "method": method,
            "delta_id": row[id_set] - best[id_set],
            "delta_ood": row[AVG_OOD] - best[AVG_OOD],
            "candidates_optimised": np.nan,
            "lambda_moved": np.nan,
            **cfg,
            "id": row[id_set],
            "avg_ood": row[AVG_OOD],
            "models_mixed": 1,
            "n_evals": np.nan,
        }
        if method != BEST:
            side = (run_dir / "soups" / recipe(method).file).with_suffix(".json")
            meta = json.loads(side.read_text())
            rec["models_mixed"] = len(meta.get("ingredients", []))
            rec["n_evals"] = meta.get("n_evals", np.nan)
            if "decisions" in meta.get("info", {}) and meta["info"].get("n_components"):
                d = decisions(meta, cfg["heldout_images"])
                rec["candidates_optimised"] = int((d["decision"] != "skipped").sum())
                acc_steps = d[d["decision"] == "accepted"]
                rec["lambda_moved"] = (
                    float((acc_steps["moved"] > 1e-9).mean()) if len(acc_steps) else np.nan
                )
        out.append(rec)
    return pd.DataFrame(out)


def collect(results: str | os.PathLike) -> pd.DataFrame:
    """ablation.csv: every finished (condition, replicate) under `results`, conditions in order."""
    found = sorted(Path(results).glob(f"*/r*/{DONE}"))
    if not found:
        raise MMSoupError(f"{results} holds no finished ablation run; run `make ablation` first.")
    rows = pd.concat([rows_of(p.parent) for p in found], ignore_index=True)
    order = {c: i for i, c in enumerate(CONDITIONS)}
    rows = rows.sort_values(
        ["condition", "replicate"],
        key=lambda s: s.map(order) if s.name == "condition" else s,
        kind="stable",
    )
    return rows.reset_index(drop=True)


def interval(x: pd.Series) -> str:
    """'+0.12 [-0.30, +0.54]' from a `paired` row; one replicate has no interval."""
    if x["replicates"] < 2:
        return f"{x['mean']:+.2f} (one replicate, no interval)"
    return f"{x['mean']:+.2f} [{x['lo']:+.2f}, {x['hi']:+.2f}]"


def paired(rows: pd.DataFrame, a: str, b: str, col: str = "delta_ood") -> pd.DataFrame:
    """Per condition: mean of (a − b) over replicates with a 95% t-interval, and W–T–L of a vs b
    (`mmsoup.replicates.paired`, grouped by condition)."""
    from mmsoup.replicates import paired as by_group

    return by_group(rows, a, b, col, by="condition")


def markdown(rows: pd.DataFrame) -> str:
    """ablation.md: per condition, what MMS did and MMS − greedy / MMS − best with intervals."""
    lines = [
        "# The conditions ablation: when does MMS beat greedy soup?",
        "",
        "Δ in points of accuracy, mean over replicates with a 95% t-interval; W–T–L over replicates.",
        "",
        "| condition | held-out images | budget | models | replicates | candidates optimised by MMS-C8 (mean) "
        "| accepted steps with λ* off its start | MMS-C8 − greedy, Avg OOD | W–T–L | MMS-C8 − greedy, ID "
        "| MMS-C8 − best, Avg OOD | greedy − best, Avg OOD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mg = paired(rows, "MMS-C8", "Greedy soup").set_index("condition")
    mg_id = paired(rows, "MMS-C8", "Greedy soup", "delta_id").set_index("condition")
    mb = paired(rows, "MMS-C8", BEST).set_index("condition")
    gb = paired(rows, "Greedy soup", BEST).set_index("condition")

    def ci(t: pd.DataFrame, c: str) -> str:
        if c not in t.index:
            return "–"
        x = t.loc[c]
        return interval(x)

    for cond, g in rows.groupby("condition", sort=False):
        mms = g[g["method"] == "MMS-C8"]
        first = g.iloc[0]
        moved = mms["lambda_moved"].dropna()
        wtl = (
            f"{int(mg.loc[cond, 'wins'])}–{int(mg.loc[cond, 'ties'])}–{int(mg.loc[cond, 'losses'])}"
            if cond in mg.index
            else "–"
        )
        lines.append(
            f"| {cond} | {int(first['heldout_images']):,} | {int(first['budget'])} | "
            f"{int(first['models'])} | {g['replicate'].nunique()} | "
            f"{mms['candidates_optimised'].mean():.1f} | "
            f"{f'{100 * moved.mean():.0f} %' if len(moved) else '– (none accepted)'} | "
            f"{ci(mg, cond)} | {wtl} | "
            f"{ci(mg_id, cond)} | {ci(mb, cond)} | {ci(gb, cond)} |"
        )
    lines += [
        "",
        "Conditions: "
        + "; ".join(f"**{c.name}**: {c.what}" for c in CONDITIONS.values())
        + ". Greedy soup and uniform soup do not depend on the budget.",
    ]
    return "\n".join(lines) + "\n"


def figure(rows: pd.DataFrame, path: str | os.PathLike) -> Path:
    """ablation.png: `draw(rows)` saved."""
    path = Path(path)
    with atomic_path(path) as tmp:
        draw(rows).savefig(tmp, dpi=110, format="png")
    return path


def draw(rows: pd.DataFrame):
    """Per condition: MMS-C8 − greedy (Avg OOD, ID) and MMS-C8 − best (Avg OOD), every
    replicate and the mean with its 95% interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conds = list(dict.fromkeys(rows["condition"]))
    fig = Figure(figsize=(10, 0.5 * len(conds) + 1.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    pairs = [
        ("MMS-C8", "Greedy soup", "delta_ood", "MMS-C8 − greedy soup, Avg OOD"),
        ("MMS-C8", "Greedy soup", "delta_id", "MMS-C8 − greedy soup, ID test"),
        ("MMS-C8", BEST, "delta_ood", "MMS-C8 − best model, Avg OOD"),
    ]
    rng = np.random.default_rng(0)
    for ax, (a, b, col, title) in zip(axes, pairs):
        t = paired(rows, a, b, col).set_index("condition")
        ax.axvline(0, color="grey", lw=1, ls="--")
        for y, cond in enumerate(conds):
            g = rows[rows["condition"] == cond]
            wide = g.pivot(index="replicate", columns="method", values=col)
            diff = (wide[a] - wide[b]).dropna()
            ax.scatter(diff, y + rng.uniform(-0.15, 0.15, len(diff)), s=16, color="#0173b2")
            if cond in t.index:
                x = t.loc[cond]
                ax.errorbar(
                    x["mean"], y, xerr=[[x["mean"] - x["lo"]], [x["hi"] - x["mean"]]],
                    fmt="D", color="#d55e00", ms=5, capsize=3,
                )  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("points", fontsize=8)
        ax.set_yticks(range(len(conds)), conds, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle(
        "Conditions ablation: dots = replicates, diamond = mean with 95% interval", fontsize=9
    )
    fig.tight_layout()
    return fig


def write_summary(results: str | os.PathLike, figures_dir: str | os.PathLike) -> list[Path]:
    """figures/ablation.{csv,md,png} from the published ablation results."""
    rows = collect(results)
    out = Path(figures_dir)
    csv = out / "ablation.csv"
    with atomic_path(csv) as tmp:
        rows.round(4).to_csv(tmp, index=False)
    md = write_text(out / "ablation.md", markdown(rows))
    return [csv, md, figure(rows, out / "ablation.png")]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
