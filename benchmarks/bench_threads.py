"""One vs two torch threads for each stage of the embedded study (the profile's thread choice).

Measures, interleaved and repeated, the median time of: a pretraining step (batch 128, 62
classes), a fine-tuning step (batch 64, 10 classes) and one held-out evaluation (1,000 images),
with 1 and with 2 threads; and whether the bits agree (they do not: the thread count is part of
the result, which is why `mmsoup.determinism` pins it per stage). Prints one table, writes
benchmarks/results/threads.md. Run on a quiet machine: `python benchmarks/bench_threads.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmsoup.determinism import cpu_model, pinned
from mmsoup.models import create_classifier


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:10]


def train_step(threads: int, batch: int, classes: int, steps: int) -> tuple[float, str]:
    """Median seconds per AdamW step, and a digest of the weights after `steps` steps."""
    with pinned(threads):
        model = create_classifier("mmsoup-tiny-vit", classes, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        x, y = (
            torch.rand(batch, 3, 28, 28, generator=gen),
            torch.randint(classes, (batch,), generator=gen),
        )
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return statistics.median(times[2:]), _digest(flat)


@torch.no_grad()
def evaluation(threads: int, images: int, repeats: int) -> tuple[float, str]:
    """Median seconds of one forward over `images` images in batches of 256, and a logits digest."""
    with pinned(threads):
        model = create_classifier("mmsoup-tiny-vit", 10, seed=0).eval()
        x = torch.rand(images, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            z = torch.cat([model(b) for b in x.split(256)])
            times.append(time.perf_counter() - t)
    return statistics.median(times), _digest(z)


def main() -> None:
    """Interleave 1- and 2-thread measurements; print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    cases = {
        "pretraining step (batch 128)": lambda t: train_step(t, 128, 62, args.steps),
        "fine-tuning step (batch 64)": lambda t: train_step(t, 64, 10, args.steps),
        "held-out evaluation (1,000 images)": lambda t: evaluation(t, 1000, 5),
    }
    lines = [
        f"# One vs two torch threads ({cpu_model()}, {torch.__version__})",
        "",
        "| stage | 1 thread (s) | 2 threads (s) | speed-up | same bits? |",
        "|---|---:|---:|---:|---|",
    ]
    for name, fn in cases.items():
        runs: dict[int, list[float]] = {1: [], 2: []}
        digests: dict[int, set[str]] = {1: set(), 2: set()}
        for _ in range(args.rounds):
            for t in (1, 2):
                s, d = fn(t)
                runs[t].append(s)
                digests[t].add(d)
        one, two = statistics.median(runs[1]), statistics.median(runs[2])
        repeat = "repeatable" if all(len(v) == 1 for v in digests.values()) else "NOT repeatable"
        same = "yes" if digests[1] == digests[2] else f"no ({repeat} at each count)"
        lines.append(f"| {name} | {one:.4f} | {two:.4f} | {one / two:.2f}x | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "threads.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
