"""`make figures`: every figure and table from committed results, without re-running the study."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmsoup.errors import MMSoupError
from mmsoup.reproduce import publish_results, rebuild_figures

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "embedded"
WHY_SOUPS = (
    "why_soups_a_landscape.png",
    "why_soups_b_angle.png",
    "why_soups_c_ensemble_vs_soup.png",
    "why_soups_d_random_order.png",
    "why_soups_e_wise.png",
)


def test_the_committed_results_redraw_the_committed_figures(tmp_path):
    """From a clean clone: Table 1 and the replicate summary come out byte for byte as committed."""
    out = tmp_path / "figures"
    out.mkdir()
    shutil.copy(ROOT / "figures" / "replicates.csv", out)
    written = {p.name for p in rebuild_figures(COMMITTED, out, "embedded")}
    for name in ("table1.csv", "table1.md", "table1.tex", "table1_ci.csv", "replicates.md"):
        assert name in written
        assert (out / name).read_bytes() == (ROOT / "figures" / name).read_bytes(), name
    for name in ("figure2.png", "figure2.pdf", "replicates.png", *WHY_SOUPS):
        assert name in written and (out / name).stat().st_size > 5_000, name
        assert (ROOT / "figures" / name).is_file(), f"{name} is not committed"
    if any((ROOT / "results" / "ablation").glob("*/r*/ablation.json")):  # chapter 09's study
        for name in ("ablation.csv", "ablation.md"):
            assert name in written
            assert (out / name).read_bytes() == (ROOT / "figures" / name).read_bytes(), name
        assert "ablation.png" in written and (ROOT / "figures" / "ablation.png").is_file()
        assert not list((ROOT / "results" / "ablation").rglob("*.safetensors"))
    assert not list(COMMITTED.rglob("*.safetensors"))  # results, no checkpoints
    total = sum(p.stat().st_size for p in COMMITTED.rglob("*") if p.is_file())
    assert total < 2_000_000, total


def test_a_run_published_without_checkpoints_redraws_its_own_table1(smoke_run, tmp_path):
    dest = tmp_path / "results" / "smoke"
    written = publish_results(smoke_run, dest, {smoke_run: "runs/smoke"})
    assert (dest / "results" / "accuracy.csv").is_file() and (dest / "soups").is_dir()
    assert written and all(p.is_file() for p in written)
    assert not list(dest.rglob("*.safetensors"))
    for p in dest.rglob("*"):
        if p.suffix in (".json", ".csv", ".log"):
            assert str(smoke_run) not in p.read_text(), p
    out = rebuild_figures(dest, tmp_path / "figs", "smoke")
    assert (tmp_path / "figs" / "table1.csv").read_bytes() == (
        smoke_run / "figures" / "table1.csv"
    ).read_bytes()
    assert any(p.name == "figure2.png" for p in out)


def test_an_interrupted_publish_leaves_the_old_results_whole(smoke_run, tmp_path, monkeypatch):
    dest = tmp_path / "results"
    publish_results(smoke_run, dest, {})
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken)  # the .npz copy fails half way
    with pytest.raises(OSError, match="disk full"):
        publish_results(smoke_run, dest, {})
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["results"]  # no staging left behind


def test_figures_without_results_is_one_sentence(tmp_path):
    with pytest.raises(MMSoupError, match="There are no results in"):
        rebuild_figures(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(MMSoupError, match="has no results to publish"):
        publish_results(tmp_path / "nothing", tmp_path / "out", {})
