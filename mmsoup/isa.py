"""One instruction-set level for the numbers: the same bytes on any x86-64 CPU with AVX2.

Seeds and thread counts fix the order of a computation (`mmsoup.determinism`); the instruction set
the libraries pick at run time fixes its rounding. PyTorch, MKL, oneDNN and OpenBLAS each look at
the CPU when they start and choose kernels for it (AVX-512 on one machine, AVX2 on the next), and
those kernels add and fuse floats differently: on one AVX2 machine 20 training steps of the tiny
ViT gave four different hashes for four settings of two of these switches. So `import mmsoup` pins
them, for this process and every process it starts (the CLI, papermill kernels, sweep children and
replicate workers inherit `os.environ`):

- `ATEN_CPU_CAPABILITY=avx2`: PyTorch's own vectorised kernels (GELU, LayerNorm, softmax,
  reductions, AdamW) use their AVX2 build, not AVX-512 where the CPU has it (PyTorch's
  "CPU capability" dispatch, read at the first kernel call);
- `MKL_CBWR=COMPATIBLE,STRICT`: MKL's conditional numerical reproducibility, the one branch its
  documentation promises to give the same results on Intel and non-Intel CPUs (the AVX2 branch
  falls back to AUTO on non-Intel CPUs, the oneMKL developer guide, "Getting Started with
  Conditional Numerical Reproducibility"); STRICT makes it independent of array alignment. This
  is what the matrix products of the ViT (torch's BLAS is MKL) cost: about 2.4x per training step
  (benchmarks/bench_isa.py);
- oneDNN is switched off for the stages (`torch.backends.mkldnn.enabled = False` inside
  `determinism.pinned`): its kernels are blocked by the CPU's cache sizes, and the only layer that
  used it here, the ViT's patch-embedding convolution, then runs through ATen and MKL (no slower
  here); `ONEDNN_MAX_CPU_ISA=AVX2` covers anything that still reaches it;
- `OPENBLAS_CORETYPE=Haswell`: OpenBLAS under NumPy/SciPy/scikit-learn (the linear probe, the
  analyses) uses its AVX2 kernels on every CPU (read when NumPy loads OpenBLAS, so `import mmsoup`
  must come before `import numpy` in a process that wants it; `check()` says when it did not).

`MMSOUP_ISA=native` leaves every library to its own choice (faster; bytes then follow the CPU,
and the sidecars record its instruction-set level). A CPU without AVX2 cannot run the pinned
study: torch falls back to its default kernels, which `check()` reports.
"""

from __future__ import annotations

import functools
import os
from typing import Any

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
MODE_ENV = "MMSOUP_ISA"  # "native" opts out; anything else (or unset) pins


def pinned_mode() -> bool:
    """True unless MMSOUP_ISA=native: the study runs at one instruction-set level (AVX2)."""
    return os.environ.get(MODE_ENV, "avx2").strip().lower() != "native"


def apply(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Write the pins into `environ` (default os.environ), overriding outside settings; return it.

    Outside settings are overridden on purpose: a shell that exports ATEN_CPU_CAPABILITY=default
    must not change the study's bytes. Nothing is written in native mode.
    """
    env = os.environ if environ is None else environ
    if pinned_mode() if environ is None else env.get(MODE_ENV, "avx2").lower() != "native":
        env.update(PINS)
    return env


@functools.cache
def cpu_flags_level() -> str:
    """The widest vector instruction set this CPU offers: "avx512", "avx2", "avx" or "sse"."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        flags = []
    for level, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")):
        if flag in flags:
            return level
    return "sse" if flags else "unknown"


def _openblas_coretypes() -> list[str]:
    """The kernels each loaded OpenBLAS uses (threadpoolctl's `architecture`), e.g. ["Haswell"]."""
    from threadpoolctl import threadpool_info

    return sorted(
        {
            str(p.get("architecture"))
            for p in threadpool_info()
            if p.get("internal_api") == "openblas"
        }
    )


def numerics() -> dict[str, Any]:
    """What decides the bits besides code, seeds, thread counts and versions (every sidecar).

    Pinned, it holds no machine-specific value, so two AVX2 machines write the same record; in
    native mode it names the CPU's instruction-set level, which then decides the bits.
    """
    import torch

    record: dict[str, Any] = {
        "isa": "avx2" if pinned_mode() else "native",
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "unset"),
        "onednn": "off" if pinned_mode() else os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
        "openblas": _openblas_coretypes(),
    }
    if not pinned_mode():
        record["cpu_flags_level"] = cpu_flags_level()
    return record


def check() -> str | None:
    """One sentence when the pins are not in force in this process, else None."""
    if not pinned_mode():
        return None
    record = numerics()
    if record["torch_capability"] != "AVX2":
        return (
            f"PyTorch runs its {record['torch_capability']} kernels, not AVX2 (this CPU offers "
            f"{cpu_flags_level()}); this run's bytes will not match the committed ones."
        )
    if any(core != "Haswell" for core in record["openblas"]):
        return (
            "NumPy's OpenBLAS was loaded before mmsoup pinned it (kernels "
            f"{', '.join(record['openblas'])}); import mmsoup before numpy, or start Python with "
            "OPENBLAS_CORETYPE=Haswell, to get the committed bytes."
        )
    return None
