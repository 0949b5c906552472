"""Every notebook runs headlessly under the smoke profile (papermill), and the runner's errors are clear."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from mmsoup.errors import MMSoupError
from mmsoup.reproduce import PIPELINE, reproduce, run_notebook


def test_notebooks_01_to_05_write_figure2_and_table1(smoke_run):
    figures = smoke_run / "figures"
    for name in ("figure2.png", "figure2.pdf", "table1.csv", "table1.md", "table1.tex"):
        assert (figures / name).stat().st_size > 500, name
    table = pd.read_csv(figures / "table1.csv", index_col=0)
    for row in ("Best individual", "Uniform soup", "Greedy soup", "MMS-C8", "MMS-C15", "MMS-C26"):
        assert row in table.index
    assert "Avg OOD" in table.columns and len(table.columns) >= 7
    executed = [smoke_run / "notebooks" / f"{n}.ipynb" for n in PIPELINE]
    assert all(p.is_file() for p in executed)


def _outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _check_short(outputs, name):
    """No error, no stream output over 8 lines, no output of any kind over 40 lines."""
    for o in outputs:
        assert o["output_type"] != "error", (name, o.get("evalue"))
        if o["output_type"] == "stream":
            assert len(o["text"].splitlines()) <= 8, (name, o["text"][:200])
        for mime, text in o.get("data", {}).items():
            if mime == "text/plain":
                assert len(text.splitlines()) <= 40, (name, text[:200])


@pytest.mark.parametrize(
    ("name", "figures"),
    [("01_finetune_sweep", 3), ("02_soups", 9), ("03_ood_evaluation", 2)],
)
def test_chapters_01_to_03_draw_their_figures_in_short_outputs(smoke_run, name, figures):
    """The chapters show what each stage decided: a figure per idea, no pages of text."""
    outputs = _outputs(smoke_run / "notebooks" / f"{name}.ipynb")
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= figures
    _check_short(outputs, name)


def test_chapter_02_replays_the_uniform_and_greedy_soup_bit_for_bit(smoke_run, tmp_path):
    """The public calls shown in chapter 02 give the stage's files, tensor for tensor."""
    params = {"profile": "smoke", "run_dir": str(smoke_run), "replay": True}
    text = str(_outputs(run_notebook("02_soups", params, tmp_path, stream=False)))
    assert "equals the stage's file, tensor for tensor: True" in text
    assert "equals the stage's file: True" in text


def test_notebook_08_reads_the_committed_replicate_study_alone(tmp_path):
    """Chapter 08 runs from figures/replicates.csv alone (read only): no run folder, no study."""
    from pathlib import Path

    figures = Path(__file__).resolve().parents[1] / "figures"
    before = (figures / "replicates.csv").read_bytes()
    params = {
        "profile": "embedded",
        "run_dir": str(tmp_path / "no_run"),
        "figures_dir": str(figures),
    }
    out = run_notebook("08_replicates", params, tmp_path, stream=False)
    outputs = _outputs(out)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1
    _check_short(outputs, "08_replicates")
    assert "Greedy soup" in str(outputs)
    assert (figures / "replicates.csv").read_bytes() == before
    assert not (tmp_path / "no_run").exists()


def test_notebook_06_runs_headless_and_reports_readouts(smoke_run, tmp_path):
    out = run_notebook(
        "06_lambda_explorer",
        {"profile": "smoke", "run_dir": str(smoke_run), "interactive": False},
        tmp_path,
        stream=False,
    )
    assert "heldout" in out.read_text()  # the readouts table was displayed
    assert "accepted" in out.read_text()  # the line saying which soup and step it opened on


def test_notebook_07_runs_headless_with_its_figures_and_few_stream_lines(smoke_run, tmp_path):
    """Soups §3.2 and appendices on the smoke pool: five figures drawn, progress kept to one line each."""
    import nbformat

    params = {"profile": "smoke", "run_dir": str(smoke_run), "images": 100, "grid": 3, "seeds": 1}
    out = run_notebook("07_why_soups_work", params, tmp_path, stream=False)
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    assert not any(o["output_type"] == "error" for o in outputs)
    for o in outputs:
        if o["output_type"] == "stream":
            assert len(o["text"].splitlines()) <= 8, o["text"][:200]
    # its tables are kept beside the run's results, and redraw its five figures without the models
    from mmsoup.analysis import TABLES, load_tables
    from mmsoup.plots import why_soups_figures

    tables, meta = load_tables(smoke_run)
    assert sorted(tables) == sorted(TABLES) and meta["landscape_title"].startswith("θ_a = ")
    figures = why_soups_figures(tables, meta)
    assert len(figures) == 5 and all(f.axes for f in figures.values())


def test_chapters_04_and_05_run_from_the_committed_results_alone(tmp_path):
    """From a clean clone (no run folder): Figure 2, Table 1 and the claims checklist."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    figures = tmp_path / "figures"
    figures.mkdir()
    for name in ("replicates.csv", "replicates.md"):
        (figures / name).write_bytes((root / "figures" / name).read_bytes())
    for name in ("04_figure2", "05_table1"):
        params = {
            "profile": "embedded",
            "run_dir": str(tmp_path / "no_run"),
            "figures_dir": str(figures),
            "committed": str(root / "results" / "embedded"),
        }
        outputs = _outputs(run_notebook(name, params, tmp_path / "out", stream=False))
        _check_short(outputs, name)
        text = str(outputs)
        assert "showing the committed results" in text
        assert "across replicates" in text and "holds" in text, name
    assert (figures / "table1.csv").read_bytes() == (root / "figures" / "table1.csv").read_bytes()
    assert not (tmp_path / "no_run").exists()


def test_an_unknown_notebook_parameter_is_refused_before_running(tmp_path):
    with pytest.raises(MMSoupError, match="has no parameter 'budjet'"):
        run_notebook("02_soups", {"budjet": 3}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_unknown_profile_is_refused_before_running(tmp_path):
    with pytest.raises(MMSoupError, match="Unknown profile 'tiny'"):
        reproduce("tiny", out=tmp_path, run_dir=tmp_path / "run")
    assert not any(tmp_path.iterdir())


def test_a_failing_cell_names_the_notebook_and_cell(tmp_path):
    with pytest.raises(MMSoupError, match=r"Notebook 03_ood_evaluation failed in cell \d+"):
        run_notebook(
            "03_ood_evaluation",
            {"profile": "smoke", "run_dir": str(tmp_path / "empty")},
            tmp_path / "out",
            stream=False,
        )


def test_executed_notebooks_hold_one_line_per_progress_bar(smoke_run):
    """Headless runs keep the live bars on the terminal: a stream output is a few lines, not pages."""
    import nbformat

    for name in PIPELINE:
        nb = nbformat.read(smoke_run / "notebooks" / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream":
                    lines = out["text"].splitlines()
                    assert len(lines) <= 8, (name, lines[:3])
                    assert not any("\r" in line for line in lines), name
                    # no clock: elapsed times and rates differ from run to run
                    clock = re.compile(r"\d\d:\d\d<|/s\b|s/\w+\]|\d+(\.\d+)?\s?s\b")
                    assert not any(clock.search(line) for line in lines), (name, lines)


def test_published_copies_carry_the_notebooks_default_paths_not_this_machines(tmp_path):
    from mmsoup.reproduce import publish

    run, figs = tmp_path / "runs" / "embedded", tmp_path / "figs"
    nb = tmp_path / "02_soups.ipynb"
    nb.write_text(f'{{"run_dir": "{run}", "saved": "{run}/soups/x", "fig": "{figs}/t.png"}}')
    out = publish(
        nb, tmp_path / "executed" / nb.name, {run: "../runs/embedded", figs: "../figures"}
    )
    text = out.read_text()
    assert str(tmp_path) not in text
    assert '"../runs/embedded/soups/x"' in text and '"../figures/t.png"' in text
