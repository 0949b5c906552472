"""Benchmark of the core library (a script, not a test): evaluator overhead and streaming memory.

1. Overhead of one MMS objective evaluation (Evaluator.mixed_accuracy: mix Ψ'(λ) in place + top-1)
   over a bare forward pass of the same model over the same cached tensors (tiny ViT, 28x28 images),
   plus the naive path (rebuild the state dict, load_state_dict, forward) for contrast.
2. Peak memory (max RSS = VmHWM, each configuration in a fresh subprocess) of a uniform, a greedy and a
   manifold mixing soup over 4, 16 and 64 checkpoints streamed from disk (flat in the count).

    .venv/bin/python benchmarks/bench_core.py [--device cpu] [--images 1000] [--repeats 7] [--mb 16]
        [--counts 4,16,64]

Writes benchmarks/results/bench_core.csv and bench_core.md (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmsoup.checkpoints import library_versions, save_state_dict
from mmsoup.evaluate import Evaluator, keep_freed_memory
from mmsoup.io import write_text
from mmsoup.models import create_classifier

RESULTS = Path(__file__).parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_overhead(device: str, n_images: int, repeats: int) -> dict[str, float]:
    """Median seconds of a bare forward, an MMS objective evaluation and the naive path."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)

    def preprocess(x: torch.Tensor) -> torch.Tensor:  # uint8 -> normalised float, on the device
        return (x.float() / 255.0 - 0.5) / 0.5

    base, other = create_classifier(seed=0).state_dict(), create_classifier(seed=1).state_dict()
    ev = Evaluator(create_classifier(seed=2), images, labels, device=device, preprocess=preprocess)
    dev = ev.device
    # ~C26-like partition of the tiny ViT: one component per block / stem tensor / head
    comps: dict[str, list[str]] = {}
    for k in base:
        parts = k.split(".")
        comps.setdefault(".".join(parts[:5] if "resblocks" in k else parts[:3]), []).append(k)
    base_d = {k: v.to(dev) for k, v in base.items()}  # staged once, as the soups do
    other_d = {k: v.to(dev) for k, v in other.items()}
    lambdas = torch.rand(repeats + 2, len(comps), generator=g).tolist()

    @torch.inference_mode()
    def bare() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ev.amp):
            for i in range(0, ev.n, ev.batch_size):
                ev.model(preprocess(ev.images[i : i + ev.batch_size]))

    naive_model = create_classifier(seed=3).to(dev).eval()

    def naive(lam: list[float]) -> None:  # what the author's code does per evaluation
        state = dict(base)
        for (_, keys), w in zip(comps.items(), lam):
            for k in keys:
                state[k] = w * base[k] + (1 - w) * other[k]
        naive_model.load_state_dict(state)
        with torch.inference_mode():
            naive_model(preprocess(ev.images)).argmax(-1).cpu()

    for lam in lambdas[:2]:  # warm-up
        bare()
        ev.mixed_accuracy(base_d, other_d, comps, lam)
    t_bare, t_mix, t_naive, t_mix_only = [], [], [], []
    for lam in lambdas[2:]:  # interleaved, so drift on a shared machine hits all three alike
        t_bare.append(_timed(bare, dev))
        t_mix.append(_timed(lambda lam=lam: ev.mixed_accuracy(base_d, other_d, comps, lam), dev))
        t_naive.append(_timed(lambda lam=lam: naive(lam), dev))
        t_mix_only.append(_timed(lambda lam=lam: ev.mix(base_d, other_d, comps, lam), dev))
    med = {"bare": statistics.median(t_bare), "mixed": statistics.median(t_mix)}
    med["naive"] = statistics.median(t_naive)
    return {
        "device": str(dev),
        "images": n_images,
        "components": len(comps),
        "repeats": repeats,
        "bare_forward_s": med["bare"],
        "mms_objective_s": med["mixed"],
        "naive_rebuild_s": med["naive"],
        "mix_only_s": statistics.median(t_mix_only),
        "overhead_ratio": med["mixed"] / med["bare"],
        "overhead_ratio_min": min(t_mix) / min(t_bare),
        "naive_ratio": med["naive"] / med["bare"],
    }


def _checkpoints(folder: Path, n: int, mb: int) -> list[Path]:
    """n synthetic checkpoints of ~mb MB each (8 float32 tensors) around one init."""
    g = torch.Generator().manual_seed(0)
    numel = mb * 2**20 // 4 // 8
    init = {f"block{j}.weight": torch.randn(numel, generator=g) for j in range(8)}
    paths = []
    for i in range(n):
        state = {k: v + 0.01 * torch.randn(numel, generator=g) for k, v in init.items()}
        paths.append(save_state_dict(state, folder / f"model_{i}.safetensors"))
    return paths


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field in MB (VmHWM: peak RSS of this process image)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def _child(recipe: str, folder: str, n: int) -> None:
    """Run one soup over the first n checkpoints in this fresh process; print its RSS as JSON."""
    from mmsoup import soups

    paths = sorted(Path(folder).glob("model_*.safetensors"), key=lambda p: int(p.stem[6:]))[:n]
    probe = torch.randn(4096, generator=torch.Generator().manual_seed(1))

    def val_acc(state) -> float:  # a cheap stand-in for held-out accuracy (memory is the point)
        return float((state["block0.weight"][:4096] * probe > 0).float().mean())

    # not ru_maxrss: Linux carries the parent's high-water mark across fork+exec
    before = _status_mb("VmHWM")
    t0 = time.perf_counter()
    if recipe == "uniform":
        soups.uniform_soup(paths)
    elif recipe == "greedy":
        soups.greedy_soup(paths, val_acc, progress=False)
    else:
        comps = {"first": [f"block{j}.weight" for j in range(4)]}
        comps["second"] = [f"block{j}.weight" for j in range(4, 8)]
        soups.manifold_mixing_soup(paths, val_acc, comps, tau=0.0, budget=3, progress=False)
    peak = _status_mb("VmHWM")
    print(json.dumps({"before_mb": before, "peak_mb": peak, "s": time.perf_counter() - t0}))


def bench_memory(mb: int, counts: tuple[int, ...] = (4, 16, 64)) -> list[dict]:
    """Max RSS of each recipe over 4/16/64 streamed checkpoints, a fresh process per configuration.

    Each configuration runs twice: with glibc's default allocator, whose dynamic mmap threshold
    lets freed tensors fragment the heap, and with a fixed threshold, which shows what the recipe
    itself holds.
    """
    folder = Path(tempfile.mkdtemp(prefix="mmsoup-bench-"))
    rows = []
    try:
        paths = _checkpoints(folder, max(counts), mb)
        size_mb = paths[0].stat().st_size / 2**20
        for recipe in ("uniform", "greedy", "mms"):
            for n in counts:
                row = {"recipe": recipe, "n_checkpoints": n, "checkpoint_mb": round(size_mb, 1)}
                for tag, env in (("", {}), ("_fixed_mmap", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
                    cmd = [sys.executable, __file__, "--child", recipe, str(folder), str(n)]
                    run = subprocess.run(
                        cmd, check=True, capture_output=True, text=True, env=os.environ | env
                    )
                    r = json.loads(run.stdout.strip().splitlines()[-1])
                    delta = r["peak_mb"] - r["before_mb"]
                    row |= {
                        f"peak_rss_mb{tag}": round(r["peak_mb"], 1),
                        f"soup_mb{tag}": round(delta, 1),
                        f"soup_in_checkpoints{tag}": round(delta / size_mb, 2),
                    }
                row["rss_before_mb"] = round(r["before_mb"], 1)
                rows.append(row)
                print(row, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    """Run both benchmarks, print them, write CSV + Markdown under benchmarks/results/."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mb", type=int, default=16, help="size of each synthetic checkpoint")
    ap.add_argument("--counts", default="4,16,64", help="numbers of streamed checkpoints")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1], int(args.child[2]))
    torch.manual_seed(0)
    if args.device == "cpu":
        keep_freed_memory()  # as the pipeline's stages
    ov = bench_overhead(args.device, args.images, args.repeats)
    print(ov, flush=True)
    mem = bench_memory(args.mb, tuple(int(c) for c in args.counts.split(",")))
    tag = "" if args.device == "cpu" else f"_{args.device}"
    csv = ["benchmark,config,metric,value"]
    csv += [f"overhead,{ov['device']},{k},{v}" for k, v in ov.items() if k != "device"]
    for r in mem:
        config = f"{r['recipe']}-{r['n_checkpoints']}"
        csv += [
            f"memory,{config},{k},{v}" for k, v in r.items() if k not in ("recipe", "n_checkpoints")
        ]
    write_text(args.out / f"bench_core{tag}.csv", "\n".join(csv) + "\n")
    lines = [
        "# bench_core",
        "",
        f"torch {torch.__version__}, nevergrad {library_versions()['nevergrad']}, device {ov['device']}, "
        f"threads {torch.get_num_threads()} of {len(os.sched_getaffinity(0))} cores",
        "",
        "## Evaluator overhead (tiny ViT, median of interleaved repeats)",
        "",
        f"- {ov['images']} held-out 28x28 images, {ov['components']} components, {ov['repeats']} repeats",
        f"- bare forward: {ov['bare_forward_s'] * 1e3:.1f} ms; MMS objective (mix in place + top-1): "
        f"{ov['mms_objective_s'] * 1e3:.1f} ms (of which the in-place mix alone: {ov['mix_only_s'] * 1e3:.2f} ms); "
        f"naive rebuild + load_state_dict: {ov['naive_rebuild_s'] * 1e3:.1f} ms",
        f"- **overhead ratio {ov['overhead_ratio']:.3f}x** (min/min {ov['overhead_ratio_min']:.3f}x; "
        f"goal <= 1.05x); naive path {ov['naive_ratio']:.3f}x",
        "",
        "## Peak memory of streamed soups (max RSS, fresh process each)",
        "",
        "Soup MB = peak RSS minus RSS before the soup call (imports done); in checkpoints = / size.",
        "",
        "| recipe | checkpoints | checkpoint MB | RSS before MB | peak RSS MB | soup MB | "
        "soup in checkpoints | same, fixed mmap threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in mem:
        lines.append(
            f"| {r['recipe']} | {r['n_checkpoints']} | {r['checkpoint_mb']} | {r['rss_before_mb']} | "
            f"{r['peak_rss_mb']} | {r['soup_mb']} | {r['soup_in_checkpoints']} | "
            f"{r['soup_in_checkpoints_fixed_mmap']} |"
        )
    write_text(args.out / f"bench_core{tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
