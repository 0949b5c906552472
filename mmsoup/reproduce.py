"""Headless reproduction: execute the numbered notebooks 01 -> 05 with papermill into one run folder."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsoup.errors import MMSoupError
from mmsoup.io import cache_root, check_writable

PIPELINE = (
    "01_finetune_sweep",
    "02_soups",
    "03_ood_evaluation",
    "04_figure2",
    "05_table1",
)
INTERACTIVE = ("06_lambda_explorer",)
# chapters that read the study's results (07: why soups work, 08: the replicate study from
# figures/replicates.csv); run after it when executed copies are kept. Chapter 06's executed copy
# opens the paper-conditions run of the ablation, so `make ablation --executed` writes it.
READING = ("07_why_soups_work", "08_replicates")
KERNEL = "python3"  # the venv's own ipykernel (jupyter_client maps "python" to sys.executable)


def notebooks_dir() -> Path:
    """The folder of the numbered notebooks (in the source tree)."""
    here = Path(
        os.environ.get("MMSOUP_NOTEBOOKS", Path(__file__).resolve().parents[1] / "notebooks")
    )
    if not (here / f"{PIPELINE[0]}.ipynb").is_file():
        raise MMSoupError(
            f"The notebooks are not in {here}; run from a clone of the repository or set MMSOUP_NOTEBOOKS."
        )
    return here


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The parameters a notebook declares in its cell tagged `parameters`."""
    import papermill

    return {k: v["default"] for k, v in papermill.inspect_notebook(str(path)).items()}


def run_notebook(
    name: str,
    parameters: Mapping[str, Any],
    out_dir: Path,
    kernel_name: str = KERNEL,
    stream: bool = True,
) -> Path:
    """Execute one notebook with papermill; a failing cell becomes one MMSoupError naming it."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    src = notebooks_dir() / f"{name}.ipynb"
    if not src.is_file():
        raise MMSoupError(
            f"There is no notebook {name!r} in {src.parent}; pick one of {', '.join(PIPELINE + READING)}."
        )
    declared = notebook_parameters(src)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise MMSoupError(
            f"Notebook {name} has no parameter {unknown[0]!r}; its parameters are {', '.join(declared)}."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.ipynb"
    env_before = os.environ.get("MMSOUP_PLAIN_PROGRESS")
    os.environ["MMSOUP_PLAIN_PROGRESS"] = "1"  # text progress bars, streamed to this terminal
    before, stopped = _children(), []

    def interrupted(signum, frame):  # Ctrl-C: stop the kernel first (quietly), then unwind
        stopped.append(_stop_kernels(before))
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupted) if main else None
    try:
        papermill.execute_notebook(
            str(src),
            str(out),
            parameters=dict(parameters),
            kernel_name=kernel_name,
            progress_bar=False,
            stdout_file=sys.stdout if stream else None,
            stderr_file=sys.stderr if stream else None,
            cwd=str(src.parent),
            # the kernel's own log: errors only (not "Kernel is running over TCP without
            # encryption" once per notebook; the kernel listens on localhost only)
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except KeyboardInterrupt:  # the kernel and what it started are stopped, none left behind
        if not stopped:
            stopped.append(_stop_kernels(before))
        raise KeyboardInterrupt(
            f"in notebook {name}, its kernel stopped; run the same command again to resume "
            "(finished stages are kept)"
        ) from None
    except PapermillExecutionError as e:
        raise MMSoupError(
            f"Notebook {name} failed in cell {e.exec_count or e.cell_index} ({e.ename}: {e.evalue}); "
            f"the executed copy with the traceback is {out}."
        ) from e
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        if env_before is None:
            os.environ.pop("MMSOUP_PLAIN_PROGRESS", None)
        else:
            os.environ["MMSOUP_PLAIN_PROGRESS"] = env_before
    return out


def _children() -> set[int]:
    """Process ids of this process's descendants (the kernels papermill starts are among them)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_kernels(before: set[int], wait_s: float = 5.0) -> int:
    """Stop the descendants started since `before` (a notebook's kernel and what it started):
    SIGTERM, then SIGKILL after `wait_s`; returns how many there were."""
    import psutil

    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=wait_s)
    return len(procs)


def reproduce(
    profile: str = "embedded",
    out: str | os.PathLike = "figures",
    run_dir: str | os.PathLike | None = None,
    notebooks: Sequence[str] = PIPELINE,
    extra: Mapping[str, Any] | None = None,
    stream: bool = True,
    executed: str | os.PathLike | None = None,
    results: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Run the study's notebooks in order (fine-tune, soups, evaluation, Figure 2, Table 1).

    Results pass between notebooks only through files in `run_dir`; figures go to `out`.
    With `executed`, each executed notebook is also written there with this machine's paths
    replaced by the notebooks' own defaults (`../runs/<profile>`, `../figures`), to be read
    without running anything; with `results`, the run's results without checkpoints are copied
    there (`publish_results`). Returns the wall time of each notebook in seconds.
    """
    from mmsoup.profiles import get_profile

    get_profile(profile)  # unknown profile: one clear error before anything runs
    run_dir = check_writable(Path(run_dir or Path("runs") / profile), "--run-dir").resolve()
    out = check_writable(out, "--out").resolve()
    if executed is not None:
        executed = check_writable(executed, "--executed").resolve()
        reading = [n for n in READING if n != "08_replicates" or (out / "replicates.csv").is_file()]
        notebooks = (*notebooks, *[n for n in reading if n not in notebooks])
    if importlib.util.find_spec("papermill") is None:
        raise MMSoupError("reproduce needs papermill; install it with `pip install papermill`.")
    for name in notebooks:  # every notebook is there before the first one runs
        if not (notebooks_dir() / f"{name}.ipynb").is_file():
            raise MMSoupError(
                f"There is no notebook {name!r} in {notebooks_dir()}; pick from {', '.join(PIPELINE)}."
            )
    times: dict[str, float] = {}
    for i, name in enumerate(notebooks, 1):
        params = {"profile": profile, "run_dir": str(run_dir)}
        declared = notebook_parameters(notebooks_dir() / f"{name}.ipynb")
        if "figures_dir" in declared:
            params["figures_dir"] = str(out)
        if "interactive" in declared:  # headless: the explorer's readouts, not its live widget
            params["interactive"] = False
        params.update(extra or {})
        print(f"[{i}/{len(notebooks)}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        done = run_notebook(name, params, run_dir / "notebooks", stream=stream)
        times[name] = time.perf_counter() - start
        if executed is not None:
            here = {run_dir: f"../runs/{profile}", out: "../figures", notebooks_dir(): "."}
            publish(done, executed / done.name, here | {cache_root(): "$MMSOUP_CACHE"})
        print(
            f"[{i}/{len(notebooks)}] {name} done in {times[name]:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    if results is not None:
        here = {run_dir: f"runs/{profile}", out: "figures", cache_root(): "$MMSOUP_CACHE"}
        publish_results(run_dir, check_writable(results, "--results"), here)
    return times


def _relative(text: str, paths: Mapping[Path, str]) -> str:
    """`text` with this machine's absolute paths replaced by their stand-ins, longest first."""
    for path, relative in sorted(paths.items(), key=lambda kv: -len(str(kv[0]))):
        text = text.replace(str(path), relative)
    return text


def publish(notebook: Path, dest: Path, paths: Mapping[Path, str]) -> Path:
    """Copy an executed notebook with absolute paths of this machine replaced (longest first),
    e.g. the run folder by `../runs/embedded`, written atomically."""
    from mmsoup.io import write_text

    write_text(dest, clean_notebook(_relative(notebook.read_text(), paths)))
    return dest


# What a run's results are, without its checkpoints: committed as `results/embedded` (a few
# hundred KB) so that `mmsoup figures` redraws every figure and table from a clean clone.
RESULT_FILES = (
    "results/accuracy.csv",
    "results/correct.npz",
    "soups/summary.csv",
    "soups/*.json",
    "sweep/*.json",
    "sweep/logs/*.log",
    "analysis/*.csv",
    "analysis/meta.json",
)  # no timings: they differ run to run (each stage's in <run-dir>/timings.json, each file's in timings/)


def publish_results(
    run_dir: str | os.PathLike, dest: str | os.PathLike, paths: Mapping[Path, str]
) -> list[Path]:
    """Copy a run's results (RESULT_FILES, no checkpoints) to `dest`, replacing it whole.

    Text files get this machine's absolute paths replaced (`paths`, longest first). The copy is
    built beside `dest` and swapped in, so an interrupted publish leaves the old results whole.
    """
    import shutil
    import tempfile

    from mmsoup.io import write_text

    run_dir, dest = Path(run_dir), Path(dest)
    if not (run_dir / "results" / "accuracy.csv").is_file():
        raise MMSoupError(f"{run_dir} has no results to publish; run notebooks 01-03 first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    written = []
    try:
        for pattern in RESULT_FILES:
            for src in sorted(run_dir.glob(pattern)):
                rel = src.relative_to(run_dir)
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                if src.suffix in (".json", ".csv", ".log"):
                    write_text(out, _relative(src.read_text(), paths))
                else:
                    shutil.copyfile(src, out)
                written.append(dest / rel)
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def rebuild_figures(
    results: str | os.PathLike, out: str | os.PathLike = "figures", profile: str = "embedded"
) -> list[Path]:
    """Every figure and table of the study from committed results, without re-running it.

    From `results` (a run folder without checkpoints, e.g. `results/embedded`): Figure 2 and
    Table 1 (notebooks 04, 05) and, when notebook 07 saved its tables, its five figures; from
    `out/replicates.csv`: the replicate study's `replicates.{md,png}` (notebook 08); from
    `results/../ablation` when it holds finished runs: `ablation.{csv,md,png}` (notebook 09).
    """
    import pandas as pd

    from mmsoup import ablation, analysis, pipeline, plots, replicates

    results, out = Path(results), check_writable(out, "--out")
    if not (results / "results" / "accuracy.csv").is_file():
        raise MMSoupError(
            f"There are no results in {results}; pass the committed results folder (e.g. results/embedded)."
        )
    written = [*pipeline.figure2_stage(profile, results, out)]
    written += pipeline.table1_stage(profile, results, out)[2]
    tables, meta = analysis.load_tables(results)
    for stem, fig in plots.why_soups_figures(tables, meta).items():
        written.append(plots.save_png(fig, out / f"{stem}.png"))
    if (out / "replicates.csv").is_file():
        rows = pd.read_csv(out / "replicates.csv")
        written += replicates.write_report(rows, out, profile)[1]
    ablation_results = results.parent / "ablation"  # results/ablation beside results/embedded
    if any(ablation_results.glob(f"*/r*/{ablation.DONE}")):
        written += ablation.write_summary(ablation_results, out)
    return written


# -- a reader's run against the committed one ------------------------------------------------------
# `make reproduce` writes its executed chapters, results and figures into a staging tree inside the
# run folder that mirrors the repository (runs/embedded/publish/notebooks/executed/..., .../results/
# embedded/..., .../figures/...), never over the committed files; it then compares the two trees and
# says in one line whether they match. `make publish` copies the staging tree over the repository.
STAGING = "publish"
EXECUTED, RESULTS, FIGURES = "notebooks/executed", "results/embedded", "figures"
# committed inputs the chapters read from the figures folder (04, 05, 08): copied into the staging
# tree before the run, and not part of the comparison (the run does not make them)
SEEDED = ("figures/replicates.csv", "figures/ablation.csv")


def repository() -> Path:
    """The repository root: the folder that holds `notebooks/`."""
    return notebooks_dir().parent


def staging_dir(run_dir: str | os.PathLike) -> Path:
    """The staging tree of a run folder (`<run-dir>/publish`)."""
    return Path(run_dir) / STAGING


def prepare_staging(run_dir: str | os.PathLike, repo: Path | None = None) -> Path:
    """An empty staging tree, with the committed inputs the chapters read (SEEDED) copied in."""
    import shutil

    repo, root = repo or repository(), staging_dir(run_dir)
    shutil.rmtree(root, ignore_errors=True)
    for sub in (EXECUTED, RESULTS, FIGURES):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
    (root / FIGURES).mkdir(parents=True, exist_ok=True)
    for rel in SEEDED:
        if (repo / rel).is_file():
            shutil.copyfile(repo / rel, root / rel)
    return root


_STYLER_ID = re.compile(r"T_[0-9a-f]{5}(?=[_\"'\s{])")
_ADDRESS = re.compile(r"0x[0-9a-f]{8,16}")
_CELL_CLOCK = ("start_time", "end_time", "duration", "exception")


def clean_notebook(text: str) -> str:
    """An executed notebook without what changes from one run of the same code to the next.

    Removed: papermill's times (per cell and for the notebook), the kernel's execution
    timestamps, Python's patch version; replaced: the random id of papermill's parameters cell,
    pandas Styler's random table ids (by ids numbered per cell) and object addresses
    (`0x7f...` -> `0x…`). Cleaning twice changes nothing.
    """
    nb = json.loads(text)
    meta = nb.get("metadata", {})
    for key in _CELL_CLOCK:
        meta.get("papermill", {}).pop(key, None)
    info = meta.get("language_info", {})
    if "version" in info:
        info["version"] = ".".join(str(info["version"]).split(".")[:2])
    for i, cell in enumerate(nb.get("cells", [])):
        cmeta = cell.get("metadata", {})
        cmeta.pop("execution", None)
        if "injected-parameters" in cmeta.get("tags", []):  # papermill gives it a random id
            cell["id"] = "injected-parameters"
        for key in _CELL_CLOCK:
            cmeta.get("papermill", {}).pop(key, None)
        ids: dict[str, str] = {}

        def stable(match: re.Match, i: int = i, ids: dict[str, str] = ids) -> str:
            return ids.setdefault(match.group(0), f"T_c{i}t{len(ids)}")

        for out in cell.get("outputs", []):
            for key, value in list(out.get("data", {}).items()):
                if key.startswith("text/"):
                    joined = "".join(value) if isinstance(value, list) else value
                    joined = _ADDRESS.sub("0x…", _STYLER_ID.sub(stable, joined))
                    out["data"][key] = joined.splitlines(keepends=True)
            if "text" in out:
                joined = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
                out["text"] = _ADDRESS.sub("0x…", joined).splitlines(keepends=True)
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


@dataclass
class Comparison:
    """A staged run against the committed files: which differ, and the first difference."""

    files: list[str]  # repository paths the run wrote (SEEDED left out)
    differing: list[str]
    first: str = ""  # the first differing file's first difference, in words
    cause: str = ""  # the likely cause, in words

    def line(self, staging: str | os.PathLike) -> str:
        """The one line `make reproduce` ends with."""
        n = len(self.files)
        if not self.differing:
            return f"reproduce: identical to the committed run ({n} of {n} files)"
        return (
            f"reproduce: differs from the committed run in {len(self.differing)} of {n} files "
            f"(first: {self.first}); likely cause: {self.cause}; this run's copies are in "
            f"{staging}, and `make publish` makes them the committed reference"
        )


def _token(line: str, other: str) -> str:
    """The first differing word of `line` against `other` (a number where there is one)."""
    for a, b in zip(re.split(r"[\s,\"':]+", line), re.split(r"[\s,\"':]+", other)):
        if a != b:
            return a[:40]
    return line.strip()[:40]


def first_difference(rel: str, committed: bytes | None, staged: bytes) -> str:
    """Where two versions of a file first differ, e.g. `results/embedded/soups/summary.csv
    line 3: 96.40 -> 96.30`."""
    if committed is None:
        return f"{rel} is new"
    try:
        old, new = committed.decode().splitlines(), staged.decode().splitlines()
    except UnicodeDecodeError:
        return f"{rel} (binary)"
    if Path(rel).suffix == ".npz":
        return f"{rel} (binary)"
    for n, (a, b) in enumerate(zip(old, new), 1):
        if a != b:
            return f"{rel} line {n}: {_token(a, b)} -> {_token(b, a)}"
    return f"{rel}: {len(old)} lines -> {len(new)} lines"


def _record(root: Path) -> dict[str, Any]:
    """The numerics and versions records of a tree's first sweep sidecar (what decides the bits)."""
    for side in sorted((root / RESULTS / "sweep").glob("model_*.json")):
        meta = json.loads(side.read_text())
        return {"numerics": meta.get("numerics", {}), "versions": meta.get("versions", {})}
    return {}


def likely_cause(staged: Path, repo: Path) -> str:
    """Why a run's bytes differ from the committed ones, from the two trees' sidecar records."""
    mine, theirs = _record(staged), _record(repo)
    changes = []
    for part, label in (
        ("numerics", "another instruction-set setting"),
        ("versions", "another library version"),
    ):
        a, b = theirs.get(part, {}), mine.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                changes.append(f"{label}: {key} {a.get(key)} -> {b.get(key)}")
    if changes:
        return "; ".join(changes[:3])
    return "same instruction-set settings and library versions; another CPU without AVX2 or a code change"


def compare_with_committed(
    staging: str | os.PathLike, repo: str | os.PathLike | None = None
) -> Comparison:
    """Compare every file of the staging tree (SEEDED left out) with the committed file."""
    staging, repo = Path(staging), Path(repo) if repo is not None else repository()
    files = sorted(
        p.relative_to(staging).as_posix()
        for p in staging.rglob("*")
        if p.is_file() and p.relative_to(staging).as_posix() not in SEEDED
    )
    differing, first = [], ""
    for rel in files:
        staged, committed = (staging / rel).read_bytes(), repo / rel
        old = committed.read_bytes() if committed.is_file() else None
        if old != staged:
            differing.append(rel)
            first = first or first_difference(rel, old, staged)
    cause = likely_cause(staging, repo) if differing else ""
    return Comparison(files, differing, first, cause)


def publish_run(run_dir: str | os.PathLike, repo: str | os.PathLike | None = None) -> list[Path]:
    """Make a staged run the committed reference (`make publish`): its results folder replaces
    `results/embedded` whole (built beside it and swapped in), every other file is written
    atomically over the committed one."""
    import shutil

    from mmsoup.io import atomic_path

    root, repo = staging_dir(run_dir), Path(repo) if repo is not None else repository()
    if not (root / RESULTS / "results" / "accuracy.csv").is_file():
        raise MMSoupError(f"There is no staged run in {root}; run `make reproduce` first.")
    written = []
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root).as_posix()
        if not src.is_file() or rel in SEEDED or rel.startswith(RESULTS + "/"):
            continue
        dest = repo / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        written.append(dest)
    dest = repo / RESULTS
    dest.parent.mkdir(parents=True, exist_ok=True)
    new, old = dest.with_name(f".{dest.name}.new"), dest.with_name(f".{dest.name}.old")
    for d in (new, old):
        shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(root / RESULTS, new)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    written += [p for p in dest.rglob("*") if p.is_file()]
    return written
