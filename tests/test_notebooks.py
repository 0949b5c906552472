"""Every notebook runs headlessly under the smoke profile (papermill), and the runner's errors are clear."""

from __future__ import annotations

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


def test_notebook_06_runs_headless_and_reports_readouts(smoke_run, tmp_path):
    out = run_notebook(
        "06_lambda_explorer",
        {"profile": "smoke", "run_dir": str(smoke_run), "interactive": False},
        tmp_path,
        stream=False,
    )
    assert "heldout" in out.read_text()  # the readouts table was displayed


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
