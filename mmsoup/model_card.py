"""MODEL_CARD.md of a soup of your own checkpoints (`mmsoup soup --config`, `mmsoup.own`).

The ingredients and their held-out accuracies, each soup's accuracy and evaluations, the MMS
per-component λ* of every accepted candidate and each candidate's fate, the greedy soup's
decisions, the config verbatim and the library versions, as Markdown (no tabulate dependency).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmsoup.checkpoints import library_versions
from mmsoup.result import SoupResult


def _table(df: pd.DataFrame) -> str:
    """A Markdown table (no optional tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    rows = [
        [f"{v:.4f}" if isinstance(v, float) else str(v) for v in r]
        for r in df.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def model_card(pool: Any, results: Mapping[str, Any]) -> str:
    """MODEL_CARD.md: ingredients, soups, MMS λ table, candidates' fates, evaluations, config, versions.

    `pool` is an `mmsoup.own.Pool` (its `config` and ingredient `names`), `results` what
    `own.run_recipes` returned plus the written `files`.
    """
    cfg, names, accs = pool.config, pool.names, results["ingredient_val_accs"]
    soups = {r: results[r] for r in cfg.recipes}
    best = max(soups, key=lambda r: soups[r].val_acc)
    lines = [
        f"# Soup of {len(names)} checkpoints of `{cfg.model}`",
        "",
        f"Made by mmsoup with `mmsoup soup --config {Path(cfg.source).name}`. Best on the held-out set: "
        f"**{best}** ({soups[best].val_acc:.4f}), file `{Path(results['files'][best]).name}`.",
        "",
        "## Ingredients",
        "",
        _table(pd.DataFrame({"#": range(len(names)), "checkpoint": names, "held-out acc": accs})),
        "",
        "## Soups",
        "",
    ]
    rows = []
    for r, res in soups.items():
        bn = res.info.get("bn_recalibration", {})
        rows.append(
            {
                "recipe": r,
                "held-out acc": res.val_acc,
                "ingredients": ", ".join(str(i) for i in res.ingredients),
                "evaluations": res.n_evals,
                "BN mixed stats acc": bn.get("acc_mixed_statistics", "-"),
                "file": Path(results["files"][r]).name,
            }
        )
    lines += [_table(pd.DataFrame(rows)), ""]
    if "mms" in soups:
        lines += _mms_section(soups["mms"])
    if "greedy" in soups:
        dec = pd.DataFrame(soups["greedy"].info["decisions"])
        if len(dec):
            dec["decision"] = np.where(dec.pop("accepted"), "accepted", "rejected")
            lines += ["## Greedy soup: candidates (Soups Recipe 1)", "", _table(dec), ""]
    spent = results["ingredient_evals"] + sum(
        s.n_evals for r, s in soups.items() if r not in ("ensemble", "greedy_ensemble")
    )
    lines += [
        "## Evaluations spent",
        "",
        f"{spent} held-out evaluations: {results['ingredient_evals']} for the ingredients' own accuracies, "
        + ", ".join(f"{s.n_evals} by {r}" for r, s in soups.items())
        + ".",
        "",
        "## Config",
        "",
        "```yaml",
        (cfg.text or json.dumps(cfg.values, indent=2)).rstrip(),
        "```",
        "",
    ]
    if cfg.overrides:
        lines += [f"Overridden by flags: `{json.dumps(cfg.overrides)}`", ""]
    versions = library_versions() | _extra_versions()
    lines += ["## Library versions", "", _table(pd.DataFrame([versions])), ""]
    return "\n".join(lines)


def _mms_section(res: SoupResult) -> list[str]:
    """The per-component λ* of each mixed candidate and every candidate's fate (MMS Alg. 1)."""
    decisions = res.info["decisions"]
    comps = list(res.weights)
    fate = pd.DataFrame(
        [
            {
                "candidate": d["candidate"],
                "decision": d["decision"],
                "approx acc": d["approx_acc"],
                "best acc": d.get("best_acc", "-"),
            }
            for d in decisions
        ]
    )
    counts = fate["decision"].value_counts() if len(fate) else pd.Series(dtype=int)
    lam = pd.DataFrame(
        [
            {"candidate": d["candidate"], **{c: round(x, 4) for c, x in zip(comps, d["lambdas"])}}
            for d in decisions
            if d["decision"] == "accepted"
        ]
    )
    out = [
        "## Manifold mixing soup (MMS Alg. 1)",
        "",
        f"Candidates: {counts.get('accepted', 0)} accepted, {counts.get('skipped', 0)} skipped, "
        f"{counts.get('rejected', 0)} rejected; {res.info['n_components']} components.",
        "",
    ]
    if len(fate):
        out += [_table(fate), ""]
    out += ["Per-component λ* of each accepted candidate (Ψ ← λ·Ψ + (1-λ)·θ):", ""]
    out += [_table(lam) if len(lam) else "(no candidate accepted)", ""]
    return out


def _extra_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("timm", "torchvision", "safetensors", "transformers", "huggingface_hub"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found
