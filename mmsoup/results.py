"""A run's results: the accuracy.csv schema, reading it, and ranking the individual models.

`results/accuracy.csv` is long-format (`method`, `kind`, `set`, `accuracy` in %, `n`) and
`results/correct.npz` holds per-example correctness per `"{method}/{set}"` (for the paired
bootstrap). The best and second-best individual models are picked by held-out accuracy, as both
papers pick their best fine-tuned model (Soups Recipe 1 and MMS Alg. 1 rank the models by
held-out accuracy), never by a test set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmsoup.errors import MMSoupError

HELDOUT_SET = "heldout"  # the held-out split of the fine-tuning data ("ImageNet2p" in Soups)
LP_INIT = "LP init"  # model_0, the linear-probe initialisation every run is fine-tuned from
KINDS = ("init", "individual", "soup", "ensemble", "wise")
_REQUIRED = ("method", "kind", "set", "accuracy")


def check_acc(acc: pd.DataFrame, id_set: str, shifts: Sequence[str]) -> pd.DataFrame:
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


def by_set(acc: pd.DataFrame, sets: Sequence[str]) -> pd.DataFrame:
    """Pivot to one row per method (in order of first appearance) and one column per set."""
    order = list(dict.fromkeys(acc["method"]))
    wide = acc.pivot(index="method", columns="set", values="accuracy").reindex(order)
    return wide.reindex(columns=list(sets))


def method_kinds(acc: pd.DataFrame) -> dict[str, str]:
    """Map each method to its kind."""
    return dict(zip(acc["method"], acc["kind"].astype(str), strict=True))


def ranked_individuals(acc: pd.DataFrame) -> list[str]:
    """Individual fine-tuned models sorted by held-out accuracy, best first (Soups §3, MMS Alg. 1)."""
    kinds = method_kinds(acc)
    individuals = [m for m in dict.fromkeys(acc["method"]) if kinds[m] == "individual"]
    if not individuals:
        return []
    held = by_set(acc, [HELDOUT_SET])[HELDOUT_SET].reindex(individuals)
    lacking = held.index[held.isna()].tolist()
    if lacking:
        raise MMSoupError(
            f"{lacking[0]} has no '{HELDOUT_SET}' accuracy; the best individual model is chosen on held-out data, so evaluate every individual model on it."
        )
    # A stable sort keeps ties (e.g. Soups' identical model_4 and model_5) in order of appearance.
    return held.sort_values(ascending=False, kind="stable").index.tolist()


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


def find_results(run_dir: str | os.PathLike, committed: str | os.PathLike | None = None) -> Path:
    """The run folder whose results a reading chapter shows: `run_dir` when it has results,
    else the committed results of the embedded run (`results/embedded`, no checkpoints), so
    that chapters 04 and 05 run from a clean clone without re-running the study."""
    run_dir = Path(run_dir)
    if (run_dir / "results" / "accuracy.csv").is_file() or committed is None:
        return run_dir
    committed = Path(committed)
    if not (committed / "results" / "accuracy.csv").is_file():
        raise MMSoupError(
            f"There are no results in {run_dir} nor in {committed}; run notebooks 01-03 (or `make reproduce`) first."
        )
    print(f"No results in {run_dir}: showing the committed results in {committed}.")
    return committed
