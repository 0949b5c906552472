"""Every bad input gets one clear error: one table, one row per mistake a user can make.

Each row sets up the bad input under `tmp_path` and returns either CLI arguments (run through
`mmsoup.cli.main`) or a library call (run through a temporary CLI command, so that every row is
checked the same way). Every row must give exit status 2 and exactly one line on stderr,
`mmsoup: error: <one sentence>`, naming the file or argument and the fix, no traceback, and must
leave the folder as it was: no new, partial or temporary file.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from mmsoup import cli
from mmsoup.checkpoints import save_state_dict
from mmsoup.errors import MMSoupError

Setup = Callable[[Path], "list[str] | Callable[[], object]"]
CASES: dict[str, tuple[Setup, tuple[str, ...]]] = {}


def case(name: str, *fragments: str) -> Callable[[Setup], Setup]:
    """Register a row: its setup and the fragments its message must contain (what, and the fix)."""

    def register(setup: Setup) -> Setup:
        CASES[name] = (setup, fragments)
        return setup

    return register


def _state(seed: int = 0, **change: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "0.weight": torch.randn(4, 3, generator=g),
        "0.bias": torch.randn(4, generator=g),
        "2.weight": torch.randn(2, 4, generator=g),
    }
    return {k: v for k, v in (state | change).items() if v is not None}


def _pool(tmp: Path, second: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Two checkpoints, a.safetensors and b.safetensors (b: `second` if given)."""
    a = save_state_dict(_state(0), tmp / "pool" / "a.safetensors")
    b = save_state_dict(second if second is not None else _state(1), tmp / "pool" / "b.safetensors")
    return [a, b]


def _uniform_soup_job(paths: list, tmp: Path) -> Callable[[], object]:
    """What a user runs: fuse the pool, save the soup to out/."""
    from mmsoup.soups import uniform_soup

    return lambda: save_state_dict(uniform_soup(paths), tmp / "out" / "soup.safetensors")


def _val_acc(state) -> float:
    return 0.5


def _mms_job(paths, tmp: Path, components=None, **kw) -> Callable[[], object]:
    from mmsoup.soups import manifold_mixing_soup

    comps = components or {"fc1": ["0.weight", "0.bias"], "fc2": ["2.weight"]}
    out = tmp / "out" / "mms.safetensors"
    return lambda: manifold_mixing_soup(paths, _val_acc, comps, progress=False, **kw).save(out)


# -- the pool: keys, shapes, dtypes, values ----------------------------------------------------
@case("mismatched key sets", "b.safetensors lacks key '2.weight'", "same architecture")
def _(tmp):
    return _uniform_soup_job(_pool(tmp, _state(1, **{"2.weight": None})), tmp)


@case("extra key", "b.safetensors has the extra key 'head.weight'", "same architecture")
def _(tmp):
    return _uniform_soup_job(_pool(tmp, _state(1, **{"head.weight": torch.ones(1)})), tmp)


@case("shape mismatch", "b.safetensors: '0.weight' has shape (5, 3)", "different architectures")
def _(tmp):
    return _uniform_soup_job(_pool(tmp, _state(1, **{"0.weight": torch.ones(5, 3)})), tmp)


@case(
    "dtype mismatch", "b.safetensors: '0.bias' has dtype torch.float16", "convert all checkpoints"
)
def _(tmp):
    half = _state(1, **{"0.bias": torch.ones(4, dtype=torch.float16)})
    return _uniform_soup_job(_pool(tmp, half), tmp)


@case("NaN weights", "b.safetensors: '0.bias' holds NaN or Inf", "leave it out of the pool")
def _(tmp):
    return _uniform_soup_job(
        _pool(tmp, _state(1, **{"0.bias": torch.full((4,), float("nan"))})), tmp
    )


@case("Inf weights", "b.safetensors: '2.weight' holds NaN or Inf", "leave it out of the pool")
def _(tmp):
    inf = torch.zeros(2, 4)
    inf[1, 2] = float("inf")
    return _uniform_soup_job(_pool(tmp, _state(1, **{"2.weight": inf})), tmp)


@case("truncated checkpoint", "b.safetensors is truncated or corrupt", "re-download or re-save")
def _(tmp):
    paths = _pool(tmp)
    paths[1].write_bytes(paths[1].read_bytes()[:100])
    return _uniform_soup_job(paths, tmp)


@case("corrupt .pt checkpoint", "b.pt is truncated or corrupt", "re-download or re-save")
def _(tmp):
    paths = _pool(tmp)
    paths[1] = tmp / "pool" / "b.pt"
    paths[1].write_bytes(b"this is a text file, not a checkpoint\n" * 20)
    return _uniform_soup_job(paths, tmp)


@case("random bytes as .pt", "b.pt is truncated or corrupt (not a PyTorch checkpoint)", "re-save")
def _(tmp):
    paths = _pool(tmp)
    paths[1] = tmp / "pool" / "b.pt"
    paths[1].write_bytes(np.random.default_rng(0).bytes(500))
    return _uniform_soup_job(paths, tmp)


@case("pickle that runs code", "evil.pt is refused", "re-save it as a plain state dict")
def _(tmp):
    marker = tmp / "pwned"  # would appear in the folder if the payload ran: the snapshot sees it

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp / "pool" / "evil.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"0.weight": torch.ones(4, 3), "x": Payload()}, evil)
    return _uniform_soup_job([evil], tmp)


@case("empty ingredient list", "ingredient list is empty", "pass at least one checkpoint")
def _(tmp):
    return _mms_job([], tmp)


@case("missing checkpoint file", "nope.safetensors does not exist", "check the path")
def _(tmp):
    return _uniform_soup_job([_pool(tmp)[0], tmp / "pool" / "nope.safetensors"], tmp)


# -- partitions, schemes, optimizers, profiles, parameters --------------------------------------
@case(
    "partition misses a key",
    "Key '2.weight' is missing from the partition",
    "add it to a component",
)
def _(tmp):
    from mmsoup.partition import validate_partition

    return lambda: validate_partition({"fc1": ["0.weight", "0.bias"]}, _state())


@case(
    "partition repeats a key", "Key '0.bias' is repeated", "each key must belong to one component"
)
def _(tmp):
    return _mms_job(_pool(tmp), tmp, {"fc1": ["0.weight", "0.bias"], "b": ["0.bias"]})


@case("partition names an unknown key", "names key '1.weight'", "check its spelling")
def _(tmp):
    return _mms_job(_pool(tmp), tmp, {"fc1": ["0.weight"], "x": ["1.weight"]})


@case("unknown partition scheme", "Unknown partition scheme 'C9'", "valid schemes: C8, C15, C26")
def _(tmp):
    from mmsoup.partition import partition

    return lambda: partition(_state(), "C9")


@case("unknown optimizer", "Unknown nevergrad optimizer 'Cobila'", "use a name from")
def _(tmp):
    return _mms_job(_pool(tmp), tmp, optimizer="Cobila")


@case("unknown MMS variant", "variant must be 'paper' or 'author'", "got 'authors'")
def _(tmp):
    return _mms_job(_pool(tmp), tmp, variant="authors")


@case("unknown profile", "Unknown profile 'tiny'", "pick one of embedded, smoke, paper")
def _(tmp):
    return ["sweep", "--profile", "tiny", "--out", str(tmp / "out")]


@case("unknown profile (pretrain)", "Unknown profile 'papr'", "pick one of")
def _(tmp):
    return ["pretrain", "--profile", "papr", "--cache", str(tmp / "out")]


@case("unknown fine-tuning hyper-parameter", "hyper-parameter 'lrate'", "valid ones are")
def _(tmp):
    return ["finetune", "--config", '{"lrate": 0.1}', "--out", str(tmp / "out" / "m.safetensors")]


@case("unknown augmentation", "augment='heavy' is not known", "use one of minimal")
def _(tmp):
    return [
        "finetune",
        "--config",
        '{"augment": "heavy"}',
        "--out",
        str(tmp / "out" / "m.safetensors"),
    ]


@case(
    "unknown notebook parameter",
    "Notebook 02_soups has no parameter 'budjet'",
    "its parameters are",
)
def _(tmp):
    from mmsoup.reproduce import run_notebook

    return lambda: run_notebook("02_soups", {"budjet": 10}, tmp / "out", stream=False)


# -- held-out data, heads, dataset folders, downloads ----------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@case("empty held-out set", "held-out set is empty", "pass at least one image")
def _(tmp):
    from mmsoup.evaluate import Evaluator

    return lambda: Evaluator(
        _mlp(), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), device="cpu"
    )


@case(
    "head class count disagrees with the data", "labels go up to 9", "only 2 classes", "use a head"
)
def _(tmp):
    from mmsoup.evaluate import Evaluator

    return lambda: Evaluator(_mlp(), torch.zeros(10, 3), torch.arange(10), device="cpu")


@case(
    "dataset folder missing", "ImageNet is missing", "imagenet/val is not a folder", "data verify"
)
def _(tmp):
    from mmsoup.data.imagenet import load_dataset

    return lambda: load_dataset("ImageNet", root=tmp / "data")


@case(
    "dataset folder in the wrong layout",
    "not ImageNet-1k wnids (cats, dogs)",
    "one folder per wnid",
)
def _(tmp):
    from mmsoup.data.imagenet import load_dataset
    from mmsoup.data.manifest import artifact_path

    folder = artifact_path("imagenet-val", tmp / "data")
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True)
        (folder / name / "1.jpg").write_bytes(b"")
    return lambda: load_dataset("ImageNet", root=tmp / "data")


@case("dataset folder without images", "holds no images for ImageNetV2", "fully unpacked")
def _(tmp):
    from mmsoup.data.imagenet import load_dataset
    from mmsoup.data.manifest import artifact_path

    (artifact_path("imagenetv2-matched-frequency", tmp / "data") / "0").mkdir(parents=True)
    return lambda: load_dataset("ImageNetV2", root=tmp / "data")


@case(
    "manifest checksum mismatch",
    "blob.bin has sha256",
    "the manifest expects",
    "nothing was written",
)
def _(tmp):
    from mmsoup.data import manifest as mf

    source = tmp / "server" / "blob.bin"
    source.parent.mkdir()
    source.write_bytes(b"payload that is not what the manifest promises")
    row = {c: "" for c in mf.COLUMNS} | {"name": "blob", "profile": "paper", "role": "x"}
    row |= {"local_path": "out/blob.bin", "url": source.as_uri(), "sha256": "0" * 64}
    table = pd.DataFrame([row], columns=list(mf.COLUMNS))
    return lambda: mf.fetch(["blob"], tmp, progress=False, manifest=table)


# -- the disk filling up while writing -------------------------------------------------------------
def _full_disk_temp_files(monkeypatch) -> None:
    """Every atomic_path temporary file becomes /dev/full: the kernel's own ENOSPC on write."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return fd, name

    monkeypatch.setattr("mmsoup.io.tempfile.mkstemp", mkstemp)


@case(
    "disk full while writing a soup",
    "disk filled up while writing",
    "soup.safetensors",
    "free space",
)
def _(tmp, monkeypatch):
    from mmsoup import checkpoints

    def save_file(tensors, path, metadata=None):  # safetensors' own message for ENOSPC
        Path(path).write_bytes(b"\0" * 64)  # a partial file that must not survive
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    job = _uniform_soup_job(_pool(tmp), tmp)
    monkeypatch.setattr(checkpoints, "save_file", save_file)
    return job


@case(
    "disk full while writing a sidecar", "disk filled up while writing", "soup.json", "free space"
)
def _(tmp, monkeypatch):
    job = _uniform_soup_job(_pool(tmp), tmp)
    _full_disk_temp_files(monkeypatch)  # safetensors renames its own file over it; JSON fails
    return job


@case("disk full while writing a table", "disk filled up while writing", "table1.csv", "free space")
def _(tmp, monkeypatch):
    from mmsoup.report import write_table1

    table = pd.DataFrame({"ImageNet": [80.0], "Avg OOD": [50.0]}, index=["Greedy soup"])
    _full_disk_temp_files(monkeypatch)
    return lambda: write_table1(table, tmp / "out")


@case(
    "disk full while writing the MMS state",
    "disk filled up while writing",
    "mms.state",
    "free space",
)
def _(tmp, monkeypatch):
    job = _mms_job(_pool(tmp), tmp, budget=2, state_file=tmp / "out" / "mms.state.json")
    _full_disk_temp_files(monkeypatch)
    return job


# -- the runner --------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_input_is_one_sentence_exit_2_and_nothing_written(
    name, tmp_path, capsys, monkeypatch
):
    setup, fragments = CASES[name]
    needs_patch = "monkeypatch" in setup.__code__.co_varnames[: setup.__code__.co_argcount]
    job = setup(tmp_path, monkeypatch) if needs_patch else setup(tmp_path)
    before = _snapshot(tmp_path)
    if isinstance(job, list):
        argv = job
    else:  # a library call: through a throwaway command, so the CLI contract is checked too
        cli.command("errors-case", "run one row of tests/test_errors.py")(lambda args: job())
        argv = ["errors-case"]
        with pytest.raises(MMSoupError):  # the library raises MMSoupError, nothing else
            job()
        capsys.readouterr()
    try:
        status = cli.main(argv)
    finally:
        if argv == ["errors-case"]:
            del cli.COMMANDS["errors-case"]
    err = capsys.readouterr().err
    assert status == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsoup: error: "), err
    message = lines[0].removeprefix("mmsoup: error: ")
    assert "Traceback" not in err and message.endswith((".", ")")), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    after = _snapshot(tmp_path)
    assert after == before, f"files changed: {sorted(set(after) ^ set(before))}"


def test_debug_shows_the_traceback_of_a_bad_input():
    # pretrain checks the profile before importing torch: a real process, started quickly
    cmd = [sys.executable, "-m", "mmsoup", "pretrain", "--profile", "papr", "--debug"]
    debug = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "mmsoup.errors.MMSoupError: Unknown profile 'papr'" in debug.stderr


def test_a_single_ingredient_is_allowed_and_returned_as_the_soup(tmp_path):
    """One checkpoint is a valid (trivial) pool: every recipe returns it unchanged."""
    from mmsoup.soups import greedy_soup, manifold_mixing_soup, uniform_soup

    [path] = _pool(tmp_path)[:1]
    calls = []

    def val_acc(state):
        calls.append(1)
        return 0.5

    expected = _state(0)
    assert all(torch.equal(uniform_soup([path])[k], v) for k, v in expected.items())
    greedy = greedy_soup([path], val_acc, progress=False)
    mms = manifold_mixing_soup([path], val_acc, {"all": list(expected)}, progress=False)
    for res in (greedy, mms):
        assert res.ingredients == [0] and res.n_evals == 1 and res.val_acc == 0.5
        assert all(torch.equal(res.state_dict[k], v) for k, v in expected.items())
    assert len(calls) == 2  # one evaluation each: the ingredient's own accuracy


def _can_mount_tmpfs() -> bool:
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True) if _has_unshare() else None
    )
    return probe is not None and probe.returncode == 0


def _has_unshare() -> bool:
    from shutil import which

    return which("unshare") is not None and sys.platform.startswith("linux")


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged mounts (unshare -rm)")
def test_a_really_full_disk_is_one_sentence_and_leaves_nothing(tmp_path):
    """A 64 KiB tmpfs, really full: the kernel's ENOSPC through safetensors' Rust writer."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        "import sys, torch; from mmsoup.checkpoints import save_state_dict; "
        "from mmsoup.errors import MMSoupError\n"
        "try:\n    save_state_dict({'w': torch.ones(100_000)}, sys.argv[1])\n"
        "except MMSoupError as e:\n    print(e)\n"
        "import os; print(sorted(os.listdir(os.path.dirname(sys.argv[1]))))"
    )
    inner = 'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3" "$1/soup.safetensors"'
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", inner, "sh", str(disk), sys.executable, script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    message, listing = proc.stdout.splitlines()
    assert message == (
        f"The disk filled up while writing {disk}/soup.safetensors; free space and run again "
        "(nothing was written)."
    )
    assert listing == "[]"  # nothing half-written


def test_enospc_is_recognised_from_oserror_and_from_foreign_writers():
    from mmsoup.io import _disk_full

    assert _disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert _disk_full(SafetensorError("I/O error: No space left on device (os error 28)"))
    assert not _disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not _disk_full(MMSoupError("The disk filled up while writing x; free space."))
