"""GPU benchmark (a script, not a test): one MMS objective evaluation of CLIP ViT-B/32.

The paper's setting at full scale: 26,000 held-out images at 224x224 (ImageNet2p, Soups §3),
random weights, uint8 images resident on the GPU, normalised per batch, in fp32 (the default, as
the references; TF32 off) and in bf16 autocast (the opt-in fast mode). For each precision: seconds
per evaluation of Ψ'(λ) with every component moving (a full forward), with only the head moving
(prefix-activation reuse), the bare forward, and one candidate's Cobyla λ search (MMS Alg. 1) with
the stage computations prefix reuse saved on its trace. Then how many held-out predictions and which
search decisions bf16 changes. The MMS author's code takes ~26 s per evaluation on 2xA6000, by its
author's account. About 3 minutes on one recent GPU (`make bench-gpu`).

    .venv/bin/python benchmarks/bench_gpu.py --device cuda [--images 26000] [--batch-size 1000]
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --images 64 --batch-size 32 --budget 6

Writes benchmarks/results/bench_gpu_<device>.csv and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mmsoup.checkpoints import library_versions
from mmsoup.evaluate import Evaluator, keep_freed_memory
from mmsoup.io import write_text
from mmsoup.models import PAPER_ARCH, create_classifier
from mmsoup.partition import partition

RESULTS = Path(__file__).parent / "results"
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP's normalisation
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _row(ev, base_sd, other, comps, lams, dev, repeats) -> dict:
    """Seconds per MMS evaluation (all components move), head-only move, bare forward."""
    it = iter(lams)
    ev.mixed_accuracy(base_sd, other, comps, next(it))  # warm-up: kernels, cache fill

    def bare() -> None:
        with torch.inference_mode():
            for x, _ in ev.batches():
                ev.forward(x).argmax(-1)

    t_full = _timed(lambda: ev.mixed_accuracy(base_sd, other, comps, next(it)), dev, repeats)
    lam = list(lams[-1])

    def head_only() -> None:  # Cobyla's last coordinate moves: only the head is recomputed
        lam[-1] = 1.0 - lam[-1]
        ev.mixed_accuracy(base_sd, other, comps, lam)

    ev.mixed_accuracy(base_sd, other, comps, lam)
    t_head = _timed(head_only, dev, repeats)
    t_bare = _timed(bare, dev, repeats)
    return {
        "bare_forward_s": statistics.median(t_bare),
        "mms_eval_s": statistics.median(t_full),
        "mms_eval_head_only_s": statistics.median(t_head),
    }


def _cobyla(ev, base_sd, other, comps, budget: int) -> dict:
    """One MMS candidate's λ search by Cobyla (MMS Alg. 1) on this pair: the decision, the λ*, the
    accuracies, and the stage computations prefix reuse saved on its trace."""
    from mmsoup.soups import manifold_mixing_soup

    before = dict(ev.reuse_stats)
    t0 = time.perf_counter()
    res = manifold_mixing_soup(
        [base_sd, other], ev, comps, budget=budget, optimizer="Cobyla", tau=0.0, progress=False
    )
    seconds = time.perf_counter() - t0
    stats = {k: v - before.get(k, 0) for k, v in ev.reuse_stats.items()}
    decision = res.info["decisions"][0]
    return {
        "trace": [r["acc"] for r in res.trace],
        "decision": decision["decision"],
        "lambdas": decision.get("lambdas"),
        "seconds": seconds,
        "evaluations": len(res.trace),
        "stage_runs": stats.get("stage_runs", 0),
        "stage_runs_full": stats.get("stage_runs_full", 0),
    }


def main() -> None:
    """Time fp32 and bf16 evaluations and a Cobyla search; print one table, write it to results/."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=26_000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=int, default=30, help="Cobyla evaluations of the λ search")
    ap.add_argument("--cache-mb", type=float, default=4096.0, help="prefix-activation cache budget")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        keep_freed_memory()  # as the pipeline's stages
    g = torch.Generator().manual_seed(0)
    images = torch.empty((args.images, 3, args.size, args.size), dtype=torch.uint8, device=dev)
    for i in range(0, args.images, 1000):  # filled in chunks: no 26k x 150k float array on the host
        chunk = torch.randint(
            0, 256, (min(1000, args.images - i), 3, args.size, args.size), generator=g
        )
        images[i : i + chunk.shape[0]] = chunk.to(dev, torch.uint8)
    mean, std = MEAN.to(dev), STD.to(dev)

    def preprocess(x: torch.Tensor) -> torch.Tensor:  # uint8 -> CLIP-normalised float, per batch
        return (x.float().div_(255.0) - mean) / std

    base = create_classifier(PAPER_ARCH, 1000, seed=0)
    other = {
        k: v.to(dev) for k, v in create_classifier(PAPER_ARCH, 1000, seed=1).state_dict().items()
    }
    comps = partition(base.state_dict(), "C26+live", model=base)
    # a copy: on CPU `.to(dev)` would alias the live weights that every evaluation overwrites
    base_sd = {k: v.to(dev, copy=True) for k, v in base.state_dict().items()}
    # labels: the fp32 predictions of the pair's midpoint, a quarter replaced at random, so that
    # accuracies move with λ as on real data (random weights alone give chance-level accuracies)
    probe = Evaluator(
        base,
        images,
        torch.zeros(args.images, dtype=torch.long),
        device=dev,
        batch_size=args.batch_size,
        preprocess=preprocess,
        reuse=False,
    )
    probe.mix(base_sd, other, comps, [0.5] * len(comps))
    labels = probe.logits().argmax(-1)
    noise = torch.rand(args.images, generator=g) < 0.25
    labels[noise] = torch.randint(0, 1000, (int(noise.sum()),), generator=g)
    del probe
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    rows, preds, searches = {}, {}, {}
    for precision, amp in (("fp32", False), ("bf16", True)):
        ev = Evaluator(
            base,
            images,
            labels,
            device=dev,
            batch_size=args.batch_size,
            preprocess=preprocess,
            cache_mb=args.cache_mb,
            amp=amp,
        )
        lams = torch.rand(
            2 * args.repeats + 2, len(comps), generator=torch.Generator().manual_seed(1)
        ).tolist()
        rows[precision] = _row(ev, base_sd, other, comps, lams, dev, args.repeats)
        ev.mix(base_sd, other, comps, [0.5] * len(comps))
        preds[precision] = ev.logits().argmax(-1)
        searches[precision] = _cobyla(ev, base_sd, other, comps, args.budget)
        print(precision, rows[precision], flush=True)
        del ev
    changed = int((preds["fp32"] != preds["bf16"]).sum())
    s32, s16 = searches["fp32"], searches["bf16"]
    same_trace = sum(a == b for a, b in zip(s32["trace"], s16["trace"]))
    lam_gap = (
        max(abs(a - b) for a, b in zip(s32["lambdas"], s16["lambdas"]))
        if s32["lambdas"] and s16["lambdas"]
        else float("nan")
    )
    v = library_versions()
    lines = [
        f"# bench_gpu ({dev.type})",
        "",
        f"{name}; torch {v['torch']}, open_clip {v['open_clip']}; {PAPER_ARCH}, random weights, "
        f"{args.images} images at {args.size} px, batch {args.batch_size}; "
        f"C26+live ({len(comps)} components); prefix cache {args.cache_mb:.0f} MB.",
        "",
        "| precision | MMS evaluation (s) | per 26k images (s) | vs author's ~26 s | bare forward (s) "
        "| head-only move (s) | Cobyla search: evaluations, s | stage runs saved by reuse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    csv = ["precision,metric,value"]
    for precision, row in rows.items():
        per26k = row["mms_eval_s"] * 26_000 / args.images
        search = searches[precision]
        saved = 1 - search["stage_runs"] / max(search["stage_runs_full"], 1)
        lines.append(
            f"| {precision} | {row['mms_eval_s']:.2f} | {per26k:.1f} | {26.0 / per26k:.2f}x "
            f"| {row['bare_forward_s']:.2f} | {row['mms_eval_head_only_s']:.3f} "
            f"| {search['evaluations']}, {search['seconds']:.1f} | {saved:.0%} |"
        )
        for k, val in {
            **row,
            "per_26k_s": per26k,
            "reuse_saved": saved,
            "search_s": search["seconds"],
            "decision": search["decision"],
        }.items():
            csv.append(f"{precision},{k},{val}")
    lines += [
        "",
        f"- fp32 vs bf16: {changed} of {args.images} held-out predictions differ at the midpoint; "
        f"the Cobyla searches agree on {same_trace} of {min(len(s32['trace']), len(s16['trace']))} "
        f"accuracies, decide {s32['decision']} / {s16['decision']}, max |Δλ*| {lam_gap:.3g}.",
        "- fp32 runs with TF32 off (cuDNN convolutions and matmuls in IEEE fp32), as the references.",
    ]
    csv += [f"both,predictions_changed,{changed}", f"both,trace_equal,{same_trace}"]
    write_text(args.out / f"bench_gpu_{dev.type}.csv", "\n".join(csv) + "\n")
    write_text(args.out / f"bench_gpu_{dev.type}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
