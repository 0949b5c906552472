"""Benchmark of speed at scale (a script, not a test) on the embedded default.

1. `reference`: one MMS objective evaluation the way both papers' public code does it (rebuild the
   state dict, `load_state_dict`, iterate a torch DataLoader that decodes the held-out set from PNG
   files) against mmsoup's Evaluator (mix in place, cached tensors), interleaved, median.
2. `reuse`: one whole MMS run (MMS Alg. 1, NGOpt, budget 60 as in the embedded profile) measured
   three ways on the same pool and batch size: the reference approach (a val_acc callable that
   loads each rebuilt state dict and decodes the PNGs), mmsoup's Evaluator without and with
   prefix-activation reuse (the two traces must be identical).

    .venv/bin/python benchmarks/bench_scale.py [--pool RUN/sweep] [--budget 60] [--threads 1]

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
from mmsoup.evaluate import Evaluator, keep_freed_memory
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


class ReferenceValAcc:
    """The reference approach as a val_acc callable for `manifold_mixing_soup`: it receives the
    rebuilt state dict Ψ'(λ) (soups.interpolate), loads it with `load_state_dict` and iterates a
    DataLoader that decodes the held-out PNG files, every evaluation (both papers' public code)."""

    def __init__(self, data: Dataset, loader_batch: int) -> None:
        self.model, self.data, self.batch = create_classifier(seed=1).eval(), data, loader_batch

    def __call__(self, state) -> float:
        self.model.load_state_dict(state)
        hits = 0
        with torch.no_grad():
            for x, y in DataLoader(self.data, batch_size=self.batch, num_workers=0):
                hits += int((self.model(x).argmax(-1) == y).sum())
        return hits / len(self.data)


def bench_reference(pool, images, labels, repeats: int, loader_batch: int, batch: int) -> dict:
    """Median seconds of one evaluation: reference path vs Evaluator (interleaved)."""
    base = pool[0] if isinstance(pool[0], dict) else load_state_dict(pool[0])
    other = pool[1] if isinstance(pool[1], dict) else load_state_dict(pool[1])
    model = create_classifier(seed=0)
    comps = partition(base, "C26+live", model=model)
    ev = Evaluator(
        model, digits.to_tensor(images), torch.as_tensor(labels), device="cpu", batch_size=batch
    )
    g = torch.Generator().manual_seed(0)
    lams = torch.rand(repeats + 1, len(comps), generator=g).tolist()
    with tempfile.TemporaryDirectory(prefix="mmsoup-png-") as tmp:
        write_pngs(images, labels, Path(tmp))
        ref_acc = ReferenceValAcc(PngFolder(Path(tmp)), loader_batch)

        def reference(lam: list[float]) -> float:  # rebuild, then load_state_dict, decode, forward
            state = dict(base)
            for keys, w in zip(comps.values(), lam):
                for k in keys:
                    state[k] = w * base[k] + (1 - w) * other[k]
            return ref_acc(state)

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


def bench_whole_run(
    pool, images, labels, scheme: str, budget: int, batch: int, loader_batch: int
) -> dict:
    """One whole MMS run (MMS Alg. 1, NGOpt, `budget` per candidate), measured three ways on the
    same pool: the reference approach, mmsoup's Evaluator without and with prefix-activation reuse.

    The Evaluator runs must give identical traces (asserted); the reference run's trace is compared
    and the number of differing accuracies reported (PNG decoding vs cached tensors).
    """
    model = create_classifier(seed=0)
    first = pool[0] if isinstance(pool[0], dict) else load_state_dict(pool[0])
    comps = partition(first, scheme, model=model)
    x, y = digits.to_tensor(images), torch.as_tensor(labels)
    out = {"scheme": scheme, "components": len(comps), "budget": budget, "batch": batch}
    traces = {}
    with tempfile.TemporaryDirectory(prefix="mmsoup-png-") as tmp:
        write_pngs(images, labels, Path(tmp))
        runs = {
            "reference": ReferenceValAcc(PngFolder(Path(tmp)), loader_batch),
            "plain": Evaluator(model, x, y, device="cpu", batch_size=batch, reuse=False),
            "reuse": Evaluator(model, x, y, device="cpu", batch_size=batch, reuse=True),
        }
        for tag, val_acc in runs.items():
            clock = _Clock()
            res = manifold_mixing_soup(pool, val_acc, comps, budget=budget, progress=False)
            wall, cpu = clock.read()
            traces[tag] = [(r["candidate"], r["lambdas"], r["acc"]) for r in res.trace]
            out |= {f"{tag}_wall_s": wall, f"{tag}_cpu_s": cpu, f"{tag}_n_evals": res.n_evals}
            out |= {f"{tag}_val_acc": res.val_acc, f"{tag}_mixed": len(res.ingredients)}
            print(tag, {k: v for k, v in out.items() if k.startswith(tag)}, flush=True)
    if traces["reuse"] != traces["plain"]:
        raise SystemExit("activation reuse changed the MMS trace: a bug, please report it")
    stats = runs["reuse"].reuse_stats
    out["reused"] = stats["reused"]
    out["stage_fraction"] = stats["stage_runs"] / stats["stage_runs_full"]
    out["reference_trace_equal"] = traces["reference"] == traces["plain"]
    out["speedup_reuse_vs_plain_cpu"] = out["plain_cpu_s"] / out["reuse_cpu_s"]
    out["speedup_vs_reference_cpu"] = out["reference_cpu_s"] / out["reuse_cpu_s"]
    out["speedup_vs_reference_wall"] = out["reference_wall_s"] / out["reuse_wall_s"]
    print("whole run", out, flush=True)
    return out


def main() -> None:
    """Run the benchmarks, print them, write CSV + Markdown under benchmarks/results/."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pool", type=Path, default=Path("runs/embedded/sweep"), help="make reproduce's pool"
    )
    ap.add_argument("--budget", type=int, default=60, help="per candidate (embedded profile: 60)")
    ap.add_argument("--schemes", default="C26+live", help="partitions of the whole-run benchmark")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--loader-batch", type=int, default=256, help="the reference DataLoader's batch"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--batch-size", type=int, default=256, help="Evaluator batch (pipeline, CPU: 256)"
    )
    ap.add_argument("--only", default="reference,reuse")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    keep_freed_memory()  # on CPU, as the pipeline's stages
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
        r = bench_whole_run(
            pool, images, labels, scheme, args.budget, args.batch_size, args.loader_batch
        )
        csv += [f"whole_run,{scheme},{k},{v}" for k, v in r.items() if k != "scheme"]
        rows = [("reference approach", "reference"), ("mmsoup, no reuse", "plain")]
        rows.append(("mmsoup (prefix-activation reuse)", "reuse"))
        md += [
            f"## One whole MMS run, {scheme} ({r['components']} components), NGOpt, budget {r['budget']}",
            "",
            f"All three measured on the same pool, batch {r['batch']} everywhere. The two mmsoup runs "
            f"have identical traces; the reference run's trace is "
            f"{'identical' if r['reference_trace_equal'] else 'not identical (PNG decoding vs cached tensors)'}.",
            "",
            "| path | evaluations | models mixed | held-out acc | CPU s | wall s | speed-up (CPU) |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, tag in rows:
            md.append(
                f"| {label} | {r[tag + '_n_evals']} | {r[tag + '_mixed']} | {r[tag + '_val_acc']:.4f} | "
                f"{r[tag + '_cpu_s']:.0f} | {r[tag + '_wall_s']:.0f} | "
                f"{r['reference_cpu_s'] / r[tag + '_cpu_s']:.2f}x |"
            )
        md += [
            "",
            f"Reuse restarted {r['reused']} evaluations past the stem; stage runs "
            f"{r['stage_fraction']:.3f} of full forwards; reuse vs no reuse "
            f"**{r['speedup_reuse_vs_plain_cpu']:.2f}x** CPU.",
            "",
        ]
    tag = "" if args.only == "reference,reuse" else "_" + args.only.replace(",", "_")
    write_text(args.out / f"bench_scale{tag}.csv", "\n".join(csv) + "\n")
    write_text(args.out / f"bench_scale{tag}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
