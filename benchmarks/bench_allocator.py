"""glibc allocator settings and the MMS evaluation (a script, not a test).

Runs the same measurement in two fresh processes, with glibc's default malloc behaviour
(MMSOUP_MALLOC_DEFAULTS=1) and with mmsoup's `keep_freed_memory` (what the stages set on CPU):
median CPU ms of one MMS evaluation of the tiny ViT on the embedded held-out set (all components
move), without prefix-activation reuse, with it, and with it but no activations kept.

    .venv/bin/python benchmarks/bench_allocator.py [--batch-size 1024] [--threads 2] [--repeats 30]

Writes benchmarks/results/bench_allocator.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mmsoup.io import write_text

RESULTS = Path(__file__).parent / "results"


def child(batch: int, threads: int, repeats: int) -> dict[str, float]:
    """Median and min CPU ms per evaluation of each path, in this process."""
    import torch

    from mmsoup.data import digits
    from mmsoup.evaluate import Evaluator, keep_freed_memory
    from mmsoup.models import create_classifier
    from mmsoup.partition import partition

    keep_freed_memory()  # a no-op under MMSOUP_MALLOC_DEFAULTS=1
    torch.set_num_threads(threads)
    images, labels = digits.load("heldout")
    x, y = digits.to_tensor(images), torch.as_tensor(labels)
    base, other = create_classifier(seed=0).state_dict(), create_classifier(seed=1).state_dict()
    model = create_classifier(seed=2)
    comps = partition(base, "C26+live", model=model)
    evs = {
        "no reuse": Evaluator(model, x, y, device="cpu", batch_size=batch, reuse=False),
        "reuse": Evaluator(model, x, y, device="cpu", batch_size=batch, reuse=True),
        "reuse, nothing kept": Evaluator(model, x, y, device="cpu", batch_size=batch, reuse=True),
    }
    lams = torch.rand(repeats + 1, len(comps), generator=torch.Generator().manual_seed(0)).tolist()
    for ev in evs.values():
        ev.mixed_accuracy(base, other, comps, lams[0])
    prefix = evs["reuse, nothing kept"]._prefix
    prefix.slots = {prefix.n_stages}  # keep hit counts only: every evaluation a full forward
    times: dict[str, list[float]] = {k: [] for k in evs}
    for lam in lams[1:]:  # interleaved
        for k, ev in evs.items():
            t = time.process_time()
            ev.mixed_accuracy(base, other, comps, lam)
            times[k].append(1000 * (time.process_time() - t))
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def main() -> None:
    """Measure both allocator settings in fresh processes; print and write the Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.batch_size, args.threads, args.repeats)))
        return
    rows = {}
    for label, env in (("glibc defaults", {"MMSOUP_MALLOC_DEFAULTS": "1"}), ("mmsoup", {})):
        cmd = [sys.executable, __file__, "--child", "--batch-size", str(args.batch_size)]
        cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
        env = {k: v for k, v in os.environ.items() if k != "MMSOUP_MALLOC_DEFAULTS"} | env
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows[label] = json.loads(out.strip().splitlines()[-1])
        print(label, rows[label], flush=True)
    lines = [
        "# bench_allocator",
        "",
        f"Tiny ViT, embedded held-out set (1,000 images), C26+live, all components move; batch "
        f"{args.batch_size}, {args.threads} threads, {args.repeats} interleaved repeats, CPU ms per "
        "evaluation (median / min), each setting in a fresh process.",
        "",
        "| allocator | no reuse | reuse | reuse, nothing kept |",
        "|---|---|---|---|",
    ]
    for label, r in rows.items():
        cells = " | ".join(f"{r[k][0]:.0f} / {r[k][1]:.0f}" for k in r)
        lines.append(f"| {label} | {cells} |")
    write_text(args.out / "bench_allocator.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
