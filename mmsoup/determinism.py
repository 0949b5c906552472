"""Same machine, same bytes: every thread pool that touches the numbers is pinned per stage.

A float sum depends on the order of its terms, so the thread count of a matrix product is part of
its result: on this project's 2-core machine one training step of the tiny ViT gives other bits
with 1 and with 2 torch threads (and the same bits, run after run, with a fixed count); so did a
forward pass over 1,000 images in one batch (benchmarks/bench_threads.py). So the thread count of each stage is part of the study's definition (a
profile field, recorded in every sidecar), never "whatever the machine has":

- torch intra-op threads (OpenMP/MKL/oneDNN) = the stage's count, whatever `jobs` is;
- BLAS under NumPy/SciPy/scikit-learn (OpenBLAS) = 1 thread, through threadpoolctl;
- `torch.use_deterministic_algorithms` on (warn-only: a CPU op without a deterministic kernel
  warns instead of failing).

Across machines, the instruction set decides the rest: `mmsoup.isa` pins torch, MKL, oneDNN and
OpenBLAS to one level (AVX2) at `import mmsoup`, and `pinned` switches oneDNN off for the block,
so that any x86-64 CPU with AVX2 writes the same bytes (the `numerics` record of each sidecar says
which settings made them).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from collections.abc import Iterator
from typing import Any

import torch

from mmsoup import isa

# Environment of a child process (a sweep run): its OpenMP/BLAS pools start at this size.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pin_process() -> bool:
    """In pinned mode, switch oneDNN off for the rest of this process (a rank, a worker); True
    if it did.

    `pinned` calls it for a block (and restores oneDNN after); a distributed rank evaluates
    outside any block, so it calls this once, and then computes the bits a single pinned process
    computes.
    """
    if isa.pinned_mode():  # oneDNN blocks its kernels by the CPU's caches (mmsoup.isa)
        torch.backends.mkldnn.enabled = False
    return isa.pinned_mode()


@contextlib.contextmanager
def pinned(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch threads, one BLAS thread and deterministic algorithms.

    `threads` None leaves torch's thread count alone (a GPU machine: the numbers are the GPU's).
    Everything is restored on exit, so a notebook kernel keeps its own settings between stages.
    """
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    was_det, was_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    was_mkldnn = torch.backends.mkldnn.enabled
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    if pin_process():
        _warn_once(isa.check())
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
        torch.backends.mkldnn.enabled = was_mkldnn


@functools.cache
def _warn_once(message: str | None) -> None:
    """Print `message` (isa.check's sentence) once per process on stderr."""
    if message:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def child_env(threads: int) -> dict[str, str]:
    """os.environ for a child process whose thread pools start at `threads` (BLAS at 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a result was made: CPU, its instruction-set level, cores, threads, BLAS kernels.

    Kept with the timings (uncommitted), not in the sidecar: pinned, two machines make the same
    bytes, and the sidecar holds only what decides them (`isa.numerics`)."""
    from threadpoolctl import threadpool_info

    blas = sorted(
        {
            f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')}"
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        }
    )
    return {
        "cpu": cpu_model(),
        "cpu_flags_level": isa.cpu_flags_level(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "blas": blas,  # e.g. "openblas 0.3.29 Haswell": the kernels NumPy/SciPy run here
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
