"""Reporting: MMS Table 1 and MMS Fig. 2 (Soups Fig. 1) from a run's results, beside the papers' numbers.

Input is the run's long-format `results/accuracy.csv` (`method`, `kind`, `set`, `accuracy` in %,
`n`) and `results/correct.npz` (per-example correctness per `"{method}/{set}"`, for the paired
bootstrap). The best and second-best individual models are picked by held-out accuracy, as both
papers pick their best fine-tuned model (Soups Recipe 1 and MMS Alg. 1 rank the models by
held-out accuracy), never by a test set.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmsoup.errors import MMSoupError
from mmsoup.io import atomic_path, write_text

__all__ = [
    "AVG_OOD",
    "HELDOUT_SET",
    "KINDS",
    "PAPER_ID_SET",
    "PAPER_LABEL_SWAP_NOTE",
    "PAPER_SET_SIZES",
    "PAPER_SHIFTS",
    "PAPER_TABLE1",
    "bootstrap_deltas",
    "figure2",
    "load_results",
    "read_soups_individual_results",
    "table1",
    "write_table1",
]

HELDOUT_SET = "heldout"  # the held-out split of the fine-tuning data ("ImageNet2p" in Soups)
AVG_OOD = "Avg OOD"
KINDS = ("init", "individual", "soup", "ensemble", "wise")
BEST = "Best individual"
SECOND = "Second-best individual"
# MMS Table 1's row order, then the rows this project adds (learned soup, WiSE-FT, LP init).
ROW_ORDER = (
    "Uniform soup",
    "Greedy soup",
    "MMS-C8",
    "MMS-C15",
    "MMS-C26",
    "Learned soup",
    "Ensemble",
    "Greedy ensemble",
    "WiSE-FT",
    "LP init",
)
_KIND_RANK = {"soup": 0, "ensemble": 1, "wise": 2, "init": 3, "individual": 4}
_REQUIRED = ("method", "kind", "set", "accuracy")

# ---------------------------------------------------------------------------------------------
# The papers' numbers (MMS Table 1; the test set sizes of Soups §3)

PAPER_ID_SET = "ImageNet"
PAPER_SHIFTS = ("ImageNetV2", "ImageNetSketch", "ImageNetR", "ObjectNet", "ImageNetA")
PAPER_SET_SIZES = {
    HELDOUT_SET: 26_000,
    "ImageNet": 50_000,
    "ImageNetV2": 10_000,
    "ImageNetSketch": 50_889,
    "ImageNetR": 30_000,
    "ObjectNet": 18_574,
    "ImageNetA": 7_500,
}
_SOUPS_HELDOUT = "ImageNet2p"
_SOUPS_NAMES = {
    "uniform_soup": ("Uniform soup", "soup"),
    "greedy_soup": ("Greedy soup", "soup"),
    "ensemble": ("Ensemble", "ensemble"),
    "greedy_ensemble": ("Greedy ensemble", "ensemble"),
}


def _paper_table1() -> pd.DataFrame:
    """MMS Table 1 as printed, with the swapped IN-R / IN-Sketch labels put right."""
    nan = math.nan
    # Numbers in printed column order: ImageNet, IN-V2, printed "IN-R" (really Sketch), printed
    # "IN-Sketch" (really R), ObjectNet, IN-A, Avg OOD. Only the labels move, not the numbers.
    rows = {
        BEST: ("model_43", 80.38, 68.44, 44.51, 60.63, 42.62, 23.64, 47.97),
        SECOND: ("model_44", 79.89, 67.91, 41.49, 54.58, 37.98, 18.01, 44.01),
        "Uniform soup": ("Uniform soup", 79.97, 68.51, 47.71, 66.54, 45.95, 29.17, 51.57),
        "Greedy soup": ("Greedy soup", 81.03, 69.55, 47.77, 64.20, 44.90, 27.89, 50.86),
        "MMS-C8": ("MMS-C8", 80.95, 69.67, 48.15, 64.81, 45.66, 29.06, 51.47),
        "MMS-C15": ("MMS-C15", 80.80, 69.61, 47.89, 64.76, 44.45, 28.39, 51.02),
        "MMS-C26": ("MMS-C26", 80.85, 69.58, 48.04, 64.79, 45.75, 28.88, 51.41),
        "Ensemble": ("Ensemble", 81.19, nan, nan, nan, nan, nan, 50.77),
        "Greedy ensemble": ("Greedy ensemble", 81.90, nan, nan, nan, nan, nan, 49.44),
    }
    cols = ["model", PAPER_ID_SET, *PAPER_SHIFTS, AVG_OOD]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
    table.index.name = "method"
    return table


# The model names of the two individual rows are not printed in MMS; they are the Soups models
# whose per-model results match all six printed numbers (and which rank 1st/2nd on held-out).
PAPER_TABLE1: pd.DataFrame = _paper_table1()
PAPER_LABEL_SWAP_NOTE = (
    "MMS Table 1 prints its IN-R and IN-Sketch column labels swapped (the per-model results released "
    "with Model Soups put ImageNet-R at about 60-67 % and ImageNet-Sketch at about 41-48 %, e.g. the "
    "best model: R 60.63, Sketch 44.51), so here each printed number stands under its correct name."
)


# ---------------------------------------------------------------------------------------------
# Reading and checking results


def _check_acc(acc: pd.DataFrame, id_set: str, shifts: Sequence[str]) -> pd.DataFrame:
    """Validate a long-format accuracy table (the accuracy.csv schema) and return a clean copy."""
    if not isinstance(acc, pd.DataFrame):
        raise MMSoupError(
            "The accuracy table must be a pandas DataFrame in the accuracy.csv schema."
        )
    missing = [c for c in _REQUIRED if c not in acc.columns]
    if missing:
        raise MMSoupError(
            f"The accuracy table lacks column(s) {', '.join(missing)}; it needs {', '.join(_REQUIRED)}."
        )
    if acc.empty:
        raise MMSoupError("The accuracy table is empty; run the evaluation first.")
    acc = acc.copy()
    acc["method"] = acc["method"].astype(str)
    acc["set"] = acc["set"].astype(str)
    bad_kinds = sorted(set(acc["kind"].astype(str)) - set(KINDS))
    if bad_kinds:
        raise MMSoupError(
            f"Unknown kind(s) {', '.join(bad_kinds)} in the accuracy table; use one of {', '.join(KINDS)}."
        )
    acc["accuracy"] = pd.to_numeric(acc["accuracy"], errors="coerce")
    if acc["accuracy"].isna().any() or not acc["accuracy"].between(0, 100).all():
        raise MMSoupError("Every accuracy must be a number of percent in [0, 100].")
    if acc["accuracy"].max() <= 1.0 and acc["accuracy"].gt(0).any():
        raise MMSoupError("The accuracies look like fractions; write them in percent (x100).")
    if acc.groupby("method")["kind"].nunique().gt(1).any():
        raise MMSoupError("A method appears with two different kinds in the accuracy table.")
    acc = acc.drop_duplicates(subset=["method", "set", "accuracy"])
    dup = acc.duplicated(subset=["method", "set"], keep=False)
    if dup.any():
        m, s = acc.loc[dup, ["method", "set"]].iloc[0]
        raise MMSoupError(f"The accuracy table holds two different values for {m} on {s}.")
    shifts = list(shifts)
    if not shifts:
        raise MMSoupError("Give at least one shift set; Avg OOD is their mean.")
    if id_set in shifts or len(set(shifts)) != len(shifts):
        raise MMSoupError("The shift sets must be distinct and must not include the ID set.")
    known = set(acc["set"])
    unknown = [s for s in [id_set, *shifts] if s not in known]
    if unknown:
        raise MMSoupError(
            f"Unknown set(s) {', '.join(unknown)}; the accuracy table has {', '.join(sorted(known))}."
        )
    return acc


def _wide(acc: pd.DataFrame, sets: Sequence[str]) -> pd.DataFrame:
    """Pivot to one row per method (in order of first appearance) and one column per set."""
    order = list(dict.fromkeys(acc["method"]))
    wide = acc.pivot(index="method", columns="set", values="accuracy").reindex(order)
    return wide.reindex(columns=list(sets))


def _kinds(acc: pd.DataFrame) -> dict[str, str]:
    """Map each method to its kind."""
    return dict(zip(acc["method"], acc["kind"].astype(str), strict=True))


def _ranked_individuals(acc: pd.DataFrame) -> list[str]:
    """Individual fine-tuned models sorted by held-out accuracy, best first (Soups §3, MMS Alg. 1)."""
    kinds = _kinds(acc)
    individuals = [m for m in dict.fromkeys(acc["method"]) if kinds[m] == "individual"]
    if not individuals:
        return []
    held = _wide(acc, [HELDOUT_SET])[HELDOUT_SET].reindex(individuals)
    lacking = held.index[held.isna()].tolist()
    if lacking:
        raise MMSoupError(
            f"{lacking[0]} has no '{HELDOUT_SET}' accuracy; the best individual model is chosen on held-out data, so evaluate every individual model on it."
        )
    # A stable sort keeps ties (e.g. Soups' identical model_4 and model_5) in order of appearance.
    return held.sort_values(ascending=False, kind="stable").index.tolist()


def _row_methods(acc: pd.DataFrame, methods: Sequence[str] | None) -> dict[str, str]:
    """Map each Table 1 row label to the method whose numbers it shows, in MMS Table 1's order."""
    kinds = _kinds(acc)
    ranked = _ranked_individuals(acc)
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


def load_results(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Read a run's `results/accuracy.csv` and `results/correct.npz` (inputs of MMS Table 1 / Fig. 2)."""
    res = Path(run_dir) / "results"
    csv, npz = res / "accuracy.csv", res / "correct.npz"
    if not csv.is_file():
        raise MMSoupError(f"{csv} does not exist; run the evaluation notebook (03) first.")
    acc = pd.read_csv(csv)
    correct: dict[str, np.ndarray] = {}
    if npz.is_file():
        with np.load(npz) as z:
            correct = {k: np.asarray(z[k]) for k in z.files}
    return acc, correct


def read_soups_individual_results(
    path: str | os.PathLike,
    uniform_soup: str | os.PathLike | None = None,
    greedy_soup: str | os.PathLike | None = None,
    init_model: str | None = "model_0",
) -> pd.DataFrame:
    """Parse Soups' `individual_model_results.jsonl` (and soup results files) into the accuracy.csv schema.

    Each line is one JSON object: `model_name` and per-set accuracies as fractions; `ImageNet2p`
    becomes the `heldout` set, fractions become percent, and `init_model` (Soups' model_0, the
    linear-probe initialisation the released models were fine-tuned from) becomes the `LP init`
    point of Soups Fig. 1.
    """
    records: list[dict] = []
    seen: set[str] = set()
    for file in [p for p in (path, uniform_soup, greedy_soup) if p is not None]:
        file = Path(file)
        if not file.is_file():
            raise MMSoupError(f"{file} does not exist; download it from mlfoundations/model-soups.")
        for lineno, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                name = str(obj.pop("model_name"))
                values = {k: float(v) for k, v in obj.items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise MMSoupError(
                    f"{file} line {lineno} is not a JSON object with model_name and numeric accuracies ({e})."
                ) from e
            if name in seen:
                raise MMSoupError(f"{file} line {lineno} repeats the model {name}.")
            seen.add(name)
            if not all(0.0 <= v <= 1.0 for v in values.values()):
                raise MMSoupError(
                    f"{file} line {lineno} has an accuracy outside [0, 1]; Soups' files hold fractions."
                )
            if name == init_model:
                method, kind = "LP init", "init"
            elif re.fullmatch(r"model_\d+", name):
                method, kind = name, "individual"
            else:
                method, kind = _SOUPS_NAMES.get(
                    name, (name, "ensemble" if "ensemble" in name else "soup")
                )
            for key, frac in values.items():
                s = HELDOUT_SET if key == _SOUPS_HELDOUT else key
                records.append(
                    {
                        "method": method,
                        "kind": kind,
                        "set": s,
                        "accuracy": 100.0 * frac,
                        "n": PAPER_SET_SIZES.get(s),
                    }
                )
    if not records:
        raise MMSoupError(f"{path} holds no results; it should have one JSON object per line.")
    out = pd.DataFrame.from_records(records)
    out["n"] = out["n"].astype("Int64")  # unknown sets keep <NA>, not a float
    return out


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
    acc = _check_acc(acc, id_set, shifts)
    rows = _row_methods(acc, methods)
    if not rows:
        raise MMSoupError("No method to put in Table 1; the accuracy table has no rows to show.")
    sets = [id_set, *shifts]
    wide = _wide(acc, sets).reindex(list(rows.values()))
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
    acc = _check_acc(acc, id_set, shifts)
    rows = _row_methods(acc, None)
    kinds = _kinds(acc)
    if baseline in rows:
        base = rows[baseline]
    elif baseline in kinds:
        base = baseline
    else:
        raise MMSoupError(f"No baseline {baseline!r} in the results; pick a Table 1 row or method.")
    sets = [id_set, *shifts]
    wide = _wide(acc, sets)

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
        raise MMSoupError("Table 1 is empty; build it with mmsoup.report.table1 first.")
    if not _value_columns(table):
        raise MMSoupError("Table 1 has no accuracy columns; build it with mmsoup.report.table1.")
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


# ---------------------------------------------------------------------------------------------
# Figure 2

_PALETTE = {  # seaborn "colorblind"
    "blue": "#0173b2",
    "orange": "#de8f05",
    "green": "#029e73",
    "red": "#d55e00",
    "purple": "#cc78bc",
    "brown": "#ca9161",
    "navy": "#1f3a93",
    "cyan": "#56b4e9",
    "olive": "#8c8c00",
}
# label -> (marker, colour, size in pt^2, z-order); the soups sit above the cloud of models.
_STYLES: dict[str, tuple[str, str, float, int]] = {
    "Individual fine-tuned models": ("o", "#a0a0a0", 22, 2),
    BEST + " (held-out)": ("o", "#404040", 48, 3),
    "LP init": ("s", "#000000", 48, 4),
    "Uniform soup": ("D", _PALETTE["blue"], 60, 5),
    "Greedy soup": ("*", _PALETTE["orange"], 180, 6),
    "MMS-C8": ("P", _PALETTE["red"], 110, 7),
    "MMS-C15": ("X", _PALETTE["purple"], 90, 6),
    "MMS-C26": ("p", _PALETTE["brown"], 90, 6),
    "Learned soup": ("h", _PALETTE["green"], 90, 5),
    "Ensemble": ("^", _PALETTE["cyan"], 75, 5),
    "Greedy ensemble": ("v", _PALETTE["navy"], 75, 5),
    "WiSE-FT": ("<", _PALETTE["olive"], 75, 5),
}
_EXTRA_MARKERS = ("d", ">", "8", "H", "1", "2", "3", "4")


def _points(acc: pd.DataFrame, id_set: str, shifts: Sequence[str]) -> pd.DataFrame:
    """One point per method: x = ID top-1, y = Avg-OOD top-1, with its legend label (MMS Fig. 2)."""
    acc = _check_acc(acc, id_set, shifts)
    kinds = _kinds(acc)
    wide = _wide(acc, [id_set, *shifts])
    y = wide[list(shifts)].mean(axis=1, skipna=False)
    ranked = _ranked_individuals(acc) if HELDOUT_SET in set(acc["set"]) else []
    best = ranked[0] if ranked else None
    labels = []
    for m in wide.index:
        if m == best:
            labels.append(BEST + " (held-out)")
        elif kinds[m] == "individual":
            labels.append("Individual fine-tuned models")
        elif kinds[m] == "init":
            labels.append("LP init")
        else:
            labels.append(m)
    pts = pd.DataFrame({"label": labels, "x": wide[id_set].to_numpy(), "y": y.to_numpy()})
    return pts.dropna(subset=["x", "y"])


def _reference_points(reference: pd.DataFrame, ref_id: str) -> pd.DataFrame:
    """Points of the papers' values: a Table 1-shaped frame (like PAPER_TABLE1) or the long schema."""
    if {"method", "set", "accuracy"} <= set(reference.columns):
        sets = set(reference["set"].astype(str))
        shifts = [s for s in PAPER_SHIFTS if s in sets] or sorted(sets - {ref_id, HELDOUT_SET})
        return _points(reference, ref_id, shifts)
    if ref_id not in reference.columns or AVG_OOD not in reference.columns:
        raise MMSoupError(
            f"The reference table needs an {ref_id!r} column and an {AVG_OOD!r} column (as PAPER_TABLE1 has)."
        )
    labels = []
    for label in reference.index.astype(str):
        if label == BEST:
            labels.append(BEST + " (held-out)")
        elif label == SECOND or label.startswith("model_"):
            labels.append("Individual fine-tuned models")
        else:
            labels.append(label)
    pts = pd.DataFrame(
        {
            "label": labels,
            "x": pd.to_numeric(reference[ref_id], errors="coerce").to_numpy(),
            "y": pd.to_numeric(reference[AVG_OOD], errors="coerce").to_numpy(),
        }
    )
    return pts.dropna(subset=["x", "y"])


def _style(label: str, extras: dict[str, tuple[str, str, float, int]]):
    """Marker, colour, size and z-order for a legend label; unknown methods get spare markers."""
    if label in _STYLES:
        return _STYLES[label]
    if label.startswith("WiSE-FT"):
        return _STYLES["WiSE-FT"]
    if label not in extras:
        i = len(extras)
        colours = list(_PALETTE.values())
        extras[label] = (_EXTRA_MARKERS[i % len(_EXTRA_MARKERS)], colours[i % len(colours)], 75, 5)
    return extras[label]


def _scatter(ax, pts: pd.DataFrame, hollow: bool, extras: dict) -> None:
    """Draw the points of one panel, filled (this run) or hollow (the papers' numbers)."""
    for label, grp in pts.groupby("label", sort=False):
        marker, colour, size, z = _style(str(label), extras)
        kw = dict(marker=marker, s=size, zorder=z, label=label)
        if hollow:  # larger and on top, so a reported value rings our point when they agree
            kw |= dict(facecolors="none", edgecolors=colour, linewidths=1.4)
            kw |= dict(s=size * 1.8, zorder=z + 10)
        else:
            kw |= dict(color=colour, edgecolors="white", linewidths=0.6)
        if str(label) == "Individual fine-tuned models":
            kw["alpha"] = 0.85
        ax.scatter(grp["x"], grp["y"], **kw)


def _legend_order(label: str) -> tuple[int, str]:
    """Legend entries in Table 1's order: models first, then the soups and ensembles."""
    order = list(_STYLES)
    return (order.index(label), "") if label in order else (len(order), label)


def figure2(
    acc: pd.DataFrame,
    id_set: str,
    shifts: Sequence[str],
    out_dir: str | os.PathLike,
    reference: pd.DataFrame | None = None,
    title: str | None = None,
) -> list[Path]:
    """MMS Fig. 2 / Soups Fig. 1: ID top-1 vs Avg-OOD top-1 for every model, soup and ensemble.

    Writes `figure2.png` (200 dpi) and `figure2.pdf` atomically. With `reference` (e.g.
    PAPER_TABLE1, or the papers' per-model results in the long schema) on the same ID set, the
    papers' values are drawn on our axes as hollow markers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pts = _points(acc, id_set, shifts)
    if pts.empty:
        raise MMSoupError("No method has both ID and every shift accuracy; nothing to plot.")
    ref_pts = None
    if reference is not None:
        if id_set not in reference.columns and id_set not in set(reference.get("set", [])):
            raise MMSoupError(
                f"The reference has no {id_set} accuracy; the papers' values are drawn only on the same ID set."
            )
        ref_pts = _reference_points(reference, id_set)
        if ref_pts.empty:
            raise MMSoupError("The reference has no point with both ID and Avg OOD accuracy.")
    rc = {
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 10,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "axes.grid": True,
        "grid.color": "#e6e6e6",
        "axes.edgecolor": "#555555",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "pdf.fonttype": 42,  # TrueType in the PDF, so the text stays editable and searchable
    }
    import matplotlib as mpl

    # the papers' values as hollow markers on our axes, so each reported point sits beside ours
    with mpl.rc_context(
        rc
    ):  # no global state: the caller's pyplot backend and style stay as they are
        fig = Figure(figsize=(7.2, 6.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        extras: dict = {}
        _scatter(ax, pts, hollow=False, extras=extras)
        ax.set_xlabel(f"ID top-1 accuracy on {id_set} (%)")
        ax.set_ylabel(f"Avg OOD top-1 accuracy (%)\nmean over {len(shifts)} shifted test sets")
        legend_title = None
        if ref_pts is not None:
            _scatter(ax, ref_pts, hollow=True, extras=extras)
            legend_title = "filled: this run    hollow: reported in the papers"
        ax.xaxis.set_major_locator(MaxNLocator(7))
        ax.yaxis.set_major_locator(MaxNLocator(7))
        ax.margins(0.06)
        # One legend below the axes, so it never covers a point; a label drawn both filled and
        # hollow shows its filled (this run's) handle.
        handles: dict[str, object] = {}
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
        labels = sorted(handles, key=_legend_order)
        fig.legend(
            [handles[k] for k in labels],
            labels,
            loc="outside lower center",
            ncols=min(3, len(labels)),
            frameon=False,
            title=legend_title,
            title_fontsize=10,
        )
        if title:
            fig.suptitle(title)
        out = Path(out_dir)
        paths = [out / "figure2.png", out / "figure2.pdf"]
        with atomic_path(paths[0]) as tmp:
            fig.savefig(tmp, format="png", dpi=200, metadata={"Software": None})
        with atomic_path(paths[1]) as tmp:  # no creation date: the same results give the same file
            fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})
    return paths
