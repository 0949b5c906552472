"""The study as stages that the notebooks call in order; results pass only through `run_dir`.

finetune_stage  pretrain + LP init + sweep (embedded/smoke), or the released checkpoints (paper)
soup_stage      every recipe on the held-out split: uniform, greedy, MMS-C8/C15/C26, learned,
                ensembles, WiSE-FT (written to run_dir/soups/)
evaluate_stage  every model and soup on the ID test set and the shifts (run_dir/results/)
figure2_stage / table1_stage   MMS Fig. 2 and Table 1 from those results
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsoup import resume
from mmsoup.checkpoints import load_state_dict, read_sidecar
from mmsoup.determinism import machine_info, pinned
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator, correct, keep_freed_memory
from mmsoup.io import atomic_path, write_json
from mmsoup.profiles import get_profile

ID_SET = {"digits": "test", "imagenet": "ImageNet"}
MMS_SCHEMES = {"MMS-C8": "C8+live", "MMS-C15": "C15+live", "MMS-C26": "C26+live"}
RECIPES = (
    "Uniform soup",
    "Greedy soup",
    *MMS_SCHEMES,
    "Learned soup",
    "WiSE-FT",
    "Ensemble",
    "Greedy ensemble",
)
WISE_ALPHAS = tuple(round(a, 2) for a in np.linspace(0.1, 1.0, 10))


def shifts(profile: str) -> tuple[str, ...]:
    """Names of the five shifted test sets of a profile's benchmark (Soups §3)."""
    if get_profile(profile).dataset == "digits":
        from mmsoup.data import digits

        return tuple(digits.SHIFTS)
    from mmsoup.data import imagenet

    return tuple(imagenet.SHIFTS)


def id_set(profile: str) -> str:
    """Name of the in-distribution test set of a profile."""
    return ID_SET[get_profile(profile).dataset]


def _pinned_stage(stage: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage with its profile's thread count and one BLAS thread (mmsoup.determinism)."""

    @functools.wraps(stage)
    def run(profile: str, *args: Any, **kwargs: Any) -> Any:
        with pinned(get_profile(profile).threads):
            return stage(profile, *args, **kwargs)

    return run


# -- stage 1: the pool of fine-tuned models ---------------------------------------------------
def finetune_stage(
    profile: str, run_dir: str | os.PathLike, jobs: int | None = None
) -> pd.DataFrame:
    """Pretrain (cached), linear-probe and run the sweep; a table of the runs (Soups App. J.2.1)."""
    prof = get_profile(profile)
    run_dir = Path(run_dir)
    if prof.search == "released":
        return _released_pool(profile)
    from mmsoup.pretrain import prepare
    from mmsoup.sweep import profile_configs, run_sweep, summary, write_sweep

    start = time.perf_counter()
    from mmsoup.progress import tqdm

    with tqdm(desc="pretrain backbone", unit="step") as bar:

        def on_step(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            bar.update(step + 1 - bar.n)

        _, lp = prepare(profile, on_step=on_step)  # cached: no steps when already pretrained
    sweep_file = write_sweep(profile_configs(profile), run_dir / "sweep", lp, profile=profile)
    run_sweep(sweep_file, jobs=jobs or prof.jobs)
    _record_time(run_dir, "finetune", time.perf_counter() - start)
    runs = pd.DataFrame(summary(sweep_file))
    lp_meta = read_sidecar(run_dir / "sweep" / "model_0.safetensors")
    init = {"name": "model_0", "val_acc": lp_meta.get("val_acc"), "augment": "LP init"}
    return pd.concat([pd.DataFrame([init]), runs], ignore_index=True)


def _released_pool(profile: str) -> pd.DataFrame:
    """The paper profile does not fine-tune: it checks the released checkpoints it uses are present."""
    from mmsoup.data.manifest import verify

    n = get_profile(profile).n_runs + 1
    table = verify(profile)  # a spec such as paper:n_runs=3 lists model_0..model_3 only
    models = table[table["name"].str.fullmatch(r"model_\d+")]
    missing = models[models["status"] != "present"]
    if len(missing):
        raise MMSoupError(
            f"{len(missing)} of the {n} released checkpoints this profile uses are missing "
            f"(e.g. {missing.iloc[0]['name']}); run `python -m mmsoup data fetch 'model_*'`."
        )
    pool = models[["name", "path"]].reset_index(drop=True)
    return pool.merge(_released_hparams(), on="name", how="left")


def _released_hparams() -> pd.DataFrame:
    """Soups' hparam_info.json and held-out (ImageNet2p) accuracies of the released models, when fetched."""
    from mmsoup.data.manifest import artifact_path

    table = pd.DataFrame({"name": pd.Series(dtype=str)})
    hparams, results = artifact_path("hparam_info"), artifact_path("individual_model_results")
    if hparams.is_file():
        info = json.loads(hparams.read_text())
        rows = [{"name": k, **v} for k, v in info.items()]
        table = pd.DataFrame(rows).rename(columns={"aug": "augment"})
        table.loc[table["name"] == "model_0", "augment"] = "LP init"
        table = table.drop(columns=["info"], errors="ignore")
    if results.is_file():  # Soups' ImageNet2p accuracy (their number, not ours), as a fraction
        from mmsoup.report import HELDOUT_SET, read_soups_individual_results

        acc = read_soups_individual_results(results, init_model=None)
        held = acc[acc["set"] == HELDOUT_SET]
        accs = pd.DataFrame({"name": held["method"], "val_acc": held["accuracy"] / 100})
        table = table.merge(accs, on="name", how="outer")
    return table


def ingredient_paths(profile: str, run_dir: str | os.PathLike) -> list[Path]:
    """The soup's pool, model_0 (the LP init, as in Soups) first, then model_1..model_n."""
    prof = get_profile(profile)
    if prof.search == "released":  # model_0..model_71, or the first n_runs + 1 of them
        from mmsoup.data.manifest import artifact_path

        return [artifact_path(f"model_{i}") for i in range(prof.n_runs + 1)]
    folder = Path(run_dir) / "sweep"
    paths = sorted(folder.glob("model_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    if len(paths) < 2:
        raise MMSoupError(
            f"{folder} holds fewer than two models; run notebook 01 (the sweep) first."
        )
    return paths


# -- the evaluation context: one live model, one Evaluator per set -------------------------------
@dataclass
class Context:
    """One live model shared by an Evaluator per data set (held-out, ID test, shifts)."""

    profile: str
    evaluators: dict[str, Evaluator]

    @property
    def heldout(self) -> Evaluator:
        """The held-out evaluator (soup construction only)."""
        return self.evaluators["heldout"]

    @property
    def test_sets(self) -> list[str]:
        """ID test set first, then the shifts."""
        return [id_set(self.profile), *shifts(self.profile)]


def context(profile: str, device: str | None = None) -> Context:
    """Build the model and load every evaluation set once (Soups §3)."""
    from mmsoup.models import create_classifier

    prof = get_profile(profile)
    if prof.dataset == "digits":
        from mmsoup.data import digits

        model = create_classifier(prof.arch, 10)
        sets = {}
        for name in ("heldout", "test", *digits.SHIFTS):
            images, labels = digits.load(name)
            sets[name] = (digits.to_tensor(images), torch.as_tensor(labels), None, None)
    else:
        from mmsoup.data.cache import build_cache, normalizer
        from mmsoup.data.imagenet import load_dataset

        model = create_classifier(prof.arch, 1000)
        sets = {}
        for name, dataset in (
            ("heldout", "ImageNet2p"),
            *[(s, s) for s in ("ImageNet", *shifts(profile))],
        ):
            split = {"per_class": prof.heldout_per_class} if dataset == "ImageNet2p" else {}
            ds = load_dataset(dataset, objectnet_border=prof.objectnet_border, **split)
            cache = build_cache(ds)
            sets[name] = (
                torch.from_numpy(np.asarray(cache.images)),
                torch.from_numpy(np.asarray(cache.labels)),
                normalizer(),
                cache.projection,
            )
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    batch_size = 1000 if cuda else 256  # on CPU, batches of 256 run ~1.3x faster (cache-sized)
    if not cuda:
        keep_freed_memory()  # the stages' evaluations reuse the same activation blocks
    evaluators = {
        name: Evaluator(
            model,
            x,
            y,
            device=device,
            preprocess=pre,
            projection=proj,
            batch_size=batch_size,
            amp=bool(prof.bf16),  # fp32 unless the profile opts into bf16 (`paper:bf16=1`)
        )
        for name, (x, y, pre, proj) in sets.items()
    }
    return Context(profile, evaluators)


# -- stage 2: soups ------------------------------------------------------------------------
@_pinned_stage
def soup_stage(
    profile: str, run_dir: str | os.PathLike, recipes: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """Build every soup on the held-out split and save it under run_dir/soups (resumable)."""
    from mmsoup.learned import learned_soup
    from mmsoup.partition import partition
    from mmsoup.soups import (
        greedy_ensemble,
        greedy_soup,
        logit_ensemble,
        manifold_mixing_soup,
        uniform_soup,
        wise_ft,
    )

    run_dir = Path(run_dir)
    out = run_dir / "soups"
    paths = ingredient_paths(profile, run_dir)
    ctx = context(profile)
    ev = ctx.heldout
    accs_file = out / "ingredient_val_accs.json"
    if accs_file.is_file():
        accs = json.loads(accs_file.read_text())
    else:  # each ingredient's own held-out accuracy, computed once for every recipe
        accs = [ev(load_state_dict(p)) for p in paths]
        write_json(accs_file, accs)
    start = time.perf_counter()
    recipes = recipes or RECIPES
    rows = []
    for name in recipes:
        file = out / f"{slug(name)}.safetensors"
        if name in ("Ensemble", "Greedy ensemble"):
            file = out / f"{slug(name)}.json"
        if file.is_file():
            rows.append(_summary_row(name, file))
            continue
        t0 = time.perf_counter()
        if name == "Uniform soup":
            from mmsoup.checkpoints import save_state_dict

            state = uniform_soup(paths)
            save_state_dict(
                state,
                file,
                {
                    "recipe": "uniform_soup",
                    "val_acc": ev(state),
                    "ingredients": list(range(len(paths))),
                },
            )
        elif name == "Greedy soup":
            greedy_soup(paths, ev, ingredient_val_accs=accs).save(file)
        elif name in MMS_SCHEMES:
            comps = partition(ev.model.state_dict(), MMS_SCHEMES[name], model=ev.model)
            state = out / f"{slug(name)}.state.json"  # a killed run resumes at its next candidate
            budget = get_profile(profile).mms_budget
            res = manifold_mixing_soup(
                paths, ev, comps, budget=budget, ingredient_val_accs=accs, state_file=state
            )
            res.save(file)
            resume.remove(state)
        elif name == "Learned soup":
            comps = partition(ev.model.state_dict(), "C26+live", model=ev.model)
            learned_soup(paths, ev, comps, ingredient_val_accs=accs).save(file)
        elif name == "WiSE-FT":
            _wise(paths, accs, ev, file, wise_ft)
        else:
            res = (greedy_ensemble if name == "Greedy ensemble" else logit_ensemble)(paths, ev)
            write_json(
                file,
                {
                    "recipe": name,
                    "val_acc": res.val_acc,
                    "ingredients": res.ingredients,
                    "n_evals": res.n_evals,
                    "info": res.info,
                    "machine": machine_info(),
                },
            )
        meta = read_sidecar(file) if file.suffix == ".safetensors" else json.loads(file.read_text())
        meta["seconds"] = time.perf_counter() - t0
        (
            write_json(file.with_suffix(".json"), meta)
            if file.suffix == ".safetensors"
            else write_json(file, meta)
        )
        rows.append(_summary_row(name, file))
    _record_time(run_dir, "soups", time.perf_counter() - start)
    table = pd.DataFrame(rows)
    with atomic_path(out / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def _wise(paths, accs, ev: Evaluator, file: Path, wise_ft) -> None:
    """WiSE-FT of the best fine-tuned model toward the LP init, α chosen on held-out (WiSE-FT, Wortsman et al., CVPR 2022)."""
    from mmsoup.checkpoints import save_state_dict

    best = max(range(1, len(paths)), key=lambda i: accs[i])  # model_0 is the LP init itself
    scores = {a: ev(wise_ft(paths[0], paths[best], a)) for a in WISE_ALPHAS}
    alpha = max(scores, key=lambda a: (scores[a], -a))  # ties: the one nearer the LP init
    state = wise_ft(paths[0], paths[best], alpha)
    meta = {
        "recipe": "wise_ft",
        "alpha": alpha,
        "finetuned": best,
        "val_acc": scores[alpha],
        "ingredients": [0, best],
        "alphas": scores,
    }
    save_state_dict(state, file, meta)


def _summary_row(name: str, file: Path) -> dict[str, Any]:
    meta = read_sidecar(file) if file.suffix == ".safetensors" else json.loads(file.read_text())
    return {
        "method": name,
        "val_acc": 100 * meta.get("val_acc", float("nan")),
        "ingredients": len(meta.get("ingredients", [])),
        "n_evals": meta.get("n_evals"),
        "seconds": round(meta.get("seconds", float("nan")), 1),
        "file": file.name,
    }


def slug(name: str) -> str:
    """A file name for a method: `MMS-C8` -> `mms_c8`."""
    return name.lower().replace("-", "_").replace(" ", "_")


# -- stage 3: evaluation -----------------------------------------------------------------------
@_pinned_stage
def evaluate_stage(profile: str, run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every model and soup on held-out, ID test and each shift; writes results/ (Soups §3)."""
    from mmsoup.progress import tqdm
    from mmsoup.soups import ensemble_logits

    run_dir = Path(run_dir)
    start = time.perf_counter()
    paths = ingredient_paths(profile, run_dir)
    ctx = context(profile)
    sets = ["heldout", *ctx.test_sets]
    models: list[tuple[str, str, Any]] = [("LP init", "init", paths[0])]
    models += [(p.stem, "individual", p) for p in paths[1:]]
    soups_dir = run_dir / "soups"
    summary = (
        pd.read_csv(soups_dir / "summary.csv")
        if (soups_dir / "summary.csv").is_file()
        else pd.DataFrame(columns=["method", "file"])
    )
    for name, file in zip(summary["method"], summary["file"]):
        kind = "ensemble" if "nsemble" in name else ("wise" if name == "WiSE-FT" else "soup")
        models.append((name, kind, soups_dir / file))
    rows, hits = [], {}
    raw: dict[
        int, dict[str, torch.Tensor]
    ] = {}  # each pool model's raw logits, reused by ensembles
    keep = sum(ev.n for ev in ctx.evaluators.values()) * ctx.heldout.num_classes * len(paths) < 2e8
    for name, kind, src in tqdm(models, desc="evaluate", unit="model"):
        if kind == "ensemble":
            members = json.loads(Path(src).read_text())["ingredients"]
            if all(i in raw for i in members):  # Soups §2: mean raw logits, then the projection
                logits = {
                    s: ev.project(sum(raw[i][s] for i in members) / len(members))
                    for s, ev in ctx.evaluators.items()
                }
            else:
                logits = {
                    s: ensemble_logits([paths[i] for i in members], ev)
                    for s, ev in ctx.evaluators.items()
                }
        else:
            ctx.heldout.load(load_state_dict(src))
            z = {s: ev.logits(project=False) for s, ev in ctx.evaluators.items()}
            if keep and Path(src) in paths:
                raw[paths.index(Path(src))] = z
            logits = {s: ctx.evaluators[s].project(z[s]) for s in sets}
        for s in sets:
            ok = correct(logits[s], ctx.evaluators[s].labels.cpu())
            hits[f"{name}/{s}"] = ok
            rows.append(
                {"method": name, "kind": kind, "set": s, "accuracy": 100 * ok.mean(), "n": ok.size}
            )
    acc = pd.DataFrame(rows)
    results = run_dir / "results"
    with atomic_path(results / "accuracy.csv") as tmp:
        acc.to_csv(tmp, index=False)
    with atomic_path(results / "correct.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **hits)
    _record_time(run_dir, "evaluate", time.perf_counter() - start)
    return acc


# -- stages 4 and 5: Figure 2 and Table 1 -----------------------------------------------------------
def figure2_stage(
    profile: str, run_dir: str | os.PathLike, figures_dir: str | os.PathLike
) -> list[Path]:
    """MMS Fig. 2 from run_dir/results (paper profile: the papers' values beside ours)."""
    from mmsoup import report

    paper = get_profile(profile).dataset == "imagenet"
    title = f"mmsoup, {profile} profile"
    if paper and not (Path(run_dir) / "results" / "accuracy.csv").is_file():
        acc, title = _soups_released_results(), "Soups' released per-model results (no run here)"
    else:
        acc, _ = report.load_results(run_dir)
    reference = report.PAPER_TABLE1 if paper else None
    return report.figure2(
        acc, id_set(profile), shifts(profile), figures_dir, reference=reference, title=title
    )


def _soups_released_results() -> pd.DataFrame:
    """Soups' individual_model_results.jsonl (+ soup files when fetched): Figure 2 without data or GPU."""
    from mmsoup import report
    from mmsoup.data.manifest import artifact_path

    per_model = artifact_path("individual_model_results")
    if not per_model.is_file():
        raise MMSoupError(
            "There are no results in the run folder and no Soups per-model results file; run notebook 03 "
            "or `python -m mmsoup data fetch individual_model_results`."
        )
    extra = {k: artifact_path(f"{k}_results") for k in ("uniform_soup", "greedy_soup")}
    return report.read_soups_individual_results(
        per_model, **{k: v for k, v in extra.items() if v.is_file()}
    )


def table1_stage(profile: str, run_dir: str | os.PathLike, figures_dir: str | os.PathLike):
    """MMS Table 1 with paired-bootstrap intervals vs the best individual model; writes CSV/MD/TeX."""
    from mmsoup import report

    acc, hits = report.load_results(run_dir)
    table = report.table1(acc, id_set(profile), shifts(profile))
    deltas = report.bootstrap_deltas(hits, acc, id_set(profile), shifts(profile))
    note = report.PAPER_LABEL_SWAP_NOTE if get_profile(profile).dataset == "imagenet" else None
    paths = report.write_table1(table, figures_dir, deltas=deltas, note=note)
    return table, deltas, paths


# -- notebook plots ------------------------------------------------------------------------------
def plot_sweep(runs: pd.DataFrame):
    """Held-out accuracy of each run against its learning rate (notebook 01)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if "val_acc" not in runs or "lr" not in runs:  # released pool without Soups' files fetched
        ax.text(
            0.5,
            0.5,
            "no learning rates or held-out accuracies to plot yet\n"
            "(paper profile: `mmsoup data fetch hparam_info individual_model_results`)",
            ha="center",
            va="center",
            fontsize=8,
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return fig
    ft = runs.dropna(subset=["lr", "val_acc"])
    ax.scatter(ft["lr"], 100 * ft["val_acc"], c="#4c72b0", label="fine-tuned runs")
    for _, r in ft.iterrows():
        ax.annotate(
            r["name"].replace("model_", ""),
            (r["lr"], 100 * r["val_acc"]),
            fontsize=7,
            xytext=(3, 2),
            textcoords="offset points",
        )
    if runs["val_acc"].notna().any() and "augment" in runs:
        lp = runs[runs["augment"] == "LP init"]
        if len(lp) and lp["val_acc"].notna().all():
            ax.axhline(100 * lp["val_acc"].iloc[0], color="grey", ls="--", label="LP init")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_mixing_weights(run_dir: str | os.PathLike, method: str = "MMS-C26"):
    """Heat map of the per-component coefficients of each ingredient in an MMS soup (notebook 02)."""
    import matplotlib.pyplot as plt

    file = Path(run_dir) / "soups" / f"{slug(method)}.safetensors"
    meta = read_sidecar(file)
    weights = pd.DataFrame(meta["weights"]).T
    weights.columns = [f"model_{i}" for i in weights.columns]
    weights = weights.loc[:, (weights > 1e-6).any()]
    weights.index = [i.removeprefix("model.") for i in weights.index]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * weights.shape[1], 0.3 * len(weights) + 1.2))
    im = ax.imshow(weights.values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(weights.shape[1]), weights.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(weights)), weights.index, fontsize=7)
    ax.set_title(f"{method}: share of each ingredient per component", fontsize=9)
    fig.colorbar(im, ax=ax, label="coefficient")
    fig.tight_layout()
    return fig


def _record_time(run_dir: Path, stage: str, seconds: float) -> None:
    """Add a stage's wall time to run_dir/timings.json (for the README and the benchmarks)."""
    file = Path(run_dir) / "timings.json"
    times = json.loads(file.read_text()) if file.is_file() else {}
    times[stage] = round(seconds, 1)
    write_json(file, times)
