"""What the papers published: MMS Table 1's numbers, the test set sizes, and Soups' released results.

MMS Table 1 is kept as printed (with its swapped IN-R / IN-Sketch labels put right); Soups'
`individual_model_results.jsonl` (and its soup results files) are read into this project's
accuracy.csv schema, so Figure 2 can be drawn from the released numbers without data or a GPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from mmsoup.errors import MMSoupError
from mmsoup.recipes import recipe, slug
from mmsoup.results import HELDOUT_SET, LP_INIT
from mmsoup.table1 import AVG_OOD, BEST, SECOND

__all__ = [
    "PAPER_ID_SET",
    "PAPER_LABEL_SWAP_NOTE",
    "PAPER_SET_SIZES",
    "PAPER_SHIFTS",
    "PAPER_TABLE1",
    "read_soups_individual_results",
]

# The test sets of Soups §3 and their sizes
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
# The recipes Soups' released results name, by their names there (which are our file names)
_SOUPS_RECIPES = {
    slug(name): recipe(name)
    for name in ("Uniform soup", "Greedy soup", "Ensemble", "Greedy ensemble")
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


# The released C8 run of MMS (the author's main.log and phase1_results.json, summarised in
# tests/fixtures/author_c8_run.json): the conditions MMS ran under, beside the embedded study's.
AUTHOR_C8_RUN = {
    "heldout_images": 26_000,  # ImageNet2p, Soups' held-out 2 % of ImageNet train
    "budget": 240,  # Cobyla evaluations per pass (30 per component; the paper says ~250)
    "candidates": 71,  # model_1..model_71 after the best model
    "optimised": 27,  # passed the τ test (6 accepted, 21 rejected)
    "accepted": 6,
    "skipped": 44,
}


def mms_vs_baselines() -> pd.DataFrame:
    """MMS-C8 against the best model, greedy soup and uniform soup on the papers' own numbers
    (MMS Table 1; its C8 row is the released C8 run, its soup rows Soups' released results to
    0.01 point), points: one run each, so no interval."""
    t = PAPER_TABLE1
    rows = []
    for other in (BEST, "Greedy soup", "Uniform soup"):
        rows.append(
            {
                "MMS-C8 minus": other,
                "Δ ID (ImageNet)": t.loc["MMS-C8", PAPER_ID_SET] - t.loc[other, PAPER_ID_SET],
                "Δ Avg OOD": t.loc["MMS-C8", AVG_OOD] - t.loc[other, AVG_OOD],
            }
        )
    return pd.DataFrame(rows).round(2)


# The model names of the two individual rows are not printed in MMS; they are the Soups models
# whose per-model results match all six printed numbers (and which rank 1st/2nd on held-out).
PAPER_TABLE1: pd.DataFrame = _paper_table1()
PAPER_LABEL_SWAP_NOTE = (
    "MMS Table 1 prints its IN-R and IN-Sketch column labels swapped (the per-model results released "
    "with Model Soups put ImageNet-R at about 60-67 % and ImageNet-Sketch at about 41-48 %, e.g. the "
    "best model: R 60.63, Sketch 44.51), so here each printed number stands under its correct name."
)


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
                method, kind = LP_INIT, "init"
            elif re.fullmatch(r"model_\d+", name):
                method, kind = name, "individual"
            else:
                known = _SOUPS_RECIPES.get(name)
                method, kind = (
                    (known.name, known.kind)
                    if known
                    else (name, "ensemble" if "ensemble" in name else "soup")
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
