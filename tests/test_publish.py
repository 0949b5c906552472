"""A reader's `make reproduce` against the committed run: staged, cleaned, compared, published.

The run writes into `<run-dir>/publish/` (never over committed files); executed notebooks lose
what changes from run to run (papermill's clock, Styler ids, addresses); the last line says
"identical" or names the first difference and its likely cause; `make publish` copies it over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from mmsoup import reproduce as rp
from mmsoup.errors import MMSoupError

REPO = Path(__file__).resolve().parents[1]


def test_cleaning_a_committed_executed_chapter_is_idempotent_and_clock_free():
    text = (REPO / "notebooks" / "executed" / "03_ood_evaluation.ipynb").read_text()
    once = rp.clean_notebook(text)
    assert rp.clean_notebook(once) == once
    nb = json.loads(once)
    assert not {"start_time", "end_time", "duration"} & set(nb["metadata"]["papermill"])
    assert nb["metadata"]["language_info"]["version"].count(".") == 1
    for cell in nb["cells"]:
        assert "execution" not in cell["metadata"]
        assert "start_time" not in cell["metadata"].get("papermill", {})
    assert nbformat.reads(once, as_version=4).cells  # still a valid notebook


def _tiny_chapter(folder: Path) -> Path:
    """A notebook named like chapter 01, with a parameters cell, a Styler table and an address."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "import pandas as pd\npd.DataFrame({'a': [x, 2.5]}).style.format('{:.2f}')"
        ),
        nbformat.v4.new_code_cell("print(object())"),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rp.PIPELINE[0]}.ipynb"
    nbformat.write(nb, path)
    return path


def test_two_executions_of_a_notebook_are_byte_identical_once_cleaned(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MMSOUP_NOTEBOOKS", str(tmp_path / "nb"))
    _tiny_chapter(tmp_path / "nb")
    texts = []
    for run in ("a", "b"):
        done = rp.run_notebook(rp.PIPELINE[0], {"x": 3}, tmp_path / run, stream=True)
        raw = done.read_text()  # each run's folder mapped to the same stand-in, as `publish` does
        texts.append((raw, rp.clean_notebook(rp._relative(raw, {tmp_path / run: "../runs/x"}))))
    (raw_a, clean_a), (raw_b, clean_b) = texts
    assert raw_a != raw_b  # papermill's clock, the Styler's random id, the object's address
    assert clean_a == clean_b
    assert "0x…" in clean_a and "T_c2t0" in clean_a  # cell 2: after papermill's injected one
    # the kernels' "running over TCP without encryption" warning is not on the terminal
    assert "without encryption" not in capfd.readouterr().err


def _tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def _sidecar(torch="2.14.1", cbwr="COMPATIBLE,STRICT") -> str:
    return json.dumps({"numerics": {"isa": "avx2", "mkl_cbwr": cbwr}, "versions": {"torch": torch}})


COMMITTED = {
    "results/embedded/results/accuracy.csv": "method,set,accuracy\nmodel_1,test,96.40\n",
    "results/embedded/results/correct.npz": b"\x00\x01\x02",
    "results/embedded/sweep/model_1.json": _sidecar(),
    "figures/table1.md": "| method | ID |\n| greedy | 96.40 |\n",
    "figures/replicates.csv": "seeded\n",
}


def test_identical_trees_say_identical_with_the_file_count(tmp_path):
    repo = _tree(tmp_path / "repo", COMMITTED)
    staged = _tree(tmp_path / "staged", COMMITTED)
    result = rp.compare_with_committed(staged, repo)
    assert result.line(staged) == "reproduce: identical to the committed run (4 of 4 files)"


def test_a_changed_number_names_the_file_the_line_and_both_numbers(tmp_path):
    repo = _tree(tmp_path / "repo", COMMITTED)
    staged = _tree(
        tmp_path / "staged",
        {
            **COMMITTED,
            "results/embedded/results/accuracy.csv": "method,set,accuracy\nmodel_1,test,96.30\n",
        },
    )
    line = rp.compare_with_committed(staged, repo).line(staged)
    assert line.startswith("reproduce: differs from the committed run in 1 of 4 files")
    assert "results/embedded/results/accuracy.csv line 2: 96.40 -> 96.30" in line
    assert "same instruction-set settings and library versions" in line
    assert str(staged) in line and "make publish" in line


def test_binary_and_new_files_and_the_likely_cause(tmp_path):
    repo = _tree(tmp_path / "repo", COMMITTED)
    staged = _tree(
        tmp_path / "staged",
        {
            **COMMITTED,
            "results/embedded/results/correct.npz": b"\x00\x01\x03",
            "results/embedded/sweep/model_1.json": _sidecar(torch="2.13.0", cbwr="AUTO"),
            "figures/new.csv": "x\n",
        },
    )
    result = rp.compare_with_committed(staged, repo)
    assert len(result.files) == 5 and len(result.differing) == 3
    assert result.first == "figures/new.csv is new"  # files in sorted order
    assert "another instruction-set setting: mkl_cbwr COMPATIBLE,STRICT -> AUTO" in result.cause
    assert "another library version: torch 2.14.1 -> 2.13.0" in result.cause
    assert rp.first_difference("a.npz", b"\x00", b"\x01") == "a.npz (binary)"


def test_publish_copies_the_staged_run_over_the_repository(tmp_path):
    repo = _tree(tmp_path / "repo", {**COMMITTED, "results/embedded/stale.json": "{}"})
    run_dir = tmp_path / "run"
    with pytest.raises(MMSoupError, match="run `make reproduce` first") as err:
        rp.publish_run(run_dir, repo)
    assert "\n" not in str(err.value)
    staged = {**COMMITTED, "figures/table1.md": "| method | ID |\n| greedy | 96.30 |\n"}
    staged["figures/replicates.csv"] = "a seeded copy is never published\n"
    _tree(run_dir / rp.STAGING, staged)
    written = rp.publish_run(run_dir, repo)
    assert (repo / "figures/table1.md").read_text().endswith("96.30 |\n")
    assert (repo / "figures/replicates.csv").read_text() == "seeded\n"
    assert not (repo / "results/embedded/stale.json").exists()  # the results folder replaced whole
    assert (repo / "results/embedded/results/correct.npz").read_bytes() == b"\x00\x01\x02"
    assert len(written) == 4
    assert rp.compare_with_committed(run_dir / rp.STAGING, repo).differing == []


def test_staging_is_seeded_with_what_the_chapters_read(tmp_path):
    repo = _tree(tmp_path / "repo", COMMITTED)
    root = rp.prepare_staging(tmp_path / "run", repo)
    assert (root / "figures/replicates.csv").read_text() == "seeded\n"
    assert not (root / "figures/ablation.csv").exists()  # absent in this repository: not copied
    assert rp.compare_with_committed(root, repo).files == []


def test_published_results_hold_no_timings(tmp_path):
    run = _tree(
        tmp_path / "run",
        {
            "results/accuracy.csv": "a\n",
            "timings.json": '{"finetune": 1.0}',
            "soups/greedy_soup.json": "{}",
            "soups/timings/greedy_soup.json": '{"seconds": 2.0}',
        },
    )
    written = rp.publish_results(run, tmp_path / "dest", {})
    names = {p.relative_to(tmp_path / "dest").as_posix() for p in written}
    assert names == {"results/accuracy.csv", "soups/greedy_soup.json"}
    shutil.rmtree(tmp_path / "dest")
