"""Search spaces (Soups App. J.2.1, scaled) and the resumable sweep runner."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest

from mmsoup.checkpoints import save_state_dict, sidecar_path
from mmsoup.errors import MMSoupError
from mmsoup.finetune import FinetuneConfig, is_done
from mmsoup.models import create_classifier
from mmsoup.sweep import (
    SearchSpace,
    load_configs,
    load_sweep,
    profile_configs,
    random_search,
    run_sweep,
    write_sweep,
)


def test_random_search_stays_in_its_ranges_and_is_seeded():
    space = SearchSpace()
    configs = random_search(300, seed=0)
    lrs = [math.log10(c.lr) for c in configs]
    assert space.log10_lr[0] <= min(lrs) and max(lrs) <= space.log10_lr[1]
    assert max(lrs) - min(lrs) > 0.8  # the whole range is used
    assert {c.epochs for c in configs} == set(range(space.epochs[0], space.epochs[1] + 1))
    assert all(10**-4 <= c.weight_decay <= 10**-0.2 for c in configs)
    for name, hi in (("label_smoothing", 0.25), ("mixup_alpha", 0.9)):
        values = [getattr(c, name) for c in configs]
        zeros = sum(v == 0 for v in values)
        assert 100 < zeros < 200 and all(0 <= v <= hi for v in values)  # 0 w.p. 0.5
    minimal = [c for c in configs if c.augment == "minimal"]
    assert 100 < len(minimal) < 200 and all(c.randaug_n == 0 for c in minimal)
    ra = [c for c in configs if c.augment == "randaugment"]
    assert {c.randaug_n for c in ra} == {0, 1, 2} and all(0 <= c.randaug_m <= 15 for c in ra)
    assert len({c.seed for c in configs}) == 300

    assert random_search(12, seed=5) == random_search(12, seed=5)
    assert random_search(12, seed=5) != random_search(12, seed=6)


def test_profiles_give_their_sweeps():
    embedded, smoke = profile_configs("embedded"), profile_configs("smoke")
    assert len(embedded) >= 12 and 3 <= len(smoke) <= 4
    assert all(c.epochs == 1 for c in smoke)
    with pytest.raises(MMSoupError, match="released"):
        profile_configs("paper")


def test_an_explicit_config_list_loads_and_rejects_typos(tmp_path):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps([{"lr": 1e-3, "epochs": 2}, {"lr": 2e-3, "augment": "minimal"}]))
    assert load_configs(path) == [FinetuneConfig(lr=1e-3, epochs=2), FinetuneConfig(lr=2e-3)]
    path.write_text(json.dumps([{"lr": 1e-3, "epoch": 2}]))
    with pytest.raises(MMSoupError, match="'epoch'"):
        load_configs(path)


@pytest.fixture
def sweep_file(tmp_path):
    """A 3-run sweep of two-step runs on 128 images, from a random-weight init."""
    init = tmp_path / "lp.safetensors"
    save_state_dict(create_classifier(num_classes=10, seed=0).state_dict(), init, {"kind": "test"})
    configs = [FinetuneConfig(lr=1e-3, epochs=1, train_images=128, seed=s) for s in (1, 2, 3)]
    return write_sweep(configs, tmp_path / "sweep", init)


def test_the_runner_resumes_only_the_missing_run(sweep_file):
    first = run_sweep(sweep_file, progress=False, threads=1)
    assert first.ran == ["model_1", "model_2", "model_3"] and first.skipped == []
    sweep = load_sweep(sweep_file)
    assert (sweep.out / "model_0.safetensors").is_file()  # the LP init travels with the sweep
    mtimes = {k: sweep.checkpoint(k).stat().st_mtime_ns for k in (1, 3)}
    sweep.checkpoint(2).unlink()

    again = run_sweep(sweep_file, jobs=2, progress=False)  # the subprocess path
    assert again.ran == ["model_2"] and again.skipped == ["model_1", "model_3"]
    assert all(sweep.checkpoint(k).stat().st_mtime_ns == t for k, t in mtimes.items())
    assert is_done(sweep.checkpoint(2)) and (sweep.out / "logs" / "model_2.log").is_file()


# `mmsoup finetune` whose checkpoint writer stops after the bytes are on disk, before the rename
PAUSED_WRITER = """
import sys, time
import mmsoup.checkpoints as ck
write = ck.save_file
def paused(tensors, path, metadata=None):
    write(tensors, path, metadata=metadata)
    print("checkpoint written, not renamed", file=sys.stderr, flush=True)
    time.sleep(600)
ck.save_file = paused
from mmsoup.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_writing_leaves_no_checkpoint_and_the_sweep_resumes(sweep_file):
    cmd = [
        sys.executable,
        "-c",
        PAUSED_WRITER,
        "finetune",
        "--sweep",
        str(sweep_file),
        "--run",
        "1",
    ]
    proc = subprocess.Popen([*cmd, "--threads", "1"], stderr=subprocess.PIPE, text=True)
    lines = []
    while not lines or lines[-1] != "checkpoint written, not renamed":
        line = proc.stderr.readline()
        assert line, f"the run ended before writing its checkpoint: {lines}"
        lines.append(line.strip())
    proc.send_signal(signal.SIGKILL)  # in the middle of the atomic write
    proc.wait()
    proc.stderr.close()
    sweep = load_sweep(sweep_file)
    ckpt = sweep.checkpoint(1)
    assert not ckpt.exists() and not sidecar_path(ckpt).exists()
    assert len(list(sweep.out.glob(".model_1.safetensors.*.tmp"))) == 1  # the bytes it wrote

    report = run_sweep(sweep_file, progress=False, threads=1)
    assert report.ran == ["model_1", "model_2", "model_3"] and is_done(ckpt)
    assert not list(sweep.out.glob(".model_*"))  # the leftover is removed on resume


def test_a_sweep_file_is_never_silently_replaced(sweep_file):
    sweep = load_sweep(sweep_file)
    other = [FinetuneConfig(lr=5e-3)]
    with pytest.raises(MMSoupError, match="different sweep"):
        write_sweep(other, sweep.out, sweep.init)
    with pytest.raises(MMSoupError, match="runs 1..3"):
        sweep.run(4)


def test_the_sweep_bar_ends_on_its_best_run_whatever_finished_last(sweep_file, monkeypatch, capsys):
    """Parallel runs finish in any order: the line an executed notebook keeps must not follow it."""
    import mmsoup.sweep as sw

    metas = [{"name": f"model_{k}", "val_acc": acc} for k, acc in ((1, 0.5), (2, 0.7), (3, 0.7))]
    monkeypatch.setenv("MMSOUP_PLAIN_PROGRESS", "1")  # headless: the bar's one final line
    lines = []
    for order in (metas, metas[::-1]):

        def finish_in_order(sweep, todo, jobs, threads, finished, order=order):
            for meta in order:
                finished(meta)
            return []

        monkeypatch.setattr(sw, "_run_parallel", finish_in_order)
        run_sweep(sweep_file, jobs=2, threads=1)
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    # a tie (0.7) goes to the earlier run of the sweep
    assert lines == ["sweep: 100%|██████████| 3/3, best model_2 val_acc=0.7000"] * 2
