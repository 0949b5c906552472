"""MMS Table 1 from a run's results: rows, paired-bootstrap intervals, and the CSV/Markdown/LaTeX files.

Rows follow MMS Table 1 (best and second-best individual model by held-out accuracy, then the
recipes by kind: soups, ensembles, WiSE-FT; `mmsoup.recipes.SHOWN`), then the LP init.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmsoup.errors import MMSoupError
from mmsoup.io import atomic_path, write_text
from mmsoup.recipes import KIND_ORDER, SHOWN
from mmsoup.results import LP_INIT, by_set, check_acc, method_kinds, ranked_individuals

AVG_OOD = "Avg OOD"
BEST = "Best individual"
SECOND = "Second-best individual"
ROW_ORDER = (*(r.name for r in SHOWN), LP_INIT)  # after the two individual rows
_KIND_RANK = {k: i for i, k in enumerate((*KIND_ORDER, "init", "individual"))}


def _row_methods(acc: pd.DataFrame, methods: Sequence[str] | None) -> dict[str, str]:
    """Map each Table 1 row label to the method whose numbers it shows, in MMS Table 1's order."""
    kinds = method_kinds(acc)
    ranked = ranked_individuals(acc)
    rows: dict[str, str] = {}
    if ranked:
        rows[BEST] = ranked[0]
    if len(ranked) > 1:
        rows[SECOND] = ranked[1]
    present = list(dict.fromkeys(acc["method"]))
    for name in ROW_ORDER:
        if name in kinds:
            rows[name] = name
    extras = [m for m in present if kinds[m] != "individual" and m not in rows]
    for m in sorted(extras, key=lambda m: _KIND_RANK[kinds[m]]):  # stable: appearance order kept
        rows[m] = m
    if methods is None:
        return rows
    chosen: dict[str, str] = {}
    for label in methods:
        if label in rows:
            chosen[label] = rows[label]
        elif label in kinds:  # any method by name, e.g. a particular model_7
            chosen[label] = label
        else:
            raise MMSoupError(
                f"No method or Table 1 row called {label!r}; the results have {', '.join(rows)}."
            )
    return chosen


# ---------------------------------------------------------------------------------------------
# Table 1


def table1(
    acc: pd.DataFrame,
    id_set: str,
    shifts: Sequence[str],
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """MMS Table 1: one row per method, one column per set (ID first) and Avg OOD (mean of shifts).

    Index: the row label (`Best individual`, `Uniform soup`, ...). Column `model` names the method
    whose numbers the row shows (the chosen fine-tuned model on the individual rows). A method
    missing one shift set gets no Avg OOD (NaN), rather than a mean over fewer sets.
    """
    acc = check_acc(acc, id_set, shifts)
    rows = _row_methods(acc, methods)
    if not rows:
        raise MMSoupError("No method to put in Table 1; the accuracy table has no rows to show.")
    sets = [id_set, *shifts]
    wide = by_set(acc, sets).reindex(list(rows.values()))
    table = pd.DataFrame(wide.to_numpy(), index=pd.Index(list(rows), name="method"), columns=sets)
    table[AVG_OOD] = table[list(shifts)].mean(axis=1, skipna=False)
    table.insert(0, "model", list(rows.values()))
    return table


# ---------------------------------------------------------------------------------------------
# Paired bootstrap


def _correct_array(correct: Mapping[str, np.ndarray], method: str, s: str) -> np.ndarray | None:
    """Return the per-example correctness of `method` on set `s` as a bool vector (None if absent)."""
    key = f"{method}/{s}"
    if key not in correct:
        return None
    a = np.asarray(correct[key])
    if a.ndim != 1 or a.size == 0:
        raise MMSoupError(f"correct[{key!r}] must be a non-empty 1-D array of per-example flags.")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise MMSoupError(f"correct[{key!r}] must hold booleans (or 0/1), one per image.")
        a = a.astype(bool)
    return a


def _boot_delta(
    a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator
) -> tuple[float, np.ndarray]:
    """Paired-bootstrap replicates of acc(a) - acc(b) in points, resampling images with replacement.

    Resampling n images (the same indices for both methods) only matters through how many drawn
    images a wins (a right, b wrong) and loses, and those counts are exactly multinomial with the
    observed win/loss/tie rates; drawing them directly is the same distribution as index resampling
    at O(n_boot) cost and memory, so it scales to ImageNet's 50,000 images.
    """
    n = a.size
    wins = int(np.count_nonzero(a & ~b))
    losses = int(np.count_nonzero(~a & b))
    counts = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=n_boot)
    reps = (counts[:, 0] - counts[:, 1]) * (100.0 / n)
    return 100.0 * (wins - losses) / n, reps


def bootstrap_deltas(
    correct: Mapping[str, np.ndarray],
    acc: pd.DataFrame,
    id_set: str,
    shifts: Sequence[str],
    baseline: str = BEST,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Each Table 1 row's gain over the baseline on ID and Avg OOD, with paired-bootstrap 95% CIs.

    MMS claims +3.5 Avg OOD / +0.6 ImageNet over the best model (MMS Table 1); the interval says
    whether a gain at our scale is larger than test-set noise. Images are resampled within each set,
    the same images for both methods; for Avg OOD each shift set is resampled independently and the
    per-set differences averaged. Columns: `model`, `baseline`, `delta_id`, `delta_id_lo`,
    `delta_id_hi`, `delta_ood`, `delta_ood_lo`, `delta_ood_hi` (points), `n_boot`. A row whose
    correctness arrays are missing gets NaN rather than disappearing.
    """
    if int(n_boot) < 100:
        raise MMSoupError("Use at least 100 bootstrap resamples (n_boot) for a 95% interval.")
    acc = check_acc(acc, id_set, shifts)
    rows = _row_methods(acc, None)
    kinds = method_kinds(acc)
    if baseline in rows:
        base = rows[baseline]
    elif baseline in kinds:
        base = baseline
    else:
        raise MMSoupError(f"No baseline {baseline!r} in the results; pick a Table 1 row or method.")
    sets = [id_set, *shifts]
    wide = by_set(acc, sets)

    def get(method: str, s: str, size: int | None = None) -> np.ndarray | None:
        arr = _correct_array(correct, method, s)
        if arr is None:
            return None
        if size is not None and arr.size != size:
            raise MMSoupError(
                f"{method} has {arr.size} results on {s} but {base} has {size}; both must cover the same images in the same order."
            )
        # The two files must describe the same run; rounding in the CSV is tolerated.
        pct = 100.0 * arr.mean()
        if abs(pct - wide.at[method, s]) > 0.05:
            raise MMSoupError(
                f"correct.npz gives {method} {pct:.2f}% on {s} but accuracy.csv says {wide.at[method, s]:.2f}%; the two files are from different runs."
            )
        return arr

    base_arr = {s: get(base, s) for s in sets}
    lacking = [s for s, a in base_arr.items() if a is None]
    if lacking:
        raise MMSoupError(
            f"correct.npz has no per-example results for the baseline {base} on {', '.join(lacking)}; re-run the evaluation with them saved."
        )
    q = [2.5, 97.5]
    out = []
    for label, method in rows.items():
        if method == base:
            continue
        rng = np.random.default_rng(seed)  # per method, so a row's CI does not depend on the others
        rec = {"method": label, "model": method, "baseline": base}
        arrs = {s: get(method, s, base_arr[s].size) for s in sets}
        nan3 = (math.nan, math.nan, math.nan)
        if arrs[id_set] is not None:
            point, reps = _boot_delta(arrs[id_set], base_arr[id_set], n_boot, rng)
            lo, hi = np.percentile(reps, q)
            rec["delta_id"], rec["delta_id_lo"], rec["delta_id_hi"] = point, lo, hi
        else:
            rec["delta_id"], rec["delta_id_lo"], rec["delta_id_hi"] = nan3
        if all(arrs[s] is not None for s in shifts):
            parts = [_boot_delta(arrs[s], base_arr[s], n_boot, rng) for s in shifts]
            point = float(np.mean([p for p, _ in parts]))
            reps = np.mean([r for _, r in parts], axis=0)
            lo, hi = np.percentile(reps, q)
            rec["delta_ood"], rec["delta_ood_lo"], rec["delta_ood_hi"] = point, lo, hi
        else:
            rec["delta_ood"], rec["delta_ood_lo"], rec["delta_ood_hi"] = nan3
        rec["n_boot"] = int(n_boot)
        out.append(rec)
    cols = [
        "method",
        "model",
        "baseline",
        "delta_id",
        "delta_id_lo",
        "delta_id_hi",
        "delta_ood",
        "delta_ood_lo",
        "delta_ood_hi",
        "n_boot",
    ]
    return pd.DataFrame.from_records(out, columns=cols).set_index("method")


# ---------------------------------------------------------------------------------------------
# Writing Table 1


def _row_label(label: str, model: object) -> str:
    """Row label for print: the individual rows also name the model (MMS Table 1 does not)."""
    if isinstance(model, str) and model and model != label:
        return f"{label} ({model})"
    return label


def _value_columns(table: pd.DataFrame) -> list[str]:
    """The numeric columns of a Table 1 frame (every set, then Avg OOD)."""
    return [c for c in table.columns if c != "model"]


def _fmt(x: float, na: str) -> str:
    """Two decimals, or `na` for a missing value (as MMS Table 1 prints a dash)."""
    return na if pd.isna(x) else f"{x:.2f}"


def _fmt_ci(d: float, lo: float, hi: float) -> str:
    """Signed difference with its interval, e.g. `+0.53 [-0.10, +1.20]`."""
    if pd.isna(d):
        return "–"
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def for_display(table: pd.DataFrame, deltas: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1 for a notebook: the individual rows name their model, accuracies as '95.50';
    with `deltas` (`bootstrap_deltas`), the Δ ID and Δ Avg OOD columns instead, each
    '+0.53 [-0.10, +1.20]' (the bookkeeping columns `model`, `baseline`, `n_boot` left out)."""
    if deltas is None:
        shown = table[_value_columns(table)].map(lambda x: _fmt(x, "–"))
        shown.index = [_row_label(m, table.at[m, "model"]) for m in table.index]
    else:
        shown = pd.DataFrame(
            {
                f"Δ {axis} [95% CI]": [
                    _fmt_ci(r[col], r[f"{col}_lo"], r[f"{col}_hi"]) for _, r in deltas.iterrows()
                ]
                for axis, col in (("ID", "delta_id"), (AVG_OOD, "delta_ood"))
            },
            index=[_row_label(m, deltas.at[m, "model"]) for m in deltas.index],
        )
    shown.index.name = "method"
    return shown


def _markdown(table: pd.DataFrame, deltas: pd.DataFrame | None, note: str | None) -> str:
    """Render Table 1 (and the bootstrap deltas) as GitHub Markdown with 2 decimals."""
    cols = _value_columns(table)
    models = (
        table["model"] if "model" in table.columns else pd.Series(index=table.index, dtype=object)
    )
    lines = [
        "| Method | " + " | ".join(map(str, cols)) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, row in table.iterrows():
        cells = [_fmt(row[c], "–") for c in cols]
        lines.append(f"| {_row_label(str(label), models.get(label))} | " + " | ".join(cells) + " |")
    n_shift = len(cols) - 2
    lines += ["", f"Top-1 accuracy (%). {AVG_OOD} = mean over the {n_shift} shifted test sets."]
    if note:
        lines += ["", f"*{note}*"]
    if deltas is not None and not deltas.empty:
        base = deltas["baseline"].iloc[0]
        n_boot = int(deltas["n_boot"].iloc[0])
        lines += [
            "",
            f"Difference from the baseline ({base}), points, with paired-bootstrap 95% intervals "
            f"({n_boot} resamples of the test images):",
            "",
            "| Method | Δ ID | Δ Avg OOD |",
            "|---|---:|---:|",
        ]
        for label, r in deltas.iterrows():
            lines.append(
                f"| {_row_label(str(label), r['model'])} | "
                f"{_fmt_ci(r['delta_id'], r['delta_id_lo'], r['delta_id_hi'])} | "
                f"{_fmt_ci(r['delta_ood'], r['delta_ood_lo'], r['delta_ood_hi'])} |"
            )
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def _latex(table: pd.DataFrame, note: str | None) -> str:
    """Render Table 1 as a booktabs LaTeX tabular (pandas Styler), the note as a last row."""
    cols = _value_columns(table)
    models = (
        table["model"] if "model" in table.columns else pd.Series(index=table.index, dtype=object)
    )
    display = pd.DataFrame(
        {"Method": [_row_label(str(i), models.get(i)) for i in table.index]}
        | {str(c): table[c].to_numpy(dtype=float) for c in cols}
    )
    tex = (
        display.style.hide(axis="index")
        .format(precision=2, na_rep="--", escape="latex")
        .format_index(escape="latex", axis=1)
        .to_latex(hrules=True, column_format="l" + "r" * len(cols))
    )
    if note:
        row = rf"\multicolumn{{{len(cols) + 1}}}{{p{{0.95\linewidth}}}}{{\footnotesize {_tex_escape(note)}}} \\"
        tex = tex.replace("\\end{tabular}", row + "\n\\end{tabular}")
    return tex


def write_table1(
    table: pd.DataFrame,
    out_dir: str | os.PathLike,
    deltas: pd.DataFrame | None = None,
    note: str | None = None,
) -> list[Path]:
    """Write MMS Table 1 as `table1.csv`, `.md` and `.tex` (+ `table1_ci.csv` with deltas), atomically."""
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise MMSoupError("Table 1 is empty; build it with mmsoup.table1.table1 first.")
    if not _value_columns(table):
        raise MMSoupError("Table 1 has no accuracy columns; build it with mmsoup.table1.table1.")
    out = Path(out_dir)
    paths = [out / "table1.csv", out / "table1.md", out / "table1.tex"]
    with atomic_path(paths[0]) as tmp:
        table.to_csv(tmp, index_label="method")
    write_text(paths[1], _markdown(table, deltas, note))
    write_text(paths[2], _latex(table, note))
    if deltas is not None:
        paths.append(out / "table1_ci.csv")
        with atomic_path(paths[3]) as tmp:
            deltas.to_csv(tmp, index_label="method")
    return paths
