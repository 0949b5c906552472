"""The replicate study: the whole embedded study R times, each with its own fine-tuning sweep.

One run of the study is an example, not evidence: which model is best, what greedy soup keeps and
the sign of a soup's gain all move between sweeps (and between machines, whose bits differ). So the
claims of the README come from R independent replicates: replicate r draws its sweep with seed r
(`<profile>:search_seed=r`; replicate 0 is exactly what `make reproduce` runs), shares the cached
pretrained backbone and LP init (or pretrains its own with `vary_backbone`: seed r), builds every
soup on its own held-out split and is evaluated on the same test sets. What this does not capture
with the backbone shared: the variance that comes from pretraining (use `vary_backbone`) and from
the data split (fixed by the manifest).

Outputs (`figures/` by default): `replicates.csv` (one row per replicate and method: held-out, ID
and Avg OOD accuracy, Δ ID and Δ Avg OOD against that replicate's best individual model chosen on
held-out, the models mixed), `replicates.md` (per method: mean Δ with a 95% t-interval across
replicates, and in how many replicates it beats the best model) and `replicates.png`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mmsoup.determinism import machine_info
from mmsoup.errors import MMSoupError
from mmsoup.io import atomic_path, write_json, write_text

DONE = "replicate.json"  # written last in a replicate's folder: the replicate is complete
NOT_METHODS = ("Second-best individual", "LP init")  # rows of Table 1 that are not compared


def replicate_spec(profile: str, r: int, vary_backbone: bool = False) -> str:
    """The profile spec of replicate r: sweep seed r (and backbone seed r with `vary_backbone`)."""
    from mmsoup.profiles import get_profile

    base = get_profile(profile)
    if base.search != "random":
        raise MMSoupError(
            f"Profile {profile!r} has no random sweep to replicate ({base.search}); use embedded or smoke."
        )
    sep = "," if ":" in profile else ":"
    spec = f"{profile}{sep}search_seed={r}"
    return f"{spec},pretrain_seed={r}" if vary_backbone else spec


def replicate_dir(root: str | os.PathLike, r: int) -> Path:
    """The run folder of replicate r under `root`."""
    return Path(root) / f"r{r}"


def run_replicate(
    profile: str, r: int, root: str | os.PathLike, vary_backbone: bool = False
) -> Path:
    """Run (or resume) replicate r: sweep, soups, evaluation, in `root/r<r>`; skip it when done."""
    from mmsoup import pipeline

    spec = replicate_spec(profile, r, vary_backbone)
    run_dir = replicate_dir(root, r)
    if (run_dir / DONE).is_file():
        return run_dir
    start = time.perf_counter()
    _log(f"replicate {r}: {spec} in {run_dir}")
    pipeline.finetune_stage(spec, run_dir)
    pipeline.soup_stage(spec, run_dir)
    pipeline.evaluate_stage(spec, run_dir)
    write_json(
        run_dir / DONE,
        {
            "replicate": r,
            "profile": spec,
            "seconds": round(time.perf_counter() - start, 1),
            "machine": machine_info(),
        },
    )
    _log(f"replicate {r} done in {time.perf_counter() - start:.0f} s")
    return run_dir


def run_replicates(
    profile: str,
    replicates: int,
    root: str | os.PathLike,
    vary_backbone: bool = False,
    jobs: int = 1,
) -> list[Path]:
    """Run replicates 0..R-1 (resumable), `jobs` processes at a time (each one replicate)."""
    if replicates < 2:
        raise MMSoupError(f"--replicates {replicates}: a spread needs at least 2 replicates.")
    todo = [r for r in range(replicates) if not (replicate_dir(root, r) / DONE).is_file()]
    if todo:  # build the shared backbone once, before replicates race to build it
        from mmsoup.pretrain import prepare
        from mmsoup.progress import pretrain_lines

        if not vary_backbone:
            prepare(replicate_spec(profile, 0), on_step=pretrain_lines)
    if jobs <= 1:
        for r in todo:
            run_replicate(profile, r, root, vary_backbone)
    else:
        _fan_out(profile, todo, root, vary_backbone, jobs)
    return [replicate_dir(root, r) for r in range(replicates)]


def _fan_out(
    profile: str, todo: Sequence[int], root: str | os.PathLike, vary_backbone: bool, jobs: int
) -> None:
    """`python -m mmsoup replicate --index r` per replicate, `jobs` at a time, logs in root/logs."""

    def launch(r: int) -> int:
        log = Path(root) / "logs" / f"r{r}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mmsoup", "replicate", "--profile", profile]
        cmd += ["--root", str(root), "--index", str(r)] + (["--vary-backbone"] * vary_backbone)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        _log(f"replicate {r} {'done' if rc == 0 else f'failed (log {log})'}")
        return rc

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [r for r, rc in zip(todo, pool.map(launch, todo)) if rc != 0]
    if failed:
        raise MMSoupError(
            f"{len(failed)} replicate(s) failed (e.g. r{failed[0]}, log {Path(root) / 'logs'}); "
            "fix the cause and run again to resume."
        )


# -- summary ------------------------------------------------------------------------------------
def replicate_rows(run_dir: str | os.PathLike, profile: str, r: int) -> pd.DataFrame:
    """One row per method of one replicate: accuracies and Δ against its best individual model."""
    from mmsoup import context
    from mmsoup.results import HELDOUT_SET, load_results
    from mmsoup.table1 import AVG_OOD, BEST, table1

    run_dir = Path(run_dir)
    acc, _ = load_results(run_dir)
    id_set, shifts = context.id_set(profile), context.shifts(profile)
    table = table1(acc, id_set, shifts)
    held = acc[acc["set"] == HELDOUT_SET].set_index("method")["accuracy"]
    mixed = _models_mixed(run_dir)
    best = table.loc[BEST]
    rows = []
    for label, row in table.iterrows():
        if label in NOT_METHODS:
            continue
        rows.append(
            {
                "replicate": r,
                "method": label,
                "model": row["model"] if label == BEST else "",
                "heldout": held.get(row["model"], np.nan),
                "id": row[id_set],
                "avg_ood": row[AVG_OOD],
                "delta_id": row[id_set] - best[id_set],
                "delta_ood": row[AVG_OOD] - best[AVG_OOD],
                "models_mixed": 1 if label == BEST else mixed.get(label, np.nan),
            }
        )
    return pd.DataFrame(rows)


def _models_mixed(run_dir: Path) -> dict[str, int]:
    """Number of ingredients of each soup or ensemble (from soups/summary.csv)."""
    file = run_dir / "soups" / "summary.csv"
    if not file.is_file():
        return {}
    summary = pd.read_csv(file)
    return dict(zip(summary["method"], summary["ingredients"].astype(int)))


def collect(root: str | os.PathLike, profile: str, replicates: int | None = None) -> pd.DataFrame:
    """The long table of every finished replicate under `root` (replicates.csv's rows)."""
    root = Path(root)
    found = sorted(
        (int(p.parent.name[1:]), p.parent)
        for p in root.glob(f"r*/{DONE}")
        if p.parent.name[1:].isdigit()
    )
    if replicates is not None:
        found = [(r, d) for r, d in found if r < replicates]
    if len(found) < 2:
        raise MMSoupError(
            f"{root} holds {len(found)} finished replicate(s); run `python -m mmsoup replicate` first (at least 2)."
        )
    frames = []
    for r, d in found:
        spec = json.loads((d / DONE).read_text())["profile"]
        frames.append(replicate_rows(d, spec, r))
    return pd.concat(frames, ignore_index=True)


def t_interval(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `x` with its 95% t-interval (a zero-width one for one value)."""
    from scipy import stats

    mean, sd = float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
    half = float(stats.t.ppf(0.975, len(x) - 1) * sd / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return mean, mean - half, mean + half


def spread(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean Δ ID / Δ Avg OOD with a 95% t-interval across replicates, and win counts."""
    out = []
    n_rep = rows["replicate"].nunique()
    for method, g in rows.groupby("method", sort=False):
        rec = {"method": method, "replicates": len(g)}
        for col in ("delta_id", "delta_ood"):
            x = g[col].to_numpy(dtype=float)
            mean, lo, hi = t_interval(x)
            rec |= {
                f"{col}_mean": mean,
                f"{col}_lo": lo,
                f"{col}_hi": hi,
                f"{col}_min": float(x.min()),
                f"{col}_max": float(x.max()),
                f"{col}_wins": int((x > 0).sum()),
                f"{col}_losses": int((x < 0).sum()),
            }
        rec["models_mixed_mean"] = float(g["models_mixed"].mean())
        out.append(rec)
    table = pd.DataFrame(out)
    table.attrs["replicates"] = n_rep
    return table


def verdict(rec: pd.Series, col: str) -> str:
    """'gain' / 'loss' when the 95% interval excludes zero, else 'unclear'."""
    if rec[f"{col}_lo"] > 0:
        return "gain"
    if rec[f"{col}_hi"] < 0:
        return "loss"
    return "unclear"


def _fmt(rec: pd.Series, col: str) -> str:
    return f"{rec[f'{col}_mean']:+.2f} [{rec[f'{col}_lo']:+.2f}, {rec[f'{col}_hi']:+.2f}]"


def _wtl(rec: pd.Series, col: str) -> str:
    """Wins-ties-losses against the best model, e.g. `3–1–1`."""
    ties = rec["replicates"] - rec[f"{col}_wins"] - rec[f"{col}_losses"]
    return f"{rec[f'{col}_wins']}–{ties}–{rec[f'{col}_losses']}"


def markdown(rows: pd.DataFrame, table: pd.DataFrame, profile: str) -> str:
    """replicates.md: the spread table and how to read it."""
    n = rows["replicate"].nunique()
    lines = [
        f"# Replicate study: {n} replicates of the `{profile}` profile",
        "",
        "Each replicate: its own 12-run sweep (seed r), every soup on its own held-out split, the "
        "same test sets. Δ = method − that replicate's best individual model (chosen on held-out), "
        f"points; mean with a 95% t-interval across the {n} replicates; W–T–L = replicates where "
        "the method beats, ties or loses to the best model.",
        "",
        "| Method | Δ ID mean [95% CI] | ID W–T–L | Δ Avg OOD mean [95% CI] | OOD W–T–L | models mixed (mean) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for _, rec in table.iterrows():
        if rec["method"] == "Best individual":
            continue
        lines.append(
            f"| {rec['method']} | {_fmt(rec, 'delta_id')} ({verdict(rec, 'delta_id')}) | "
            f"{_wtl(rec, 'delta_id')} | {_fmt(rec, 'delta_ood')} ({verdict(rec, 'delta_ood')}) | "
            f"{_wtl(rec, 'delta_ood')} | {rec['models_mixed_mean']:.1f} |"
        )
    best = rows[rows["method"] == "Best individual"]
    lines += [
        "",
        "Best individual model per replicate: "
        + ", ".join(
            f"r{r.replicate} {r.model} ({r.id:.2f} ID, {r.avg_ood:.2f} OOD)"
            for r in best.itertuples()
        )
        + ".",
        "",
        "gain / loss: the interval excludes zero; unclear: it does not.",
    ]
    return "\n".join(lines) + "\n"


def figure(rows: pd.DataFrame, table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Per method: every replicate's Δ (dots), the mean with its 95% interval (bar), ID and OOD."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [m for m in table["method"] if m != "Best individual"]
    n = rows["replicate"].nunique()
    # no pyplot: the caller's backend (a notebook's inline one) stays as it is, as in plots.figure2
    fig = Figure(figsize=(10, 0.42 * len(methods) + 1.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    rng = np.random.default_rng(0)  # vertical jitter of the dots only
    for ax, col, title in zip(axes, ("delta_id", "delta_ood"), ("Δ ID (test)", "Δ Avg OOD")):
        ax.axvline(0, color="grey", lw=1, ls="--")
        for y, m in enumerate(methods):
            g = rows[rows["method"] == m]
            rec = table[table["method"] == m].iloc[0]
            ax.scatter(
                g[col], y + rng.uniform(-0.15, 0.15, len(g)), s=16, color="#4c72b0", alpha=0.7
            )
            ax.errorbar(
                rec[f"{col}_mean"],
                y,
                xerr=[
                    [rec[f"{col}_mean"] - rec[f"{col}_lo"]],
                    [rec[f"{col}_hi"] - rec[f"{col}_mean"]],
                ],
                fmt="D",
                color="#c44e52",
                ms=5,
                capsize=3,
            )
            ax.text(
                1.01,
                y,
                f"{rec[f'{col}_wins']}/{rec['replicates']}",
                transform=ax.get_yaxis_transform(),
                va="center",
                fontsize=8,
            )
        ax.set_title(f"{title}: method − best individual (points)", fontsize=9)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # shared y: once for both panels, Table 1's order from the top
    fig.suptitle(
        f"{n} replicates: dots = replicates, diamond = mean with 95% interval, right = wins/replicates",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    return path


def write_summary(
    root: str | os.PathLike,
    profile: str,
    figures_dir: str | os.PathLike = "figures",
    replicates: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Write figures/replicates.{csv,md,png} from the finished replicates under `root`."""
    rows = collect(root, profile, replicates)
    out = Path(figures_dir)
    csv = out / "replicates.csv"
    with atomic_path(csv) as tmp:
        rows.round(4).to_csv(tmp, index=False)
    table, paths = write_report(rows, out, profile)
    return rows, table, [csv, *paths]


def write_report(
    rows: pd.DataFrame, out: str | os.PathLike, profile: str
) -> tuple[pd.DataFrame, list[Path]]:
    """The spread of `rows` and `out/replicates.{md,png}` written from it (also `mmsoup figures`)."""
    table = spread(rows)
    md = write_text(Path(out) / "replicates.md", markdown(rows, table, profile))
    return table, [md, figure(rows, table, Path(out) / "replicates.png")]


def compare(run_dir: str | os.PathLike, profile: str, replicates_csv: str | os.PathLike) -> str:
    """Where this run's Δs fall against a committed replicate distribution (printed by reproduce)."""
    csv = Path(replicates_csv)
    if not csv.is_file():
        return (
            f"No replicate study at {csv} to compare this run with (`make replicates` writes it)."
        )
    ref = pd.read_csv(csv)
    this = replicate_rows(run_dir, profile, -1)
    n = ref["replicate"].nunique()
    lines = [
        f"This run against the {n} committed replicates ({csv}): Δ vs its best individual model, points",
        f"{'method':<18} {'Δ ID':>7}  {'replicates: min .. max':>22}  {'Δ OOD':>7}  {'replicates: min .. max':>22}",
    ]
    for _, row in this.iterrows():
        g = ref[ref["method"] == row["method"]]
        if row["method"] == "Best individual" or g.empty:
            continue
        cells = []
        for col in ("delta_id", "delta_ood"):
            lo, hi = g[col].min(), g[col].max()
            mark = "" if lo - 1e-9 <= row[col] <= hi + 1e-9 else " *"
            cells.append(f"{row[col]:>+7.2f}  {f'{lo:+.2f} .. {hi:+.2f}{mark}':>22}")
        lines.append(f"{row['method']:<18} " + "  ".join(cells))
    lines.append("(* outside the range of the committed replicates)")
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def versus(rows: pd.DataFrame, a: str, b: str, col: str = "delta_ood") -> pd.DataFrame:
    """Per replicate: method `a` minus method `b` (points), e.g. MMS-C8 − greedy soup."""
    wide = rows.pivot(index="replicate", columns="method", values=col)
    return (wide[a] - wide[b]).rename(f"{a} − {b}").to_frame()


def paired(
    rows: pd.DataFrame, a: str, b: str, col: str = "delta_ood", by: str | None = None
) -> pd.DataFrame:
    """Mean of (a − b) over replicates with a 95% t-interval and W–T–L of a against b, one row
    per group of column `by` (e.g. the ablation's condition; None: one group, "all")."""
    out = []
    groups = rows.groupby(by, sort=False) if by else [("all", rows)]
    for key, g in groups:
        wide = g.pivot(index="replicate", columns="method", values=col)
        if a not in wide or b not in wide:
            continue
        diff = (wide[a] - wide[b]).dropna().to_numpy()
        mean, lo, hi = t_interval(diff)
        out.append(
            {
                by or "group": key,
                "replicates": len(diff),
                "mean": mean,
                "lo": lo,
                "hi": hi,
                "wins": int((diff > 1e-9).sum()),
                "ties": int((np.abs(diff) <= 1e-9).sum()),
                "losses": int((diff < -1e-9).sum()),
            }
        )
    return pd.DataFrame(out)


def findings(rows: pd.DataFrame) -> list[str]:
    """One sentence per method from the replicate study's numbers (chapter 08's closing list)."""
    table = spread(rows)
    n = rows["replicate"].nunique()
    words = {
        "gain": "beats the best model",
        "loss": "falls below the best model",
        "unclear": "is not told apart from the best model",
    }
    out = []
    for _, rec in table.iterrows():
        if rec["method"] == "Best individual":
            continue
        parts = []
        for col, axis in (("delta_ood", "out of distribution"), ("delta_id", "in distribution")):
            parts.append(
                f"{words[verdict(rec, col)]} {axis} ({_fmt(rec, col)}, W–T–L {_wtl(rec, col)})"
            )
        out.append(f"**{rec['method']}** {parts[0]} and {parts[1]}.")
    mms = [m for m in rows["method"].unique() if m.startswith("MMS-") and "+" not in m]
    diffs = paired(rows, mms[0], "Greedy soup") if mms else None
    if diffs is not None and len(diffs):
        x = diffs.iloc[0]
        out.append(
            f"**{mms[0]} − greedy soup**, Avg OOD, over the {n} replicates: {x['mean']:+.2f} "
            f"[{x['lo']:+.2f}, {x['hi']:+.2f}]; MMS higher in {int(x['wins'])}, equal in "
            f"{int(x['ties'])}, lower in {int(x['losses'])}: the comparison MMS's claim over the "
            "Soups baselines needs (chapter 09 asks why)."
        )
    return out
