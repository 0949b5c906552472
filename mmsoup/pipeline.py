"""The study as stages that the notebooks call in order; results pass only through `run_dir`.

finetune_stage  pretrain + LP init + sweep (embedded/smoke), or the released checkpoints (paper)
soup_stage      every recipe of mmsoup.recipes on the held-out split (written to run_dir/soups/)
evaluate_stage  every model and soup on the ID test set and the shifts (run_dir/results/)
figure2_stage / table1_stage   MMS Fig. 2 and Table 1 from those results
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsoup.checkpoints import load_state_dict, read_sidecar, write_sidecar
from mmsoup.context import context, id_set, ingredient_paths, shifts
from mmsoup.determinism import pinned
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import correct
from mmsoup.io import atomic_path, write_json
from mmsoup.partition import partition
from mmsoup.profiles import dataset_of, get_profile
from mmsoup.recipes import NAMES, STUDY_SCHEME, Pool, recipe


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

    bars: list[Any] = []  # a bar only when pretraining runs (the released backbone is copied)

    def on_step(step: int, total: int, loss: float) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="pretrain backbone", unit="step"))
        bars[0].set_postfix_str(f"loss {loss:.3f}", refresh=False)
        bars[0].update(step + 1 - bars[0].n)

    try:
        _, lp = prepare(profile, on_step=on_step)  # released or cached: no steps
    finally:
        for bar in bars:
            bar.close()
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
        from mmsoup.papers import read_soups_individual_results
        from mmsoup.results import HELDOUT_SET

        acc = read_soups_individual_results(results, init_model=None)
        held = acc[acc["set"] == HELDOUT_SET]
        accs = pd.DataFrame({"name": held["method"], "val_acc": held["accuracy"] / 100})
        table = table.merge(accs, on="name", how="outer")
    return table


# -- stage 2: soups ------------------------------------------------------------------------
@_pinned_stage
def soup_stage(
    profile: str, run_dir: str | os.PathLike, recipes: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """Build every recipe (or the named ones) on the held-out split into run_dir/soups (resumable)."""
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
    model = ev.model
    pool = Pool(
        ingredients=paths,
        heldout=ev,
        val_accs=accs,
        anchor=paths[0],  # model_0: the LP init every run was fine-tuned from
        scheme=STUDY_SCHEME,
        partition=lambda scheme: partition(model.state_dict(), scheme, model=model),
        mms={"budget": get_profile(profile).mms_budget},
        state_dir=out,  # a killed MMS build resumes at its next candidate
    )
    rows = []
    for r in map(recipe, recipes or NAMES):
        file = out / r.file
        if file.is_file():
            rows.append(_summary_row(r.name, file))
            continue
        t0 = time.perf_counter()
        r.write(pool, out)
        meta = read_sidecar(file, timings=True)  # a checkpoint's sidecar, or an ensemble's file
        meta["seconds"] = time.perf_counter() - t0
        write_sidecar(file.with_suffix(".json"), meta)
        rows.append(_summary_row(r.name, file))
    _record_time(run_dir, "soups", time.perf_counter() - start)
    table = pd.DataFrame(rows).astype({"n_evals": "Int64"})  # counts as integers, blank if none
    with atomic_path(out / "summary.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.2f")
    return table


def _optimizers(info: dict[str, Any]) -> str:
    """The nevergrad optimizers that ran in an MMS soup, e.g. 'Cobyla ×7' (NGOpt picks per
    dimension and budget); empty for a recipe without one."""
    runs = Counter(r["optimizer"] for r in info.get("optimizers", []))
    return ", ".join(f"{name} ×{n}" for name, n in runs.most_common())


def _summary_row(name: str, file: Path) -> dict[str, Any]:
    """A recipe's line in soups/summary.csv (no wall time: the file is committed; the seconds
    are in soups/timings/)."""
    meta = read_sidecar(file)
    return {
        "method": name,
        "val_acc": 100 * meta.get("val_acc", float("nan")),
        "ingredients": len(meta.get("ingredients", [])),
        "n_evals": meta.get("n_evals"),
        "optimizer": _optimizers(meta.get("info", {})),
        "file": file.name,
    }


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
        models.append((name, recipe(name).kind, soups_dir / file))
    # one set at a time (only its images on the device), every model on it; Soups §2 ensembles
    # from their members' raw logits on that set when the pool's logits fit in memory
    found: dict[tuple[str, str], np.ndarray] = {}
    bar = tqdm(total=len(sets) * len(models), desc="evaluate", unit="model")
    for s in sets:
        ev = ctx.evaluators[s]
        keep = ev.n * ev.num_classes * len(paths) < 2e8  # floats: at most 800 MB
        raw: dict[int, torch.Tensor] = {}  # each pool model's raw logits on this set
        for name, kind, src in models:
            if kind == "ensemble":
                members = json.loads(Path(src).read_text())["ingredients"]
                if all(i in raw for i in members):  # mean raw logits, then the projection
                    logits = ev.project(sum(raw[i] for i in members) / len(members))
                else:
                    logits = ensemble_logits([paths[i] for i in members], ev)
            else:
                ev.load(load_state_dict(src))
                z = ev.logits(project=False)
                if keep and Path(src) in paths:
                    raw[paths.index(Path(src))] = z
                logits = ev.project(z)
            found[name, s] = correct(logits, ev.targets.cpu())
            bar.update()
        ctx.evaluators.release(s)
    bar.close()
    rows, hits = [], {}
    for name, kind, _ in models:  # method-major, as the results have always been written
        for s in sets:
            ok = hits[f"{name}/{s}"] = found[name, s]
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
    from mmsoup.papers import PAPER_TABLE1
    from mmsoup.plots import figure2
    from mmsoup.results import load_results

    paper = dataset_of(profile).papers_report
    title = f"mmsoup, {profile} profile"
    if paper and not (Path(run_dir) / "results" / "accuracy.csv").is_file():
        acc, title = _soups_released_results(), "Soups' released per-model results (no run here)"
    else:
        acc, _ = load_results(run_dir)
    reference = PAPER_TABLE1 if paper else None
    return figure2(
        acc, id_set(profile), shifts(profile), figures_dir, reference=reference, title=title
    )


def _soups_released_results() -> pd.DataFrame:
    """Soups' individual_model_results.jsonl (+ soup files when fetched): Figure 2 without data or GPU."""
    from mmsoup.data.manifest import artifact_path
    from mmsoup.papers import read_soups_individual_results

    per_model = artifact_path("individual_model_results")
    if not per_model.is_file():
        raise MMSoupError(
            "There are no results in the run folder and no Soups per-model results file; run notebook 03 "
            "or `python -m mmsoup data fetch individual_model_results`."
        )
    extra = {k: artifact_path(f"{k}_results") for k in ("uniform_soup", "greedy_soup")}
    return read_soups_individual_results(
        per_model, **{k: v for k, v in extra.items() if v.is_file()}
    )


def table1_stage(profile: str, run_dir: str | os.PathLike, figures_dir: str | os.PathLike):
    """MMS Table 1 with paired-bootstrap intervals vs the best individual model; writes CSV/MD/TeX."""
    from mmsoup.papers import PAPER_LABEL_SWAP_NOTE
    from mmsoup.results import load_results
    from mmsoup.table1 import bootstrap_deltas, table1, write_table1

    acc, hits = load_results(run_dir)
    table = table1(acc, id_set(profile), shifts(profile))
    deltas = bootstrap_deltas(hits, acc, id_set(profile), shifts(profile))
    note = PAPER_LABEL_SWAP_NOTE if dataset_of(profile).papers_report else None
    paths = write_table1(table, figures_dir, deltas=deltas, note=note)
    return table, deltas, paths


def _record_time(run_dir: Path, stage: str, seconds: float) -> None:
    """Add a stage's wall time to run_dir/timings.json (for the README and the benchmarks)."""
    file = Path(run_dir) / "timings.json"
    times = json.loads(file.read_text()) if file.is_file() else {}
    times[stage] = round(seconds, 1)
    write_json(file, times)
