"""Crash safety: a killed MMS run resumes at its candidate and reaches the same soup bit for bit;
every output of the package goes through an atomic writer.

The SIGKILL test runs this file as a script (`python tests/test_crash.py worker ...`): the worker
builds an MMS soup of small MLPs fine-tuned on sklearn digits, with a state file.
"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy_mlp import COMPS
from toy_mlp import mlp as _mlp
from toy_mlp import train as _train

from mmsoup import resume
from mmsoup.checkpoints import load_state_dict, read_sidecar, save_state_dict
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator
from mmsoup.soups import manifold_mixing_soup

# ties accepted and τ = 0.95: on 300 held-out digits the run then accepts, rejects and skips
KW = dict(budget=30, seed=1, tau=0.95, accept_ties=True, progress=False)
RUNS = [(0.05, 30, 1), (0.1, 25, 2), (0.03, 45, 3), (0.08, 30, 4), (0.05, 20, 5)]  # lr, steps, seed


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """Five fine-tunes of one init and a diverged run as .safetensors files; the held-out split."""
    from sklearn.datasets import load_digits  # not in the worker, which only reads the files

    out = tmp_path_factory.mktemp("pool")
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    init = _train(_mlp(), x[:1200], y[:1200], seed=100, lr=0.05, steps=30)
    for i, (lr, steps, seed) in enumerate(RUNS):
        model = _mlp()
        model.load_state_dict(init)
        save_state_dict(
            _train(model, x[:1200], y[:1200], seed, lr, steps), out / f"model_{i}.safetensors"
        )
    g = torch.Generator().manual_seed(7)  # a diverged run: fails the τ test, skipped
    noisy = {
        k: v + 2.0 * torch.randn(v.shape, generator=g)
        for k, v in load_state_dict(out / "model_0.safetensors").items()
    }
    save_state_dict(noisy, out / f"model_{len(RUNS)}.safetensors")
    save_file(
        {"x": x[1200:1500].contiguous(), "y": y[1200:1500].contiguous()},
        out / "heldout.safetensors",
    )
    return out


def _pool(pool_dir: Path) -> list[Path]:
    return sorted(pool_dir.glob("model_*.safetensors"))


def _evaluator(pool_dir: Path, cls: type[Evaluator] = Evaluator) -> Evaluator:
    data = load_file(pool_dir / "heldout.safetensors")
    return cls(_mlp(), data["x"], data["y"], device="cpu")


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _done(state_file: Path) -> int:
    return json.loads(state_file.read_text())["done"] if state_file.is_file() else -1


class _Crash(Exception):
    """The stand-in for a power cut inside an evaluation."""


class _CrashAt(Evaluator):
    """An evaluator that raises at its `at`-th mixed evaluation (None: never)."""

    at: int | None = None
    calls = 0

    def mixed_accuracy(self, *args, **kwargs) -> float:
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise _Crash
        return super().mixed_accuracy(*args, **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")  # as in the workers (conftest)


@pytest.fixture(scope="module")
def reference(pool_dir, one_thread):
    """The uninterrupted run."""
    return manifold_mixing_soup(_pool(pool_dir), _evaluator(pool_dir), COMPS, **KW)


def _n_mixed(result) -> int:
    return sum(r["stage"] != "ingredient" for r in result.trace)


def _same_run(res, reference) -> None:
    assert _equal(res.state_dict, reference.state_dict)  # bit for bit
    assert res.trace == reference.trace and res.weights == reference.weights
    assert res.ingredients == reference.ingredients and res.val_acc == reference.val_acc
    assert res.info["decisions"] == reference.info["decisions"]
    assert res.info["optimizers"] == reference.info["optimizers"]


def test_the_reference_run_mixes_and_has_candidates_left_after_the_first(reference):
    # the kill tests are only meaningful if something is mixed and work remains after candidate 1
    decisions = [d["decision"] for d in reference.info["decisions"]]
    assert decisions == ["accepted", "rejected", "accepted", "rejected", "skipped"]


@pytest.mark.parametrize("where", [0.0, 0.4, 0.7, 1.0])
def test_a_run_crashing_anywhere_resumes_to_the_same_soup(pool_dir, reference, tmp_path, where):
    paths, state = _pool(pool_dir), tmp_path / "mms.state.json"
    ev = _evaluator(pool_dir, _CrashAt)
    ev.at = max(1, round(where * _n_mixed(reference)))  # first, middle or last evaluation
    with pytest.raises(_Crash):
        manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)
    assert not list(tmp_path.glob(".*.tmp"))  # a crash leaves no temporary files
    saved = json.loads(state.read_text())
    at_crash, crashed_at = saved["done"], ev.at
    kept = sum(r["stage"] != "ingredient" for r in saved["trace"])  # evaluations already saved
    assert 0 <= at_crash < len(RUNS) and kept < crashed_at  # the crashed evaluation is not saved
    ev.at, ev.calls = None, 0
    res = manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)
    assert res.info["resumed_at"] == [at_crash]
    _same_run(res, reference)
    assert ev.calls == _n_mixed(reference) - kept  # only the killed candidate is paid twice


def test_repeated_crashes_resume_from_each_other(pool_dir, reference, tmp_path):
    paths, state = _pool(pool_dir), tmp_path / "mms.state.json"
    ev = _evaluator(pool_dir, _CrashAt)
    per_candidate = Counter(r["candidate"] for r in reference.trace if r["stage"] != "ingredient")
    seen = []
    for _ in range(3):  # a crash after a bit more than one candidate's evaluations: progress
        ev.at, ev.calls = max(per_candidate.values()) + 3, 0
        with pytest.raises(_Crash):
            manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)
        seen.append(_done(state))
    ev.at, ev.calls = None, 0
    res = manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)
    assert seen == [1, 2, 3]  # progress survives every crash
    assert res.info["resumed_at"] == seen
    _same_run(res, reference)
    # a finished state returns the soup again without a single evaluation
    ev.calls = 0
    again = manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)
    assert ev.calls == 0 and _equal(again.state_dict, reference.state_dict)
    assert json.loads(state.read_text())["finished"] is True
    psi_files = sorted(p.name for p in tmp_path.glob("mms.state.psi-*"))
    n = len(res.ingredients)
    assert psi_files == [f"mms.state.psi-{n}.json", f"mms.state.psi-{n}.safetensors"]
    resume.remove(state)
    assert list(tmp_path.iterdir()) == []


def test_other_inputs_refuse_the_state_file(pool_dir, tmp_path):
    paths, ev, state = _pool(pool_dir)[:3], _evaluator(pool_dir), tmp_path / "s.json"
    manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)
    before = state.read_bytes()
    changes = {
        "params tau was 0.95, now 0.99": dict(tau=0.99),
        "params seed was 1, now 2": dict(seed=2),
        "params optimizer was 'NGOpt', now 'Cobyla'": dict(optimizer="Cobyla"),
        "params budget was 30, now 31": dict(budget=31),
    }
    for message, change in changes.items():
        with pytest.raises(MMSoupError, match=re.escape(message)) as info:
            manifold_mixing_soup(paths, ev, COMPS, state_file=state, **(KW | change))
        text = str(info.value)
        assert str(state) in text and "delete it to start over, or pass the same inputs" in text
        assert "\n" not in text
    with pytest.raises(MMSoupError, match="ingredient 2 was model_2.safetensors, now model_3"):
        manifold_mixing_soup(paths[:2] + [_pool(pool_dir)[3]], ev, COMPS, state_file=state, **KW)
    with pytest.raises(MMSoupError, match="components"):
        manifold_mixing_soup(paths, ev, {"fc1.w": ["0.weight"]}, state_file=state, **KW)
    in_memory = [load_state_dict(p) for p in paths]  # same numbers, but dicts: other names
    with pytest.raises(MMSoupError, match="ingredient 0 was model_0.safetensors, now ingredient"):
        manifold_mixing_soup(in_memory, ev, COMPS, state_file=state, **KW)
    assert state.read_bytes() == before  # a refused resume writes nothing


def test_in_memory_ingredients_are_told_apart_by_content(pool_dir, tmp_path):
    pool = [load_state_dict(p) for p in _pool(pool_dir)[:3]]
    ev, state = _evaluator(pool_dir), tmp_path / "s.json"
    manifold_mixing_soup(pool, ev, COMPS, state_file=state, **KW)
    other = pool[:2] + [{k: v + 1e-3 for k, v in pool[2].items()}]  # same name, same size
    with pytest.raises(
        MMSoupError,
        match=re.escape("(ingredient 2 (ingredient[2]) has other contents); delete it"),
    ):
        manifold_mixing_soup(other, ev, COMPS, state_file=state, **KW)


@pytest.mark.parametrize("damage", ["garbage", "missing psi"])
def test_a_damaged_state_is_one_clear_error(pool_dir, tmp_path, damage):
    paths, ev, state = _pool(pool_dir)[:2], _evaluator(pool_dir), tmp_path / "s.json"
    manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)
    if damage == "garbage":
        state.write_text("{not json")
        match = "unreadable .* delete it to start the run over"
    else:
        next(tmp_path.glob("s.psi-*.safetensors")).unlink()
        match = "is missing or altered; delete the state file"
    with pytest.raises(MMSoupError, match=match):
        manifold_mixing_soup(paths, ev, COMPS, state_file=state, **KW)


# -- the SIGKILL test: a real process, killed while it evaluates ---------------------------------
class _BlockOnceStarted(Evaluator):
    """Blocks (reading stdin) at the first evaluation after the state shows a decided candidate."""

    state_file: Path

    def mixed_accuracy(self, *args, **kwargs) -> float:
        if _done(self.state_file) >= 1:
            print("blocked", flush=True)  # the parent kills this process now
            sys.stdin.read()
        return super().mixed_accuracy(*args, **kwargs)


def _worker(pool_dir: str, state_file: str, out: str) -> None:
    """The subprocess: one MMS run with a state file, the soup saved to `out`."""
    torch.set_num_threads(1)
    _BlockOnceStarted.state_file = Path(state_file)
    ev = _evaluator(Path(pool_dir), _BlockOnceStarted)
    res = manifold_mixing_soup(_pool(Path(pool_dir)), ev, COMPS, state_file=state_file, **KW)
    res.save(out)


def _start(pool_dir: Path, state: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "worker", str(pool_dir), str(state), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_sigkilled_run_resumes_to_the_same_fused_model(pool_dir, reference, tmp_path):
    state, out = tmp_path / "mms.state.json", tmp_path / "soup.safetensors"
    proc = _start(pool_dir, state, out)
    line = saved = None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # bounded wait, no sleep
        line = proc.stdout.readline() if ready else None
        if line == "blocked\n":  # the state shows a decided candidate, the next one is running
            saved = json.loads(state.read_text())
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert line == "blocked\n", err
    assert saved["done"] >= 1 and not saved["finished"] and len(saved["mixed"]) >= 2
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # no soup, no half-written file

    # the rerun (in this process: it has torch imported already) resumes from the state file
    res = manifold_mixing_soup(_pool(pool_dir), _evaluator(pool_dir), COMPS, state_file=state, **KW)
    res.save(out)
    soup, meta = load_state_dict(out), read_sidecar(out)
    assert _equal(soup, reference.state_dict)  # bit for bit
    assert meta["trace"] == reference.trace and meta["weights"] == reference.weights
    assert meta["ingredients"] == reference.ingredients
    assert res.info["resumed_at"] == [saved["done"]]


# -- every output goes through an atomic writer ------------------------------------------------
# Writes that may touch a final path directly, and why.
_ALLOWED = {
    ("sweep.py", 'open(log, "w")'): "a run's log streams while it runs; it is no result",
    ("replicates.py", 'open(log, "w")'): "a replicate's log streams while it runs; it is no result",
    ("ablation.py", 'open(log, "w")'): "a replicate's log streams while it runs; it is no result",
    ("data/manifest.py", "open(part,"): "the .part download resumes; renamed in after its sha256",
    ("data/digits.py", "np.savez(buf"): "an in-memory buffer",
}
_WRITES = re.compile(
    r"""(\.to_csv|savefig|np\.save\w*|torch\.save|\.write_text|\.write_bytes|save_file|json\.dump)\(|"""
    r"""open\([^)]*,\s*["'](?:w|wb|a|ab|x|xb|w\+)["']"""
)


def test_every_write_in_the_package_goes_through_an_atomic_path():
    root = Path(__file__).resolve().parents[1] / "mmsoup"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "io.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            match = _WRITES.search(code)
            if not match or any(rel == f and s in code for f, s in _ALLOWED):
                continue
            first_arg = code[match.end() :].split(",")[0].strip()
            # fine: into a temporary path of atomic_path/mkdtemp, or into a file object opened so
            if re.search(r"\btmp\b", code) or first_arg in ("f", "buf"):
                continue
            offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "non-atomic writes (use mmsoup.io.atomic_path):\n" + "\n".join(offenders)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(*sys.argv[2:5])
