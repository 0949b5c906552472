"""Peak memory of a uniform + greedy soup over 16 streamed ResNet-50-sized checkpoints, and the time
of `inspect` on them (mmsoup.own). Checkpoints: random init, nudged, written to --root.

    python benchmarks/bench_own.py [--n 16] [--root /tmp/mmsoup-bench-own] [--images 16 --size 64]

Each measurement runs in a fresh process; peak resident memory is the kernel's VmHWM of that process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_pool(root: Path, n: int, images: int, size: int) -> Path:
    import torch
    import torchvision
    import yaml

    from mmsoup.checkpoints import save_state_dict

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    init = torchvision.models.resnet50(num_classes=1000).state_dict()
    save_state_dict(init, root / "init.safetensors")
    for i in range(n):
        path = root / f"ft{i:02d}.safetensors"
        if not path.exists():
            g = torch.Generator().manual_seed(i)
            noise = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in init.items()}
            state = {k: v + noise[k] if v.is_floating_point() else v for k, v in init.items()}
            state = {k: v.abs() if k.endswith("running_var") else v for k, v in state.items()}
            save_state_dict(state, path)
    g = torch.Generator().manual_seed(0)
    data = {
        "images": torch.randn(images, 3, size, size, generator=g),
        "labels": torch.arange(images) % 1000,
    }
    torch.save(data, root / "held_out.pt")
    config = {
        "model": "torchvision:resnet50",
        "ingredients": ["ft*.safetensors"],
        "init": "init.safetensors",
        "held_out": "held_out.pt",
        "recipes": ["uniform", "greedy"],
        "batch_size": images,
        "device": "cpu",
        "out": "soup",
    }
    (root / "soup.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "soup.yaml"


def child(what: str, config: str) -> None:
    import torch

    from mmsoup.own import inspect_pool, soup_from_config

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if what == "soup":
        res = soup_from_config(config, progress=False)
        extra = {r: res[r].n_evals for r in ("uniform", "greedy")}
    else:
        table = inspect_pool(config, progress=False)
        extra = {"candidates": len(table), "collapsed": int(table["collapse"].sum())}
    wall = time.perf_counter() - t0
    print(json.dumps({"what": what, "wall_s": wall, "peak_rss_mib": _vm_hwm_mib(), **extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--root", type=Path, default=Path("/tmp/mmsoup-bench-own"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    config = make_pool(args.root, args.n, args.images, args.size)
    size_mib = (args.root / "ft00.safetensors").stat().st_size / 2**20
    rows = []
    for what in ("soup", "inspect"):
        cmd = [sys.executable, __file__, "--child", what, str(config)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"{args.n} ResNet-50 checkpoints of {size_mib:.0f} MiB each (streamed), "
        f"{args.images} held-out images at {args.size} px, CPU, 2 threads"
    )
    print("| command | wall time (s) | peak RSS (MiB) | evaluations / rows |")
    print("|---|---|---|---|")
    for r in rows:
        detail = {k: v for k, v in r.items() if k not in ("what", "wall_s", "peak_rss_mib")}
        print(f"| {r['what']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {detail} |")


if __name__ == "__main__":
    main()
