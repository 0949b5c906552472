"""What each instruction-set pin costs, and what it changes (mmsoup.isa).

For each setting, in a fresh process (the libraries read these settings once, when they start):
the median time of a fine-tuning step of the embedded tiny ViT (batch 64, one thread), of a
held-out evaluation (1,000 images, one thread), and a digest of the weights after 20 steps. The
settings: native (every library picks its kernels for this CPU), each pin alone, and the pinned
mode `import mmsoup` sets. Prints one table with each setting's time as a ratio of native, writes
benchmarks/results/isa.md. Run on a quiet machine: `python benchmarks/bench_isa.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import hashlib, json, os, statistics, time
import mmsoup
import torch
import torch.nn.functional as F
from mmsoup.models import TINY_ARCH, create_classifier
torch.set_num_threads(1)
if os.environ.get("BENCH_NO_ONEDNN"):
    torch.backends.mkldnn.enabled = False
model = create_classifier(TINY_ARCH, 10, seed=0)
gen = torch.Generator().manual_seed(0)
x, y = torch.rand(64, 3, 28, 28, generator=gen), torch.randint(10, (64,), generator=gen)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
steps = []
for _ in range(20):
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    steps.append(time.perf_counter() - t)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:10]
model.eval()
images = torch.rand(1000, 3, 28, 28, generator=gen)
evals = []
with torch.no_grad():
    for _ in range(3):
        t = time.perf_counter(); model(images); evals.append(time.perf_counter() - t)
print(json.dumps({"step": statistics.median(steps[2:]), "eval": statistics.median(evals),
                  "digest": digest, "capability": torch.backends.cpu.get_cpu_capability()}))
"""

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
SETTINGS = {
    "native (MMSOUP_ISA=native)": {"MMSOUP_ISA": "native"},
    "torch capability avx2 only": {"MMSOUP_ISA": "native", "ATEN_CPU_CAPABILITY": "avx2"},
    "MKL_CBWR=AVX2,STRICT only (Intel CPUs only)": {
        "MMSOUP_ISA": "native",
        "MKL_CBWR": "AVX2,STRICT",
    },
    "MKL_CBWR=COMPATIBLE,STRICT only": {"MMSOUP_ISA": "native", "MKL_CBWR": "COMPATIBLE,STRICT"},
    "oneDNN off only": {"MMSOUP_ISA": "native", "BENCH_NO_ONEDNN": "1"},
    "pinned (import mmsoup: avx2 kernels, MKL COMPATIBLE, oneDNN off)": {"BENCH_NO_ONEDNN": "1"},
}


def run(extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINS and k != "MMSOUP_ISA"}
    env.update(extra, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from mmsoup.determinism import cpu_model
    from mmsoup.isa import cpu_flags_level

    rows = {name: run(extra) for name, extra in SETTINGS.items()}
    base = rows["native (MMSOUP_ISA=native)"]
    lines = [
        f"# Instruction-set pins: cost and bits ({cpu_model()}, {cpu_flags_level()}, one thread)",
        "",
        "| setting | training step (ms) | × native | evaluation of 1,000 images (ms) | × native | torch kernels | weights after 20 steps |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {1000 * r['step']:.0f} | {r['step'] / base['step']:.2f} | "
            f"{1000 * r['eval']:.0f} | {r['eval'] / base['eval']:.2f} | {r['capability']} | `{r['digest']}` |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "isa.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
