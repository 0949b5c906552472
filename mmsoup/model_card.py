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
    best_file = Path(results["files"][best])
    lines = [
        *_front_matter(cfg, list(soups)),
        f"# Soup of {len(names)} checkpoints of `{cfg.model}`",
        "",
        f"Made by mmsoup with `mmsoup soup --config {Path(cfg.source).name}`. Best on the held-out set: "
        f"**{best}** ({soups[best].val_acc:.4f}), file `{Path(results['files'][best]).name}`.",
        "",
        *_how_to_load(cfg, best_file, pool.model),
        "## Ingredients",
        "",
        _table(
            pd.DataFrame(
                {
                    "#": range(len(names)),
                    "checkpoint": [cfg.shown(p) for p in pool.ingredients],
                    "held-out acc": accs,
                    "sha256": [_sha256(p) for p in pool.ingredients],
                }
            )
        ),
        "",
        *(
            [f"Fine-tuned from `init`: `{cfg.shown(cfg.init)}` (sha256 `{_sha256(cfg.init)}`).", ""]
            if cfg.values.get("init")
            else []
        ),
        "## Soups",
        "",
    ]
    rows = []
    tests = {r: s.info["test"] for r, s in soups.items() if s.info.get("test")}
    for r, res in soups.items():
        bn = res.info.get("bn_recalibration", {})
        row = {"recipe": r, "held-out acc": res.val_acc}
        if tests:
            row["test acc"] = tests[r]["acc"] if r in tests else "-"
        row |= {
            "ingredients": ", ".join(str(i) for i in res.ingredients),
            "evaluations": res.n_evals,
            "BN mixed stats acc": bn.get("acc_mixed_statistics", "-"),
        }
        if bn:
            row["BN stats kept"] = bn.get("kept", "-")
        rows.append(row | {"file": Path(results["files"][r]).name})
    lines += [_table(pd.DataFrame(rows)), ""]
    if tests:
        t = next(iter(tests.values()))
        lines += [
            f"**Test accuracy** (`{t['set']}`, {t['n']} examples): each soup scored once on it after "
            "it was built. The held-out accuracies chose the ingredients and λ (greedy, MMS) and are "
            "optimistic; the test accuracy is the unbiased number.",
            "",
        ]
    lines += _bn_lines(soups)
    if results.get("preprocess"):
        lines += [f"Preprocessing of image folders: {results['preprocess']}.", ""]
    for r, res in soups.items():  # what each search decided, read from the record it left
        decisions = res.info.get("decisions") or [{}]
        if "n_components" in res.info:  # a manifold mixing search: λ* per component
            lines += _mms_section(res, r)
        elif "accepted" in decisions[0]:  # a greedy search: each candidate in or out
            dec = pd.DataFrame(res.info["decisions"])
            dec["decision"] = np.where(dec.pop("accepted"), "accepted", "rejected")
            lines += ["## Greedy soup: candidates (Soups Recipe 1)", "", _table(dec), ""]
    spent = results["ingredient_evals"] + sum(  # an ensemble's passes are its members' ranking
        s.n_evals for s in soups.values() if isinstance(s, SoupResult)
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


def _bn_lines(soups: Mapping[str, Any]) -> list[str]:
    """Which BatchNorm statistics each soup carries, and why."""
    bns = {r: s.info["bn_recalibration"] for r, s in soups.items() if "bn_recalibration" in s.info}
    if not bns:
        return []
    mode = next(iter(bns.values()))["mode"]
    said = []
    for r, bn in bns.items():
        how = (
            "recalibrated statistics"
            if bn.get("kept") == "recalibrated"
            else "mixed statistics (recalibration lowered held-out accuracy "
            f"{bn['acc_mixed_statistics']:.4f} -> {bn['acc_recalibrated']:.4f}, so it was not kept)"
        )
        said.append(f"{r}: {how}")
    return [f"BatchNorm statistics (bn_recalibration: {mode}): " + "; ".join(said) + ".", ""]


def _mms_section(res: SoupResult, key: str) -> list[str]:
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
        f"## Manifold mixing soup (MMS Alg. 1): {key}",
        "",
        *([f"**Warning:** {res.info['warning']}", ""] if res.info.get("warning") else []),
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


def _front_matter(cfg: Any, recipes: list[str]) -> list[str]:
    """The YAML front matter a merged model published on a hub carries (base model, tags,
    library, a license to fill in)."""
    from mmsoup.factories import family

    library = family(str(cfg.model)).library  # the model's family (checked when the pool opened)
    base = str(cfg.shown(cfg.init)) if cfg.values.get("init") else str(cfg.model)
    tags = ["model-soup", "mmsoup", "merge", *recipes]
    return [
        "---",
        f"base_model: {json.dumps(base)}",
        f"library_name: {library or 'pytorch'}",
        "tags:",
        *[f"- {json.dumps(t)}" for t in tags],
        "license: other  # set the license your ingredients allow",
        "---",
        "",
    ]


def _how_to_load(cfg: Any, file: Path, module: Any = None) -> list[str]:
    """A snippet that rebuilds the model with mmsoup's factory and loads the best soup into it."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.values.get("image_size") is not None:
        kwargs["image_size"] = cfg.image_size
    if cfg.values.get("trust_code"):
        kwargs["trust_code"] = True
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return [
        "## How to load",
        "",
        "```python",
        "from mmsoup.checkpoints import load_state_dict",
        "from mmsoup.factories import create_model",
        "",
        f"built = create_model({str(cfg.model)!r}{args})",
        f"state = load_state_dict({str(file.name)!r})  # the soup beside this card",
        "keys = built.checkpoint_keys or {}  # file names -> module names (transformers >= 5)",
        "built.module.load_state_dict({keys.get(k, k): v for k, v in state.items()})",
        "model = built.module.eval()",
        "```",
        "",
        *(
            [
                f"Or with transformers: the soup folder holds the model's `config.json` (and its "
                f"processor's files): `transformers.{type(module).__name__}.from_pretrained("
                f"{str(file.name)!r})`.",
                "",
            ]
            if file.is_dir() and (file / "config.json").is_file() and module is not None
            else []
        ),
    ]


def _sha256(path: Any) -> str:
    """The sha256 of a checkpoint file (of its index file for a sharded checkpoint or folder)."""
    from mmsoup.io import sha256_file

    p = Path(path)
    if p.is_dir():
        index = [
            f for f in ("model.safetensors.index.json", "model.safetensors") if (p / f).is_file()
        ]
        p = p / index[0] if index else p
    return sha256_file(p) if p.is_file() else "-"
