"""Shared fixtures: one headless smoke run of the whole study, reused by every end-to-end test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mmsoup  # noqa: F401  first: its instruction-set pins must be in os.environ before numpy loads


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """Execute notebooks 01 -> 05 with papermill under the smoke profile; return the run folder.

    Set MMSOUP_SMOKE_RUN to an existing run folder to reuse it while developing.
    """
    from mmsoup.reproduce import reproduce

    given = os.environ.get("MMSOUP_SMOKE_RUN")
    if given:
        return Path(given)
    run_dir = tmp_path_factory.mktemp("smoke_run")
    reproduce("smoke", out=run_dir / "figures", run_dir=run_dir, stream=False)
    return run_dir


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module, as in worker processes: the same floating-point sums."""
    from mmsoup.determinism import pinned

    with pinned(1):
        yield
