"""`mmsoup reproduce` and Ctrl-C: the running notebook's kernel is stopped, one line, exit 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
psutil = pytest.importorskip("psutil")
pytest.importorskip("papermill")


def _kernels(pid: int) -> list:
    """The ipykernel processes among `pid`'s descendants."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in kids:
        try:
            if "ipykernel" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_sigint_during_a_notebook_stops_its_kernel_and_exits_1(tmp_path):
    env = {**os.environ, "MMSOUP_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "mmsoup", "reproduce", "--profile", "smoke"]
    cmd += ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "figures")]
    err = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180  # the first notebook's kernel starts: poll for it
        while not (kernels := _kernels(proc.pid)):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no notebook kernel started within 180 s"
            time.sleep(0.2)
        time.sleep(1.0)  # the kernel is executing the notebook's cells
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    text = (tmp_path / "stderr.txt").read_text()
    lines = text.splitlines()
    assert status == 1, text
    assert "[1/5] 01_finetune_sweep ..." in lines, text
    assert lines[-1].startswith(
        "mmsoup: error: interrupted in notebook 01_finetune_sweep, its kernel stopped"
    ), text
    assert "run the same command again to resume" in lines[-1]
    assert "Traceback" not in text, text
    deadline = time.monotonic() + 10  # already stopped before the exit; bounded anyway
    while any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kernels):
        assert time.monotonic() < deadline, f"kernel still alive: {[k.pid for k in kernels]}"
        time.sleep(0.1)
