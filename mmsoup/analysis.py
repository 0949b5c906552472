"""Why soups work: the analyses of Soups §3.2 and its appendices, as pandas tables.

error_landscape     held-out error on the plane through θ_0, θ_a, θ_b (Soups Fig. 2)
pair_table          interpolation advantage, update angle, ensemble and soup of every pair
                    (Soups §3.2, Figs. 3 and 4)
random_order_soups  uniform and greedy soup as models arrive in random order (Soups Fig. B.1)
wise_curves         WiSE-FT curves from θ_0 to each model, and the soups beside them (Soups Fig. D.1)

Every function takes ingredients (state dicts or checkpoint paths) and a val_acc callable or an
`Evaluator`; accuracies in the tables are percentages. `load_pool` gathers a run's pool and
evaluators on seeded subsets of each set, so a chapter's cost is set by one number of images.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mmsoup.checkpoints import Ingredient, open_ingredient, read_sidecar
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator, accuracy
from mmsoup.progress import tqdm
from mmsoup.soups import uniform_soup, wise_ft

StateDict = Mapping[str, Tensor]
ValAcc = Callable[[StateDict], float]
HPARAMS = ("lr", "weight_decay", "epochs", "label_smoothing", "mixup_alpha", "augment", "seed")


# -- the pool and its evaluators ----------------------------------------------------------------
@dataclass
class Pool:
    """A run's ingredients (model_0, the LP init, first) with evaluators on subsets of each set."""

    ingredients: list[Ingredient]
    heldout: Evaluator
    models: pd.DataFrame  # name and hyper-parameters of each ingredient, in pool order
    tests: dict[str, Evaluator] = field(default_factory=dict)  # ID test set first, then shifts
    soups: dict[str, Ingredient] = field(default_factory=dict)  # e.g. notebook 02's soups
    threads: int | None = None  # the profile's torch threads (mmsoup.determinism.pinned)

    @property
    def id_set(self) -> str:
        """Name of the in-distribution test set (the first of `tests`)."""
        return next(iter(self.tests))

    @property
    def names(self) -> list[str]:
        """Names of the ingredients, model_0 first."""
        return list(self.models["name"])


def subset(ev: Evaluator, images: int | None, seed: int = 0) -> Evaluator:
    """An Evaluator on the same live model over a seeded random subset of `images` examples."""
    if images is None or images >= ev.n:
        return ev
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(ev.n, generator=g)[:images].sort().values.to(ev.images.device)
    return Evaluator(
        ev.model,
        ev.images[idx],
        ev.labels[idx],
        device=ev.device,
        batch_size=ev.batch_size,
        preprocess=ev.preprocess,
        projection=ev.projection,
        amp=ev.amp,
    )


def hparams(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Name and fine-tuning hyper-parameters of each checkpoint, from its sidecar (Soups App. J.2.1)."""
    rows = []
    for path in paths:
        meta = read_sidecar(path)
        config = meta.get("config", {})
        row = {"name": meta.get("name", Path(path).stem)}
        row |= {k: config.get(k) for k in HPARAMS}
        if meta.get("kind") == "lp_init":
            row["augment"] = "LP init"
        rows.append(row)
    return pd.DataFrame(rows)


def load_pool(
    profile: str, run_dir: str | os.PathLike, images: int | None = None, seed: int = 0
) -> Pool:
    """The run's pool, hyper-parameters, notebook 02's soups and evaluators on `images` per set."""
    from mmsoup.context import context, ingredient_paths
    from mmsoup.profiles import get_profile

    paths = ingredient_paths(profile, run_dir)
    ctx = context(profile)
    tests = {name: subset(ctx.evaluators[name], images, seed) for name in ctx.test_sets}
    soups = {
        name: Path(run_dir) / "soups" / f"{file}.safetensors"
        for name, file in (("Uniform soup", "uniform_soup"), ("Greedy soup", "greedy_soup"))
    }
    return Pool(
        ingredients=list(paths),
        heldout=subset(ctx.heldout, images, seed),
        models=hparams(paths),
        tests=tests,
        soups={name: p for name, p in soups.items() if p.is_file()},
        threads=get_profile(profile).threads,
    )


# -- weight-space geometry ----------------------------------------------------------------------
def _float_keys(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def flat_update(theta0: Ingredient, theta: Ingredient) -> Tensor:
    """θ - θ_0 over every floating parameter, flattened to one float64 vector."""
    a, b = open_ingredient(theta0), open_ingredient(theta)
    return torch.cat([(b[k].double() - a[k].double()).flatten() for k in _float_keys(a)])


def angle(u: Tensor, v: Tensor) -> float:
    """The angle between two vectors in degrees (Soups §3.2, Fig. 3)."""
    nu, nv = u.norm(), v.norm()
    if nu == 0 or nv == 0:
        raise MMSoupError("One update is zero (a model equal to θ_0); its angle is undefined.")
    cos = float(torch.dot(u, v) / (nu * nv))
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def update_angle(theta0: Ingredient, a: Ingredient, b: Ingredient) -> float:
    """Angle in degrees between θ_a - θ_0 and θ_b - θ_0, all floating parameters (Soups §3.2, Fig. 3)."""
    return angle(flat_update(theta0, a), flat_update(theta0, b))


@dataclass
class Plane:
    """The plane through θ_0, θ_a, θ_b: orthonormal u ∥ θ_a - θ_0 and v (Soups Fig. 2, Garipov et al.)."""

    origin: dict[str, Tensor]
    u: Tensor  # (P,) float64, unit norm
    v: Tensor  # (P,) float64, unit norm, orthogonal to u
    keys: list[str]  # the floating keys, in the order of u and v

    def coords(self, state: Ingredient) -> tuple[float, float]:
        """(x, y) of a state's projection on the plane, in units of parameter-space distance."""
        d = flat_update(self.origin, state)
        return float(torch.dot(d, self.u)), float(torch.dot(d, self.v))

    def point(self, x: float, y: float) -> dict[str, Tensor]:
        """The state dict θ_0 + x·u + y·v (non-floating entries from θ_0)."""
        flat = x * self.u + y * self.v
        out = dict(self.origin)
        i = 0
        for k in self.keys:
            t = self.origin[k]
            out[k] = (t.double() + flat[i : i + t.numel()].view(t.shape)).to(t.dtype)
            i += t.numel()
        return out


def plane(theta0: Ingredient, a: Ingredient, b: Ingredient) -> Plane:
    """Gram–Schmidt basis of the plane through three models (Soups Fig. 2)."""
    origin = dict(open_ingredient(theta0))
    da, db = flat_update(origin, a), flat_update(origin, b)
    if da.norm() == 0:
        raise MMSoupError("θ_a equals θ_0; pick a fine-tuned model for the plane.")
    u = da / da.norm()
    w = db - torch.dot(db, u) * u
    if w.norm() <= 1e-6 * db.norm():  # float32 weights: a relative residual of ~1e-7 is a line
        raise MMSoupError(
            "θ_0, θ_a and θ_b lie on one line; pick two models with different updates."
        )
    return Plane(origin, u, w / w.norm(), _float_keys(origin))


def error_landscape(
    theta0: Ingredient,
    a: Ingredient,
    b: Ingredient,
    val_acc: ValAcc,
    grid: int = 9,
    margin: float = 0.2,
    progress: bool = True,
) -> pd.DataFrame:
    """Held-out error on a grid × grid lattice of the plane through θ_0, θ_a, θ_b (Soups Fig. 2).

    Rows with point == "grid" are the lattice; four more rows mark θ_0, θ_a, θ_b and their average
    ½(θ_a + θ_b). The lattice covers the three models with `margin` of their extent on each side.
    """
    if grid < 2:
        raise MMSoupError(f"grid must be at least 2 points per axis, got {grid}.")
    basis = plane(theta0, a, b)
    marks = {
        "θ_0": (0.0, 0.0),
        "θ_a": basis.coords(a),
        "θ_b": basis.coords(b),
    }
    marks["average"] = tuple(0.5 * (p + q) for p, q in zip(marks["θ_a"], marks["θ_b"]))
    xs, ys = zip(*marks.values())
    pad = margin * max(max(xs) - min(xs), max(ys) - min(ys))
    gx = np.linspace(min(xs) - pad, max(xs) + pad, grid)
    gy = np.linspace(min(ys) - pad, max(ys) + pad, grid)
    todo = [("grid", x, y) for y in gy for x in gx] + [(n, x, y) for n, (x, y) in marks.items()]
    rows = []
    for name, x, y in tqdm(todo, desc="error landscape", unit="model", disable=not progress):
        acc = 100 * val_acc(basis.point(x, y))
        rows.append({"point": name, "x": float(x), "y": float(y), "acc": acc, "error": 100 - acc})
    return pd.DataFrame(rows)


# -- pairs: interpolation advantage, angle, ensemble vs soup ---------------------------------
def heldout_logits(
    ingredients: Sequence[Ingredient], ev: Evaluator, progress: bool = True
) -> list[Tensor]:
    """Raw (N, C) held-out logits of each ingredient: one forward pass each (Soups §2, ensembles)."""
    out = []
    for ing in tqdm(ingredients, desc="held-out logits", unit="model", disable=not progress):
        ev.load(open_ingredient(ing))
        out.append(ev.logits(project=False))
    return out


def logit_accuracies(logits: Sequence[Tensor], ev: Evaluator) -> list[float]:
    """Top-1 accuracy (a fraction, as `ev(state)` returns) of each model from its raw logits."""
    labels = ev.labels.cpu()
    return [accuracy(ev.project(z), labels) for z in logits]


def pair_table(
    ingredients: Sequence[Ingredient],
    ev: Evaluator,
    logits: Sequence[Tensor] | None = None,
    names: Sequence[str] | None = None,
    lr: Sequence[float] | None = None,
    init: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Every pair of fine-tuned models: soup, ensemble, interpolation advantage and update angle.

    Interpolation advantage = Acc(½θ_a + ½θ_b) - ½(Acc(θ_a) + Acc(θ_b)) in points; angle between
    θ_a - θ_0 and θ_b - θ_0 over all floating parameters (Soups §3.2, Fig. 3). The ensemble
    averages the pair's logits (Soups §2); `pair_lr` is the geometric mean of the two learning
    rates (Soups Fig. 4). The ingredient at `init` is θ_0 and is in no pair.
    """
    names = list(names) if names is not None else [f"model_{i}" for i in range(len(ingredients))]
    logits = list(logits) if logits is not None else heldout_logits(ingredients, ev, progress)
    accs = [100 * a for a in logit_accuracies(logits, ev)]
    tuned = [i for i in range(len(ingredients)) if i != init]
    updates = {i: flat_update(ingredients[init], ingredients[i]) for i in tuned}
    labels = ev.labels.cpu()
    rows = []
    pairs = list(itertools.combinations(tuned, 2))
    for i, j in tqdm(pairs, desc="pairs", unit="pair", disable=not progress):
        soup = 100 * ev(uniform_soup([ingredients[i], ingredients[j]]))
        ens = 100 * accuracy(ev.project((logits[i] + logits[j]) / 2), labels)
        row = {
            "a": names[i],
            "b": names[j],
            "acc_a": accs[i],
            "acc_b": accs[j],
            "soup": soup,
            "ensemble": ens,
            "advantage": soup - (accs[i] + accs[j]) / 2,
            "angle": angle(updates[i], updates[j]),
        }
        if lr is not None:
            row |= {"lr_a": lr[i], "lr_b": lr[j], "pair_lr": math.sqrt(lr[i] * lr[j])}
        rows.append(row)
    return pd.DataFrame(rows)


# -- the pool in random order ---------------------------------------------------------------
def random_order_soups(
    ingredients: Sequence[Ingredient],
    val_acc: ValAcc,
    seeds: Sequence[int] = (0,),
    ingredient_val_accs: Sequence[float] | None = None,
    test_acc: ValAcc | None = None,
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Uniform and greedy soup of the first k models of a seeded random order, k = 1..n (Soups Fig. B.1).

    The greedy soup of each prefix is Soups Recipe 1 on that prefix (best-first by held-out
    accuracy, ties in arrival order; strict improvement). Soups are scored by `val_acc` (held-out,
    in %) and, with `test_acc`, on a test set; "best" is the prefix's best model on held-out.
    Accuracies are memoised by the set of members, so a soup met twice is evaluated once.
    """
    n = len(ingredients)
    names = list(names) if names is not None else [f"model_{i}" for i in range(n)]
    if ingredient_val_accs is None:
        ingredient_val_accs = [val_acc(open_ingredient(x)) for x in ingredients]
    accs = [float(a) for a in ingredient_val_accs]
    memo: dict[tuple[str, frozenset[int]], float] = {
        ("val", frozenset([i])): a for i, a in enumerate(accs)
    }

    def score(kind: str, members) -> float:
        key = (kind, frozenset(members))
        if key not in memo:
            fn = val_acc if kind == "val" else test_acc
            memo[key] = fn(uniform_soup([ingredients[i] for i in sorted(key[1])]))
        return memo[key]

    rows = []
    steps = [(s, k) for s in seeds for k in range(1, n + 1)]
    for seed, k in tqdm(steps, desc="random order", unit="step", disable=not progress):
        order = np.random.default_rng(seed).permutation(n).tolist()
        seen = order[:k]
        ranked = sorted(seen, key=lambda i: -accs[i])  # stable: ties keep arrival order
        soup, best = [ranked[0]], accs[ranked[0]]
        for i in ranked[1:]:
            acc = score("val", [*soup, i])
            if acc > best:
                soup.append(i)
                best = acc
        row = {
            "seed": seed,
            "k": k,
            "added": names[order[k - 1]],
            "best": 100 * accs[ranked[0]],
            "uniform": 100 * score("val", seen),
            "greedy": 100 * best,
            "greedy_size": len(soup),
        }
        if test_acc is not None:
            row |= {
                "best_test": 100 * score("test", [ranked[0]]),
                "uniform_test": 100 * score("test", seen),
                "greedy_test": 100 * score("test", soup),
            }
        rows.append(row)
    return pd.DataFrame(rows)


# -- WiSE-FT curves ------------------------------------------------------------------------------
def wise_curves(
    init: Ingredient,
    models: Mapping[str, Ingredient],
    evaluators: Mapping[str, ValAcc],
    alphas: Sequence[float] = (0.25, 0.5, 0.75),
    soups: Mapping[str, Ingredient] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """WiSE-FT curves θ(α) = (1-α)·θ_0 + α·θ from the init to each model, and soups (Soups Fig. D.1).

    One row per point with its accuracy (%) on every set of `evaluators`; `ID` is the first set and
    `OOD` the mean of the others. α = 0 (θ_0) and α = 1 (the model itself) end every curve; the
    soups are single points (alpha NaN).
    """
    if not evaluators:
        raise MMSoupError("wise_curves needs at least one evaluation set.")
    sets = list(evaluators)
    grid = sorted({0.0, 1.0, *(float(a) for a in alphas)})

    def scores(state: StateDict) -> dict[str, float]:
        row = {s: 100 * evaluators[s](state) for s in sets}
        row["ID"] = row[sets[0]]
        row["OOD"] = float(np.mean([row[s] for s in sets[1:]])) if len(sets) > 1 else float("nan")
        return row

    todo = [("θ_0", None, 0.0)]
    todo += [(name, ing, a) for name, ing in models.items() for a in grid if a > 0]
    todo += [(name, ing, float("nan")) for name, ing in (soups or {}).items()]
    rows, at_init = [], None
    for name, ing, alpha in tqdm(todo, desc="WiSE-FT curves", unit="model", disable=not progress):
        if ing is None:
            at_init = scores(open_ingredient(init))
            continue
        if math.isnan(alpha):
            rows.append(
                {"curve": name, "kind": "soup", "alpha": alpha, **scores(open_ingredient(ing))}
            )
            continue
        if not any(r["curve"] == name for r in rows):  # every curve starts at θ_0
            rows.append({"curve": name, "kind": "WiSE-FT", "alpha": 0.0, **at_init})
        state = open_ingredient(ing) if alpha == 1.0 else wise_ft(init, ing, alpha)
        rows.append({"curve": name, "kind": "WiSE-FT", "alpha": alpha, **scores(state)})
    return pd.DataFrame(rows)


# =============================================================================================
# Reading a run for the chapters (notebooks 01, 02, 03): read-only views of the files the stages
# wrote (sweep/, soups/), as tables for mmsoup.plots; nothing here computes a soup
# =============================================================================================
INERT_WHY = (
    "no gradient reaches the image classifier's output (e.g. the text tower): λ cannot change it"
)


def training_losses(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """Training loss by step of each sweep run, from `sweep/logs/model_K.log` (parallel sweeps only).

    A sweep run in-process (`jobs=1`) writes no log, so the table is then empty; the sidecars
    record no losses.
    """
    import re

    rows = []
    pattern = re.compile(r"^step (\d+)/(\d+) loss ([-+0-9.eEnaif]+)$")
    for log in sorted(Path(sweep_dir, "logs").glob("model_*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = pattern.match(line.strip())
            if m:
                step, total, loss = int(m[1]), int(m[2]), float(m[3])
                rows.append({"name": log.stem, "step": step, "total": total, "loss": loss})
    return pd.DataFrame(rows, columns=["name", "step", "total", "loss"])


def soup_record(run_dir: str | os.PathLike, method: str) -> dict:
    """What the soup stage saved for a recipe (e.g. 'Greedy soup'): its sidecar, or an ensemble's JSON."""
    import json

    from mmsoup.recipes import recipe

    file = Path(run_dir) / "soups" / recipe(method).file
    if not file.is_file():
        raise MMSoupError(f"{file} does not exist; run the soup stage (notebook 02) first.")
    return read_sidecar(file) if file.suffix == ".safetensors" else json.loads(file.read_text())


def greedy_path(record: Mapping) -> pd.DataFrame:
    """The path of a greedy soup or greedy ensemble: each candidate, best-first, and the decision.

    Row 0 is the start (the best ingredient); then one row per candidate with the held-out accuracy
    of the soup (or ensemble) with it added, the best so far before it, and whether it was kept
    (Soups Recipe 1: kept iff strictly better).
    """
    from mmsoup.result import best_first

    if "trace" not in record:
        raise MMSoupError(
            "This record was made by an older mmsoup that did not save its trace; rebuild it (notebook 02)."
        )
    accs = list(record["ingredient_val_accs"])
    first = best_first(accs)[0]
    decisions = record.get("info", {}).get("decisions")
    if decisions is None:  # a greedy ensemble: its trace's 'greedy' rows, members in `ingredients`
        members = set(record["ingredients"])
        decisions = [
            {"candidate": r["candidate"], "acc": r["acc"], "accepted": r["candidate"] in members}
            for r in record["trace"]
            if r["stage"] == "greedy"
        ]
    rows = [dict(step=0, candidate=first, own_acc=accs[first], acc=accs[first], best_before=np.nan,
                 decision="start")]  # fmt: skip
    best = accs[first]
    for k, d in enumerate(decisions, 1):
        rows.append(dict(step=k, candidate=d["candidate"], own_acc=accs[d["candidate"]],
                         acc=d["acc"], best_before=best,
                         decision="accepted" if d["accepted"] else "rejected"))  # fmt: skip
        best = d["acc"] if d["accepted"] else best
    out = pd.DataFrame(rows)
    out[["own_acc", "acc", "best_before"]] *= 100
    return out


def mms_decisions(record: Mapping) -> pd.DataFrame:
    """Each MMS candidate, best-first: Ψ's accuracy before it, the τ test and the decision (MMS Alg. 1).

    approx_acc is Ψ̃ = k/(k+1)·Ψ + 1/(k+1)·θ_i; the candidate is optimised only if approx_acc
    passes τ·acc(Ψ) (else 'skipped'), and accepted only if the best λ beats Ψ. Accuracies in %.
    """
    from mmsoup.result import best_first

    info = record["info"]
    tau = info["params"]["tau"]
    accs = list(record["ingredient_val_accs"])
    psi, k, rows = accs[best_first(accs)[0]], 1, []
    for step, d in enumerate(info["decisions"], 1):
        rows.append(dict(step=step, candidate=d["candidate"], own_acc=accs[d["candidate"]],
                         psi_acc=psi, threshold=tau * psi, lambda0=k / (k + 1),
                         approx_acc=d["approx_acc"], best_acc=d.get("best_acc", np.nan),
                         decision=d["decision"]))  # fmt: skip
        if d["decision"] == "accepted":
            psi, k = d["best_acc"], k + 1
    out = pd.DataFrame(rows)
    cols = ["own_acc", "psi_acc", "threshold", "approx_acc", "best_acc"]
    out[cols] *= 100
    return out


def mms_trace(record: Mapping) -> pd.DataFrame:
    """Every held-out evaluation of an MMS soup's λ searches: candidate, stage, n-th of its search, acc (%)."""
    rows = [r for r in record["trace"] if r["stage"] != "ingredient"]
    out = pd.DataFrame(rows, columns=["eval", "candidate", "stage", "lambdas", "acc"])
    out["acc"] *= 100
    out["k"] = out.groupby("candidate").cumcount()  # 0: the approximate average Ψ̃ (λ0)
    return out


def mms_lambdas(record: Mapping) -> pd.DataFrame:
    """λ* per component (rows) of each accepted MMS step (columns `model_i`); empty if none.

    λ_j is the share of Ψ kept in component j: Ψ'^j = λ^j·Ψ^j + (1-λ^j)·θ_i^j (MMS Alg. 1).
    """
    comps = list(record["weights"])  # the plan's order, REST ('_uncovered', at λ0) last
    steps = [d for d in record["info"]["decisions"] if d["decision"] == "accepted"]
    if any("lambdas" not in d for d in steps):
        raise MMSoupError(
            "This MMS soup was made by an older mmsoup that did not record λ* per step; "
            "rebuild it (notebook 02) to see them."
        )
    cols = {f"model_{d['candidate']}": d["lambdas"] for d in steps}
    return pd.DataFrame(cols, index=comps[: len(steps[0]["lambdas"])] if steps else comps)


def partition_table(model: torch.nn.Module, scheme: str) -> pd.DataFrame:
    """Every component of a scheme's base partition: tensors, parameters, live or inert, and why.

    `scheme` as in `mmsoup.partition` (e.g. 'C8+live'): with '+live' the inert components are
    dropped from the λ search and their keys follow λ0 (REST); without it every component is searched.
    """
    from mmsoup.partition import describe, live_components, partition

    base, _, live_only = scheme.partition("+")
    comps = partition(model.state_dict(), base)
    _, dropped = live_components(comps, model)
    table = describe(comps, model)
    table["live"] = ~table["component"].isin(dropped)
    table["searched"] = table["live"] if live_only else True
    table["why"] = np.where(table["live"], "", INERT_WHY)
    return table


def example_images(
    profile: str, sets: Sequence[str], per_set: int = 6, seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """A seeded choice of `per_set` (images, labels) from each named set of a profile (as evaluated)."""
    from mmsoup.context import load_set

    out = {}
    for name in sets:
        images, labels, _, _ = load_set(profile, name)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(labels), generator=g)[:per_set].sort().values
        out[name] = (images[idx], labels[idx])
    return out


# -- the chapter's tables on disk: `make figures` redraws notebook 07's figures from them --------
TABLES = ("landscape", "pairs", "random_order", "wise")


def save_tables(
    run_dir: str | os.PathLike, meta: Mapping | None = None, **tables: pd.DataFrame
) -> list[Path]:
    """Write notebook 07's tables to `run_dir/analysis/<name>.csv` (and `meta.json`: titles, labels).

    These are small (a few hundred rows) and committed with the run's results, so the chapter's
    figures can be redrawn (`mmsoup figures`) without the checkpoints.
    """
    from mmsoup.io import atomic_path, write_json

    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise MMSoupError(
            f"Unknown analysis table {unknown[0]!r}; the tables are {', '.join(TABLES)}."
        )
    folder = Path(run_dir) / "analysis"
    paths = []
    for name, frame in tables.items():
        with atomic_path(folder / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        paths.append(folder / f"{name}.csv")
    if meta is not None:
        paths.append(write_json(folder / "meta.json", dict(meta)))
    return paths


def load_tables(run_dir: str | os.PathLike) -> tuple[dict[str, pd.DataFrame], dict]:
    """The tables `save_tables` wrote (those present) and their meta.json ({} when absent)."""
    import json

    folder = Path(run_dir) / "analysis"
    tables = {
        n: pd.read_csv(folder / f"{n}.csv") for n in TABLES if (folder / f"{n}.csv").is_file()
    }
    meta = (
        json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    )
    return tables, meta


# -- the chapters' tables, formatted for reading ---------------------------------------------------
_HPARAM_FORMATS = {  # column -> (shown as, format); a missing value shows empty
    "val_acc": ("held-out (%)", lambda x: f"{100 * x:.2f}"),
    "lr": ("lr", lambda x: f"{x:.1e}"),
    "weight_decay": ("weight decay", lambda x: f"{x:.1e}"),
    "epochs": ("epochs", lambda x: f"{int(x)}"),
    "label_smoothing": ("label smoothing", lambda x: f"{x:.2f}"),
    "mixup_alpha": ("mixup α", lambda x: f"{x:.2f}"),
    "randaug_m": ("RandAugment M", lambda x: f"{int(x)}"),
    "randaug_n": ("RandAugment N", lambda x: f"{int(x)}"),
    "seed": ("seed", lambda x: f"{int(x)}"),
    "wall_seconds": ("train time (s)", lambda x: f"{x:.0f}"),
}


def hparam_display(runs: pd.DataFrame) -> pd.DataFrame:
    """The sweep's table for reading (chapters 01, 07): one row per model, only the columns that
    vary between runs, held-out accuracy in percent, integers as integers, rates in e-notation."""
    varying = [c for c in runs.columns if c != "name" and runs[c].astype(str).nunique() > 1]
    out = pd.DataFrame(index=pd.Index(runs["name"], name="model"))
    for c in varying:
        label, fmt = _HPARAM_FORMATS.get(c, (c, None))
        col = runs[c].to_numpy()
        out[label] = [
            "" if pd.isna(v) else fmt(v) if fmt and not isinstance(v, str) else str(v) for v in col
        ]
    return out


def training_curve_runs(runs: pd.DataFrame, losses: pd.DataFrame) -> dict[str, str]:
    """The best, a middle and the worst fine-tuned run on held-out that logged losses, each with
    its legend label (e.g. 'model_9: best on held-out, 95.60 %'); {} when none logged."""
    if "val_acc" not in runs or losses.empty:
        return {}
    logged = set(losses["name"])
    tuned = runs[(runs["name"] != "model_0") & runs["name"].isin(logged)]
    ranked = tuned.dropna(subset=["val_acc"]).sort_values("val_acc", ascending=False)
    if ranked.empty:
        return {}
    picks = {"best": 0, "middle": len(ranked) // 2, "worst": len(ranked) - 1}
    out: dict[str, str] = {}
    for role, i in picks.items():
        r = ranked.iloc[i]
        out.setdefault(r["name"], f"{r['name']}: {role} on held-out, {100 * r['val_acc']:.2f} %")
    return out
