"""A/B of prefix-activation reuse over whole MMS runs (a script, not a test).

The same MMS run (embedded pool, C26+live, NGOpt, budget 60, batch 256, 1 thread) alternated
without and with reuse, twice, printing evaluations, CPU and wall seconds and the reuse counters.
Quoted in benchmarks/results/bench_scale.md ("Repeatability").

    .venv/bin/python benchmarks/bench_reuse_ab.py [RUN/sweep]   # default: runs/embedded/sweep (make reproduce)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from mmsoup.checkpoints import load_state_dict
from mmsoup.data import digits
from mmsoup.evaluate import Evaluator, keep_freed_memory
from mmsoup.models import create_classifier
from mmsoup.partition import partition
from mmsoup.soups import manifold_mixing_soup


def main() -> None:
    """Alternate plain / reuse whole MMS runs twice and print what each cost."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_scale import pool_states

    torch.set_num_threads(1)
    keep_freed_memory()  # on CPU, as the pipeline's stages
    images, labels = digits.load("heldout")
    x, y = digits.to_tensor(images), torch.as_tensor(labels)
    pool, _ = pool_states(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/embedded/sweep"))
    model = create_classifier(seed=0)
    comps = partition(load_state_dict(pool[0]), "C26+live", model=model)
    for rep in range(2):
        for reuse in (False, True):
            ev = Evaluator(model, x, y, device="cpu", batch_size=256, reuse=reuse)
            c, w = time.process_time(), time.perf_counter()
            res = manifold_mixing_soup(pool, ev, comps, budget=60, progress=False)
            cpu, wall = time.process_time() - c, time.perf_counter() - w
            tag = "reuse" if reuse else "plain"
            print(
                rep, tag, res.n_evals, f"cpu {cpu:.1f} wall {wall:.1f}", ev.reuse_stats, flush=True
            )


if __name__ == "__main__":
    main()
