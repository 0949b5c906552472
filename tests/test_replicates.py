"""Same machine, same bytes, whatever `jobs`; and the replicate study that the README's claims use.

The smoke study of `conftest.smoke_run` runs its sweep in one process (notebooks under papermill);
replicate 0 of `mmsoup replicate --profile smoke:jobs=2` runs the same study with two sweep
processes, outside notebooks, fanned out next to replicate 1 (four processes on the cores): both
must write the same checkpoints, soups, accuracies and Table 1, byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mmsoup import isa, pipeline, replicates
from mmsoup.cli import main
from mmsoup.determinism import machine_info, pinned
from mmsoup.errors import MMSoupError
from mmsoup.recipes import RECIPES


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    """Two smoke replicates, 2 sweep processes each, both replicates at once; (root, figures)."""
    root = tmp_path_factory.mktemp("replicates")
    figures = root / "figures"
    argv = ["replicate", "--profile", "smoke:jobs=2", "--replicates", "2", "--jobs", "2"]
    assert main([*argv, "--root", str(root), "--out", str(figures)]) == 0
    return root, figures


def test_one_and_two_sweep_processes_write_the_same_bytes(smoke_run, study, tmp_path):
    r0 = study[0] / "r0"
    for k in range(5):  # model_0 (LP init) .. model_4
        name = f"model_{k}.safetensors"
        assert (r0 / "sweep" / name).read_bytes() == (smoke_run / "sweep" / name).read_bytes()
    soups = sorted((smoke_run / "soups").glob("*.safetensors"))
    assert len(soups) >= 7
    for f in soups:
        assert (r0 / "soups" / f.name).read_bytes() == f.read_bytes(), f.name
    for f in ("accuracy.csv", "correct.npz"):
        assert (r0 / "results" / f).read_bytes() == (smoke_run / "results" / f).read_bytes(), f
    pipeline.table1_stage("smoke", r0, tmp_path)
    assert (tmp_path / "table1.csv").read_bytes() == (
        smoke_run / "figures" / "table1.csv"
    ).read_bytes()


def test_a_soup_ignores_the_thread_count_it_is_started_with(smoke_run, tmp_path):
    run = tmp_path / "run"
    (run / "sweep").mkdir(parents=True)
    for f in (smoke_run / "sweep").glob("model_*.safetensors"):
        (run / "sweep" / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmsoup", "soup", "--profile", "smoke", "--run-dir", str(run)]
    subprocess.run([*cmd, "--recipe", "MMS-C8"], check=True, env=env, capture_output=True)
    name = "mms_c8.safetensors"
    assert (run / "soups" / name).read_bytes() == (smoke_run / "soups" / name).read_bytes()


def test_replicates_csv_has_every_method_of_every_replicate(study):
    root, figures = study
    rows = pd.read_csv(figures / "replicates.csv")
    assert sorted(rows["replicate"].unique()) == [0, 1]
    # every study recipe of the registry (Model Stock included, with no edit outside its row)
    for method in ("Best individual", *(r.name for r in RECIPES)):
        assert (rows["method"] == method).sum() == 2, method
    best = rows[rows["method"] == "Best individual"].set_index("replicate")
    assert (best[["delta_id", "delta_ood"]] == 0).all().all()
    uniform = rows[rows["method"] == "Uniform soup"].set_index("replicate")
    assert (uniform["delta_id"] - (uniform["id"] - best["id"])).abs().max() < 1e-3
    assert (uniform["models_mixed"] == 5).all()  # model_0 (LP init) + 4 runs
    # each replicate's best model is the individual model with the highest held-out accuracy
    acc = pd.read_csv(root / "r1" / "results" / "accuracy.csv")
    held = acc[(acc["set"] == "heldout") & (acc["kind"] == "individual")]
    assert best.loc[1, "model"] == held.sort_values("accuracy", ascending=False)["method"].iloc[0]


def test_replicates_differ_by_their_sweep_seed(study):
    root, _ = study
    a, b = (root / f"r{r}" / "sweep" / "model_1.safetensors" for r in (0, 1))
    assert a.read_bytes() != b.read_bytes()
    assert (root / "r0" / "sweep" / "model_0.safetensors").read_bytes() == (
        root / "r1" / "sweep" / "model_0.safetensors"
    ).read_bytes()  # one backbone and LP init shared


def test_the_summary_reports_the_spread_and_the_wins(study):
    _, figures = study
    md = (figures / "replicates.md").read_text()
    assert "2 replicates" in md and "| MMS-C26 |" in md and "W–T–L" in md
    assert (figures / "replicates.png").stat().st_size > 10_000
    table = replicates.spread(pd.read_csv(figures / "replicates.csv"))
    row = table.set_index("method").loc["Uniform soup"]
    assert row["delta_ood_lo"] <= row["delta_ood_mean"] <= row["delta_ood_hi"]
    assert row["delta_ood_wins"] + row["delta_ood_losses"] <= 2


def test_a_finished_replicate_is_not_run_again(study):
    root, _ = study
    done = root / "r0" / replicates.DONE
    before = done.stat().st_mtime_ns
    replicates.run_replicate("smoke:jobs=2", 0, root)
    assert done.stat().st_mtime_ns == before


def test_reproduce_places_a_run_among_the_replicates(smoke_run, study):
    text = replicates.compare(smoke_run, "smoke", study[1] / "replicates.csv")
    assert "against the 2 committed replicates" in text
    assert "Uniform soup" in text and "MMS-C8" in text


def test_the_replicate_command_refuses_bad_input_before_work(tmp_path, capsys):
    for argv, message in (
        (["--replicates", "1"], "at least 2 replicates"),
        (["--index", "5", "--replicates", "2"], "--index 5 is out of range"),
        (["--profile", "paper"], "no random sweep"),
    ):
        assert main(["replicate", "--root", str(tmp_path / "r"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(MMSoupError, match="finished replicate"):
        replicates.collect(tmp_path, "smoke")


def test_every_sidecar_names_the_numerics_and_its_timings_the_machine(study):
    import json

    side = json.loads((study[0] / "r0" / "soups" / "mms_c8.json").read_text())
    assert side["numerics"] == isa.numerics()  # what decides the bits, and nothing else
    timings = (study[0] / "r0" / "soups" / "timings" / "mms_c8.json").read_text()
    info = machine_info()
    assert info["cpu"] in timings and info["blas"][0] in timings


def test_pinned_sets_the_threads_and_restores_them():
    before = torch.get_num_threads()
    with pinned(1):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == before
