"""Benchmark of speed at scale (a script, not a test; issue 6) on the embedded default.

1. `reference`: one MMS objective evaluation the way both papers' public code does it (rebuild the
   state dict, `load_state_dict`, iterate a torch DataLoader that decodes the held-out set from PNG
   files) against mmsoup's Evaluator (mix in place, cached tensors), interleaved, median.
2. `reuse`: one whole MMS run (MMS Alg. 1, NGOpt, budget 250) on the embedded pool with and without
   prefix-activation reuse: evaluations, stage runs, seconds; the two traces must be identical.
   The reference approach's whole-run time is extrapolated: its per-evaluation cost x the run's
   evaluation count (printed as such).

    .venv/bin/python benchmarks/bench_scale.py [--pool /tmp/emb/sweep] [--budget 250] [--threads 2]

Writes benchmarks/results/bench_scale.csv and bench_scale.md. Without a pool folder, a small pool
of perturbed copies of one random tiny ViT stands in (said so in the results).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmsoup.checkpoints import library_versions, load_state_dict
from mmsoup.data import digits
from mmsoup.evaluate import Evaluator
from mmsoup.io import write_text
from mmsoup.models import create_classifier
from mmsoup.partition import partition
from mmsoup.soups import manifold_mixing_soup

RESULTS = Path(__file__).parent / "results"


class PngFolder(Dataset):
    """The held-out set as PNG files, decoded on every pass (the reference data path)."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            x = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
        x = ((x - digits.MEAN) / digits.STD).expand(3, -1, -1)  # ToTensor + Normalize, 3 channels
        return x, int(self.files[i].stem.split("_")[1])


def write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    """One PNG per held-out image, named index_label.png."""
    from PIL import Image

    for i, (im, y) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(folder / f"{i:05d}_{int(y)}.png")


def machine() -> str:
    """CPU model, cores and library versions, for the results' header."""
    cpu = platform.processor() or "?"
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    v = library_versions()
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads of {len(__import__('os').sched_getaffinity(0))} cores; "
        f"torch {v['torch']}, open_clip {v['open_clip']}, nevergrad {v['nevergrad']}, Python {platform.python_version()}"
    )


def pool_states(folder: Path | None) -> tuple[list, str]:
    """The embedded pool (model_*.safetensors) or a stand-in of 6 perturbed random tiny ViTs."""
    if folder is not None and folder.is_dir():
        paths = sorted(folder.glob("model_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        if len(paths) >= 2:
            return paths, f"{len(paths)} checkpoints of {folder}"
    init = create_classifier(seed=0).state_dict()
    g = torch.Generator().manual_seed(0)
    pool = [
        {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(6)
    ]
    return pool, "6 perturbed copies of a random tiny ViT (no trained pool found)"


def bench_reference(pool, images, labels, repeats: int, loader_batch: int, batch: int) -> dict:
    """Median seconds of one evaluation: reference path vs Evaluator (interleaved)."""
    base = pool[0] if isinstance(pool[0], dict) else load_state_dict(pool[0])
    other = pool[1] if isinstance(pool[1], dict) else load_state_dict(pool[1])
    model = create_classifier(seed=0)
    comps = partition(base, "C26+live", model=model)
    ev = Evaluator(
        model, digits.to_tensor(images), torch.as_tensor(labels), device="cpu", batch_size=batch
    )
    ref_model = create_classifier(seed=1).eval()
    g = torch.Generator().manual_seed(0)
    lams = torch.rand(repeats + 1, len(comps), generator=g).tolist()
    with tempfile.TemporaryDirectory(prefix="mmsoup-png-") as tmp:
        write_pngs(images, labels, Path(tmp))
        data = PngFolder(Path(tmp))

        def reference(lam: list[float]) -> float:  # rebuild, load_state_dict, decode, forward
            state = dict(base)
            for keys, w in zip(comps.values(), lam):
                for k in keys:
                    state[k] = w * base[k] + (1 - w) * other[k]
            ref_model.load_state_dict(state)
            hits = 0
            with torch.no_grad():
                for x, y in DataLoader(data, batch_size=loader_batch, num_workers=0):
                    hits += int((ref_model(x).argmax(-1) == y).sum())
            return hits / len(data)

        t_ref, t_ours, accs = [], [], []
        reference(lams[0])
        ev.mixed_accuracy(base, other, comps, lams[0])
        for lam in lams[1:]:
            t0 = time.process_time()
            a_ref = reference(lam)
            t1 = time.process_time()
            a_ours = ev.mixed_accuracy(base, other, comps, lam)  # all λ move: a full forward
            t2 = time.process_time()
            t_ref.append(t1 - t0)
            t_ours.append(t2 - t1)
            accs.append((a_ref, a_ours))
    ref, ours = statistics.median(t_ref), statistics.median(t_ours)
    return {
        "images": len(labels),
        "repeats": repeats,
        "loader_batch": loader_batch,
        "evaluator_batch": batch,
        "reference_s": ref,
        "evaluator_s": ours,
        "speedup_per_eval": ref / ours,
        "max_acc_diff": max(abs(a - b) for a, b in accs),
    }


class _Clock:
    """Wall and CPU seconds (CPU time is robust to other jobs on a shared machine)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _mms(pool, ev: Evaluator, comps, budget: int, tau: float = 0.998) -> tuple:
    """One MMS run; (result, wall s, CPU s, CPU s spent in each mixed evaluation)."""
    per_eval: list[float] = []
    mixed = ev.mixed_accuracy

    def timed(*a):  # soups.py calls val_acc.mixed_accuracy: time each objective evaluation
        c0 = time.process_time()
        acc = mixed(*a)
        per_eval.append(time.process_time() - c0)
        return acc

    ev.mixed_accuracy = timed
    clock = _Clock()
    res = manifold_mixing_soup(pool, ev, comps, tau=tau, budget=budget, progress=False)
    return (res, *clock.read(), per_eval)


def bench_reuse(pool, images, labels, scheme: str, budget: int, ab_budget: int, batch: int) -> dict:
    """Whole MMS runs with and without prefix-activation reuse (MMS Alg. 1, NGOpt).

    A/B: the first 4 models at `ab_budget`, run both ways, traces asserted identical. Whole run:
    the full pool at `budget` with reuse, measured; without reuse extrapolated as the same run with
    each mixed evaluation at the full-forward cost (median of interleaved plain evaluations).
    """
    model = create_classifier(seed=0)
    first = pool[0] if isinstance(pool[0], dict) else load_state_dict(pool[0])
    comps = partition(first, scheme, model=model)
    x, y = digits.to_tensor(images), torch.as_tensor(labels)
    out = {"scheme": scheme, "components": len(comps), "budget": budget, "ab_budget": ab_budget}
    traces = {}
    for tag, reuse in (("reuse", True), ("plain", False)):
        ev = Evaluator(model, x, y, device="cpu", batch_size=batch, reuse=reuse)
        res, wall, cpu, _ = _mms(pool[:4], ev, comps, ab_budget, tau=0.0)  # all searched
        traces[tag] = [(r["candidate"], r["lambdas"], r["acc"]) for r in res.trace]
        out |= {f"ab_{tag}_wall_s": wall, f"ab_{tag}_cpu_s": cpu, "ab_n_evals": res.n_evals}
        print("A/B", tag, out, flush=True)
    if traces["reuse"] != traces["plain"]:
        raise SystemExit("activation reuse changed the MMS trace: a bug, please report it")
    out["ab_speedup_cpu"] = out["ab_plain_cpu_s"] / out["ab_reuse_cpu_s"]
    ev = Evaluator(model, x, y, device="cpu", batch_size=batch)
    res, wall, cpu, per_eval = _mms(pool, ev, comps, budget)
    stats = ev.reuse_stats
    plain = Evaluator(model, x, y, device="cpu", batch_size=batch, reuse=False)
    full = []
    for _ in range(5):
        c0 = time.process_time()
        plain.accuracy()
        full.append(time.process_time() - c0)
    t_full = statistics.median(full)
    plain_cpu = cpu - sum(per_eval) + len(per_eval) * t_full
    out |= {"n_evals": res.n_evals, "mixed_evals": len(per_eval), "mixed": len(res.ingredients)}
    out |= {"val_acc": res.val_acc, "reuse_wall_s": wall, "reuse_cpu_s": cpu}
    out |= {"full_eval_cpu_s": t_full, "plain_cpu_s_extrapolated": plain_cpu}
    out |= {"speedup_cpu": plain_cpu / cpu, "reused": stats["reused"]}
    out["stage_fraction"] = stats["stage_runs"] / stats["stage_runs_full"]
    out["eval_cost_fraction"] = sum(per_eval) / (len(per_eval) * t_full)
    print("whole run", out, flush=True)
    return out


def main() -> None:
    """Run the benchmarks, print them, write CSV + Markdown under benchmarks/results/."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, default=Path("/tmp/emb/sweep"))
    ap.add_argument("--budget", type=int, default=250)
    ap.add_argument("--ab-budget", type=int, default=30, help="budget of the measured A/B run")
    ap.add_argument("--schemes", default="C26+live", help="partitions of the whole-run benchmark")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--loader-batch", type=int, default=256, help="the reference DataLoader's batch"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1000, help="Evaluator batch (pipeline: 1000)")
    ap.add_argument("--only", default="reference,reuse")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = digits.load("heldout")
    pool, pool_desc = pool_states(args.pool)
    csv, md = ["benchmark,config,metric,value"], ["# bench_scale", "", f"Machine: {machine()}.", ""]
    md += [
        f"Held-out set: the embedded default's {len(labels)} images (28x28); pool: {pool_desc}.",
        "",
    ]
    ref = None
    if "reference" in args.only:
        ref = bench_reference(
            pool, images, labels, args.repeats, args.loader_batch, args.batch_size
        )
        print(ref, flush=True)
        csv += [f"reference,C26+live,{k},{v}" for k, v in ref.items()]
        md += [
            "## Against the reference approach (per evaluation)",
            "",
            "Reference = rebuild the state dict, `load_state_dict`, DataLoader over PNG files "
            f"(batch {ref['loader_batch']}, 0 workers), every evaluation. Median CPU seconds of {ref['repeats']} "
            "interleaved repeats.",
            "",
            "| path | CPU s / evaluation | speed-up |",
            "|---|---|---|",
            f"| reference | {ref['reference_s']:.3f} | 1.0x |",
            f"| mmsoup Evaluator, batch {ref['evaluator_batch']} (all components move) | "
            f"{ref['evaluator_s']:.3f} | {ref['speedup_per_eval']:.2f}x |",
            "",
        ]
    for scheme in args.schemes.split(",") if "reuse" in args.only else []:
        r = bench_reuse(pool, images, labels, scheme, args.budget, args.ab_budget, args.batch_size)
        csv += [f"reuse,{scheme},{k},{v}" for k, v in r.items() if k != "scheme"]
        md += [
            f"## Prefix-activation reuse over whole MMS runs, {scheme} ({r['components']} components), NGOpt",
            "",
            f"- A/B, first 4 models, τ=0 (every candidate searched), budget {r['ab_budget']}: {r['ab_n_evals']} evaluations; identical traces; "
            f"CPU {r['ab_plain_cpu_s']:.1f} s without reuse, {r['ab_reuse_cpu_s']:.1f} s with: "
            f"**{r['ab_speedup_cpu']:.2f}x**",
            f"- whole run, all models, budget {r['budget']}: {r['n_evals']} evaluations ({r['mixed_evals']} of "
            f"Ψ'(λ)), {r['mixed']} models mixed, held-out acc {r['val_acc']:.4f}; {r['reused']} evaluations "
            f"restarted past the stem; stage runs {r['stage_fraction']:.3f} of full forwards, CPU per "
            f"evaluation {r['eval_cost_fraction']:.3f} of a full one",
            f"- CPU {r['reuse_cpu_s']:.0f} s with reuse (wall {r['reuse_wall_s']:.0f} s); without reuse "
            f"{r['plain_cpu_s_extrapolated']:.0f} s (extrapolated: each Ψ'(λ) evaluation at the full-forward "
            f"cost {r['full_eval_cpu_s']:.3f} s): **{r['speedup_cpu']:.2f}x**",
        ]
        if ref is not None:
            extrap = ref["reference_s"] * r["n_evals"]
            csv.append(f"reuse,{scheme},reference_extrapolated_s,{extrap}")
            md.append(
                f"- reference approach, extrapolated ({r['n_evals']} evaluations x {ref['reference_s']:.3f} CPU s): "
                f"{extrap:.0f} s vs mmsoup's {r['reuse_cpu_s']:.0f} CPU s: **{extrap / r['reuse_cpu_s']:.1f}x**"
            )
        md.append("")
    tag = "" if args.only == "reference,reuse" else "_" + args.only.replace(",", "_")
    write_text(args.out / f"bench_scale{tag}.csv", "\n".join(csv) + "\n")
    write_text(args.out / f"bench_scale{tag}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
